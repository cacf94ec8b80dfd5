//! Writing the pickles and archives of a torch_dist checkpoint.
//!
//! - `data.pkl` of a tensor item exactly as `torch.save` writes it (protocol 2, BINPUT memo);
//! - `.metadata` as a protocol-2 pickle of the same objects torch writes (megatron-core 0.16 and
//!   0.19 load it; the spec records the check);
//! - `torch.save` zip archives: STORED records with 64-byte aligned payloads (FB padding), data
//!   descriptors, central directory, and the ZIP64 end records torch always writes; records of
//!   4 GiB or more, or starting beyond 4 GiB, get ZIP64 fields.

use bridgeflow_sdk::DType;

/// A small protocol-2 pickle writer with Python's memo numbering.
pub struct Pickler {
    pub out: Vec<u8>,
    memo: u32,
}

impl Pickler {
    pub fn new() -> Pickler {
        Pickler {
            out: vec![0x80, 0x02],
            memo: 0,
        }
    }
    fn put(&mut self) {
        if self.memo < 256 {
            self.out.extend_from_slice(&[b'q', self.memo as u8]);
        } else {
            self.out.push(b'r');
            self.out.extend_from_slice(&self.memo.to_le_bytes());
        }
        self.memo += 1;
    }
    pub fn global(&mut self, module: &str, name: &str) {
        self.out.push(b'c');
        self.out.extend_from_slice(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'\n');
        self.put();
    }
    pub fn str(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
        self.put();
    }
    /// Python's save_long for protocol 2.
    pub fn int(&mut self, v: i64) {
        if (0..256).contains(&v) {
            self.out.extend_from_slice(&[b'K', v as u8]);
        } else if (0..65536).contains(&v) {
            self.out.push(b'M');
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if i32::try_from(v).is_ok() {
            self.out.push(b'J');
            self.out.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            // LONG1: minimal little-endian two's complement.
            let mut b = v.to_le_bytes().to_vec();
            while b.len() > 1 {
                let last = b[b.len() - 1];
                let prev = b[b.len() - 2];
                if (last == 0 && prev & 0x80 == 0) || (last == 0xff && prev & 0x80 != 0) {
                    b.pop();
                } else {
                    break;
                }
            }
            self.out.extend_from_slice(&[0x8a, b.len() as u8]);
            self.out.extend_from_slice(&b);
        }
    }
    pub fn float(&mut self, v: f64) {
        self.out.push(b'G');
        self.out.extend_from_slice(&v.to_be_bytes());
    }
    pub fn none(&mut self) {
        self.out.push(b'N');
    }
    pub fn bool(&mut self, v: bool) {
        self.out.push(if v { 0x88 } else { 0x89 });
    }
    pub fn mark(&mut self) {
        self.out.push(b'(');
    }
    /// Closes a tuple whose `n` items were just written (after `mark` when n > 3).
    pub fn tuple(&mut self, n: usize) {
        match n {
            0 => {
                self.out.push(b')');
                return;
            }
            1 => self.out.push(0x85),
            2 => self.out.push(0x86),
            3 => self.out.push(0x87),
            _ => self.out.push(b't'),
        }
        self.put();
    }
    pub fn ints_tuple(&mut self, v: &[u64]) {
        if v.len() > 3 {
            self.mark();
        }
        for &x in v {
            self.int(x as i64);
        }
        self.tuple(v.len());
    }
    pub fn empty_dict(&mut self) {
        self.out.push(b'}');
        self.put();
    }
    pub fn empty_list(&mut self) {
        self.out.push(b']');
        self.put();
    }
    pub fn op(&mut self, b: u8) {
        self.out.push(b);
    }
    pub fn memo_after(&mut self) {
        self.put();
    }
    /// `cls.__new__(cls)`: GLOBAL, EMPTY_TUPLE, NEWOBJ.
    pub fn newobj(&mut self, module: &str, name: &str) {
        self.global(module, name);
        self.out.extend_from_slice(&[b')', 0x81]);
        self.put();
    }
    /// Starts a dict: push it and a MARK; items follow as key, value pairs.
    pub fn dict_begin(&mut self) {
        self.empty_dict();
        self.mark();
    }
    pub fn dict_end(&mut self) {
        self.out.push(b'u');
    }
    pub fn build(&mut self) {
        self.out.push(b'b');
    }
    /// `torch.Size(dims)`.
    pub fn torch_size(&mut self, dims: &[u64]) {
        self.global("torch", "Size");
        self.ints_tuple(dims);
        self.tuple(1);
        self.out.push(b'R');
        self.put();
    }
    /// `callable(arg)` for a single string or int argument.
    pub fn reduce1(&mut self, module: &str, name: &str, arg: either::Arg<'_>) {
        self.global(module, name);
        match arg {
            either::Arg::Str(s) => self.str(s),
            either::Arg::Int(i) => self.int(i),
        }
        self.tuple(1);
        self.out.push(b'R');
        self.put();
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.out.push(b'.');
        self.out
    }
}

impl Default for Pickler {
    fn default() -> Self {
        Pickler::new()
    }
}

pub mod either {
    pub enum Arg<'a> {
        Str(&'a str),
        Int(i64),
    }
}

pub fn storage_class(d: DType) -> &'static str {
    match d {
        DType::F32 => "FloatStorage",
        DType::F16 => "HalfStorage",
        DType::BF16 => "BFloat16Storage",
        DType::F64 => "DoubleStorage",
        DType::I64 => "LongStorage",
        DType::I32 => "IntStorage",
        DType::I16 => "ShortStorage",
        DType::I8 => "CharStorage",
        DType::U8 => "ByteStorage",
        DType::BOOL => "BoolStorage",
        DType::F8_E4M3 => "Float8_e4m3fnStorage",
        DType::F8_E5M2 => "Float8_e5m2Storage",
        DType::U16 => "UInt16Storage",
        DType::U32 => "UInt32Storage",
        DType::U64 => "UInt64Storage",
    }
}

/// `data.pkl` of `torch.save(tensor)` for a contiguous tensor, byte for byte.
pub fn tensor_pickle(dtype: DType, shape: &[u64]) -> Vec<u8> {
    let mut p = Pickler::new();
    tensor_value(&mut p, dtype, shape, 0);
    p.finish()
}

/// `torch._utils._rebuild_tensor_v2(storage, 0, shape, contiguous stride, False,
/// OrderedDict())` on storage `data/{storage}`, as torch.save pickles a tensor.
pub fn tensor_value(p: &mut Pickler, dtype: DType, shape: &[u64], storage: usize) {
    let numel: u64 = shape.iter().product();
    let mut stride = vec![1u64; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        stride[d] = stride[d + 1] * shape[d + 1];
    }
    p.global("torch._utils", "_rebuild_tensor_v2");
    p.mark();
    p.mark();
    p.str("storage");
    p.global("torch", storage_class(dtype));
    p.str(&storage.to_string());
    p.str("cpu");
    p.int(numel as i64);
    p.tuple(5);
    p.op(b'Q');
    p.int(0);
    p.ints_tuple(shape);
    p.ints_tuple(&stride);
    p.bool(false);
    p.global("collections", "OrderedDict");
    p.tuple(0);
    p.op(b'R');
    p.memo_after();
    p.tuple(6);
    p.op(b'R');
    p.memo_after();
}

pub fn none_list_pickle() -> Vec<u8> {
    vec![0x80, 0x02, b']', b'q', 0, b'N', b'a', b'.']
}

const LOCAL: usize = 30;
const CENTRAL: usize = 46;
const U32MAX: u64 = 0xFFFF_FFFF;

/// One record of an archive, laid out.
struct Rec {
    name: String,
    header: u64,
    data: u64,
    len: u64,
    crc: u32,
}

/// A `torch.save` archive laid out before its payloads are known: every record's place, the
/// small records' bytes, and the frame to be completed with the payloads' CRCs.
pub struct Archive {
    recs: Vec<Rec>,
    /// Indices of the payload records (`data/0`, `data/1`, ...).
    payloads: Vec<usize>,
    small: Vec<Vec<u8>>,
    pub total: u64,
}

fn serialization_id(seed: &str) -> String {
    // torch writes 40 random decimal digits; a digest of the item keeps our output reproducible.
    let mut s = String::new();
    let mut h = crc32fast::hash(seed.as_bytes()) as u64 | 1;
    while s.len() < 40 {
        h = h
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        s.push_str(&format!("{:019}", h % 10_000_000_000_000_000_000));
    }
    s.truncate(40);
    s
}

impl Archive {
    /// Lays out an archive named `prefix` (`archive` for items, `common` for common.pt) with
    /// `data.pkl`, the fixed records and, when `payload_len` is Some, `data/0`.
    pub fn new(prefix: &str, pkl: Vec<u8>, payload_len: Option<u64>, seed: &str) -> Archive {
        let lens: Vec<u64> = payload_len.into_iter().collect();
        Self::with_id(prefix, pkl, &lens, serialization_id(seed))
    }

    /// An archive with several storages, `data/0` .. `data/{n-1}` (a whole state dict, as
    /// Megatron-LM's `model_optim_rng.pt`).
    pub fn with_payloads(prefix: &str, pkl: Vec<u8>, lens: &[u64], seed: &str) -> Archive {
        Self::with_id(prefix, pkl, lens, serialization_id(seed))
    }

    pub fn with_id(prefix: &str, pkl: Vec<u8>, payload_lens: &[u64], sid: String) -> Archive {
        let mut names_data: Vec<(String, Option<Vec<u8>>, u64)> = vec![
            (
                format!("{prefix}/data.pkl"),
                Some(pkl.clone()),
                pkl.len() as u64,
            ),
            (format!("{prefix}/.format_version"), Some(b"1".to_vec()), 1),
            (
                format!("{prefix}/.storage_alignment"),
                Some(b"64".to_vec()),
                2,
            ),
            (format!("{prefix}/byteorder"), Some(b"little".to_vec()), 6),
        ];
        for (i, &n) in payload_lens.iter().enumerate() {
            names_data.push((format!("{prefix}/data/{i}"), None, n));
        }
        names_data.push((format!("{prefix}/version"), Some(b"3\n".to_vec()), 2));
        names_data.push((
            format!("{prefix}/.data/serialization_id"),
            Some(sid.into_bytes()),
            40,
        ));
        let mut recs = Vec::new();
        let mut small = Vec::new();
        let mut payloads = Vec::new();
        let mut cursor = 0u64;
        for (name, data, len) in names_data {
            let big = len >= U32MAX || cursor >= U32MAX;
            let mut z64 = 0u64;
            if big {
                z64 = 4 + if len >= U32MAX { 16 } else { 0 } + if cursor >= U32MAX { 8 } else { 0 };
            }
            let start = cursor + LOCAL as u64 + name.len() as u64 + 4 + z64;
            let pad = (64 - start % 64) % 64;
            let data_off = start + pad;
            let desc = if len >= U32MAX { 24 } else { 16 };
            if data.is_none() {
                payloads.push(recs.len());
            }
            small.push(data.unwrap_or_default());
            recs.push(Rec {
                name,
                header: cursor,
                data: data_off,
                len,
                crc: 0,
            });
            cursor = data_off + len + desc;
        }
        for (r, d) in recs.iter_mut().zip(&small) {
            r.crc = crc32fast::hash(d);
        }
        let cd: u64 = recs
            .iter()
            .map(|r| {
                let big = r.len >= U32MAX || r.header >= U32MAX;
                CENTRAL as u64
                    + r.name.len() as u64
                    + if big {
                        4 + if r.len >= U32MAX { 16 } else { 0 }
                            + if r.header >= U32MAX { 8 } else { 0 }
                    } else {
                        0
                    }
            })
            .sum();
        let total = cursor + cd + 56 + 20 + 22;
        Archive {
            recs,
            payloads,
            small,
            total,
        }
    }

    /// Where the (first) payload goes, relative to the archive start.
    pub fn payload_offset(&self) -> Option<u64> {
        self.payloads.first().map(|&i| self.recs[i].data)
    }

    /// Where each payload goes, relative to the archive start.
    pub fn payload_offsets(&self) -> Vec<u64> {
        self.payloads.iter().map(|&i| self.recs[i].data).collect()
    }

    fn local_header(&self, i: usize) -> Vec<u8> {
        let r = &self.recs[i];
        let mut h = Vec::with_capacity(128);
        h.extend_from_slice(b"PK\x03\x04");
        h.extend_from_slice(&0u16.to_le_bytes());
        h.extend_from_slice(&0x0808u16.to_le_bytes());
        h.extend_from_slice(&[0u8; 2 + 2 + 2 + 4 + 4 + 4]);
        h.extend_from_slice(&(r.name.len() as u16).to_le_bytes());
        let mut extra = Vec::new();
        if r.len >= U32MAX || r.header >= U32MAX {
            let mut body = Vec::new();
            if r.len >= U32MAX {
                body.extend_from_slice(&r.len.to_le_bytes());
                body.extend_from_slice(&0u64.to_le_bytes());
            }
            if r.header >= U32MAX {
                body.extend_from_slice(&r.header.to_le_bytes());
            }
            extra.extend_from_slice(&1u16.to_le_bytes());
            extra.extend_from_slice(&(body.len() as u16).to_le_bytes());
            extra.extend_from_slice(&body);
        }
        let pad = r.data - (r.header + LOCAL as u64 + r.name.len() as u64 + extra.len() as u64 + 4);
        extra.extend_from_slice(b"FB");
        extra.extend_from_slice(&(pad as u16).to_le_bytes());
        extra.extend(std::iter::repeat_n(b'Z', pad as usize));
        h.extend_from_slice(&(extra.len() as u16).to_le_bytes());
        h.extend_from_slice(r.name.as_bytes());
        h.extend_from_slice(&extra);
        h
    }

    fn descriptor(r: &Rec) -> Vec<u8> {
        let mut d = b"PK\x07\x08".to_vec();
        d.extend_from_slice(&r.crc.to_le_bytes());
        if r.len >= U32MAX {
            d.extend_from_slice(&r.len.to_le_bytes());
            d.extend_from_slice(&r.len.to_le_bytes());
        } else {
            d.extend_from_slice(&(r.len as u32).to_le_bytes());
            d.extend_from_slice(&(r.len as u32).to_le_bytes());
        }
        d
    }

    /// Every byte of the archive except the payload, as (offset, bytes) runs; `payload_crc` is
    /// the CRC-32 of the payload (ignored when there is none).
    pub fn frame(&mut self, payload_crc: u32) -> Vec<(u64, Vec<u8>)> {
        let crcs = vec![payload_crc; self.payloads.len().min(1)];
        self.frame_all(&crcs)
    }

    /// [`Archive::frame`] for an archive with several payloads, given their CRC-32s in order.
    pub fn frame_all(&mut self, payload_crcs: &[u32]) -> Vec<(u64, Vec<u8>)> {
        for (&i, &c) in self.payloads.iter().zip(payload_crcs) {
            self.recs[i].crc = c;
        }
        let mut runs = Vec::new();
        for i in 0..self.recs.len() {
            let r = &self.recs[i];
            let mut head = self.local_header(i);
            if !self.payloads.contains(&i) {
                head.extend_from_slice(&self.small[i]);
                head.extend_from_slice(&Self::descriptor(r));
                runs.push((r.header, head));
            } else {
                runs.push((r.header, head));
                runs.push((r.data + r.len, Self::descriptor(r)));
            }
        }
        let last = self.recs.last().expect("records");
        let cd_start = last.data + last.len + if last.len >= U32MAX { 24 } else { 16 };
        let mut cd = Vec::new();
        for r in &self.recs {
            let big_len = r.len >= U32MAX;
            let big_off = r.header >= U32MAX;
            cd.extend_from_slice(b"PK\x01\x02");
            cd.extend_from_slice(&0u16.to_le_bytes());
            cd.extend_from_slice(&0u16.to_le_bytes());
            cd.extend_from_slice(&0x0808u16.to_le_bytes());
            cd.extend_from_slice(&[0u8; 6]);
            cd.extend_from_slice(&r.crc.to_le_bytes());
            let l32 = if big_len { U32MAX as u32 } else { r.len as u32 };
            cd.extend_from_slice(&l32.to_le_bytes());
            cd.extend_from_slice(&l32.to_le_bytes());
            cd.extend_from_slice(&(r.name.len() as u16).to_le_bytes());
            let mut extra = Vec::new();
            if big_len || big_off {
                let mut body = Vec::new();
                if big_len {
                    body.extend_from_slice(&r.len.to_le_bytes());
                    body.extend_from_slice(&r.len.to_le_bytes());
                }
                if big_off {
                    body.extend_from_slice(&r.header.to_le_bytes());
                }
                extra.extend_from_slice(&1u16.to_le_bytes());
                extra.extend_from_slice(&(body.len() as u16).to_le_bytes());
                extra.extend_from_slice(&body);
            }
            cd.extend_from_slice(&(extra.len() as u16).to_le_bytes());
            cd.extend_from_slice(&[0u8; 2 + 2 + 2 + 4]);
            let off32 = if big_off {
                U32MAX as u32
            } else {
                r.header as u32
            };
            cd.extend_from_slice(&off32.to_le_bytes());
            cd.extend_from_slice(r.name.as_bytes());
            cd.extend_from_slice(&extra);
        }
        let n = self.recs.len() as u64;
        let cd_len = cd.len() as u64;
        let z64_at = cd_start + cd_len;
        let mut end = cd;
        end.extend_from_slice(b"PK\x06\x06");
        end.extend_from_slice(&44u64.to_le_bytes());
        end.extend_from_slice(&0x031Eu16.to_le_bytes());
        end.extend_from_slice(&0x2Du16.to_le_bytes());
        end.extend_from_slice(&[0u8; 8]);
        end.extend_from_slice(&n.to_le_bytes());
        end.extend_from_slice(&n.to_le_bytes());
        end.extend_from_slice(&cd_len.to_le_bytes());
        end.extend_from_slice(&cd_start.to_le_bytes());
        end.extend_from_slice(b"PK\x06\x07");
        end.extend_from_slice(&0u32.to_le_bytes());
        end.extend_from_slice(&z64_at.to_le_bytes());
        end.extend_from_slice(&1u32.to_le_bytes());
        end.extend_from_slice(b"PK\x05\x06");
        end.extend_from_slice(&[0u8; 4]);
        end.extend_from_slice(&(n as u16).to_le_bytes());
        end.extend_from_slice(&(n as u16).to_le_bytes());
        end.extend_from_slice(&(cd_len.min(U32MAX) as u32).to_le_bytes());
        end.extend_from_slice(&(cd_start.min(U32MAX) as u32).to_le_bytes());
        end.extend_from_slice(&0u16.to_le_bytes());
        runs.push((cd_start, end));
        runs
    }

    /// The whole archive for records without a payload (byte objects, common.pt).
    pub fn bytes(mut self) -> Vec<u8> {
        let total = self.total as usize;
        let mut out = vec![0u8; total];
        for (off, b) in self.frame(0) {
            out[off as usize..off as usize + b.len()].copy_from_slice(&b);
        }
        out
    }
}

/// A Python value as `torch.save` pickles it: what a checkpoint's common state and
/// `train_state.pt` hold (dicts of numbers, strings, tuples, and 0-d or small tensors).
#[derive(Debug, Clone, PartialEq)]
pub enum PyValue {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<PyValue>),
    List(Vec<PyValue>),
    /// Keys in order, as a Python dict keeps them.
    Dict(Vec<(String, PyValue)>),
    /// A contiguous tensor: dtype, shape (empty for 0-d) and little-endian bytes.
    Tensor(DType, Vec<u64>, Vec<u8>),
}

impl PyValue {
    /// A dict from `(key, value)` pairs.
    pub fn dict<K: Into<String>>(items: impl IntoIterator<Item = (K, PyValue)>) -> PyValue {
        PyValue::Dict(items.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }
    pub fn str(s: impl Into<String>) -> PyValue {
        PyValue::Str(s.into())
    }

    fn pickle(&self, p: &mut Pickler, storages: &mut Vec<Vec<u8>>) {
        match self {
            PyValue::None => p.none(),
            PyValue::Bool(b) => p.bool(*b),
            PyValue::Int(v) => p.int(*v),
            PyValue::Float(v) => p.float(*v),
            PyValue::Str(s) => p.str(s),
            PyValue::Tuple(items) => {
                if items.len() > 3 {
                    p.mark();
                }
                for v in items {
                    v.pickle(p, storages);
                }
                p.tuple(items.len());
            }
            PyValue::List(items) => {
                p.empty_list();
                if !items.is_empty() {
                    p.mark();
                    for v in items {
                        v.pickle(p, storages);
                    }
                    p.op(b'e');
                }
            }
            PyValue::Dict(items) => {
                p.dict_begin();
                for (k, v) in items {
                    p.str(k);
                    v.pickle(p, storages);
                }
                p.dict_end();
            }
            PyValue::Tensor(dtype, shape, bytes) => {
                tensor_value(p, *dtype, shape, storages.len());
                storages.push(bytes.clone());
            }
        }
    }
}

/// `torch.save(value)`'s bytes: the archive named `prefix` with its tensors' storages.
pub fn torch_save(prefix: &str, value: &PyValue, seed: &str) -> Vec<u8> {
    let mut p = Pickler::new();
    let mut storages = Vec::new();
    value.pickle(&mut p, &mut storages);
    let lens: Vec<u64> = storages.iter().map(|s| s.len() as u64).collect();
    let mut a = Archive::with_payloads(prefix, p.finish(), &lens, seed);
    let mut out = vec![0u8; a.total as usize];
    for (at, s) in a.payload_offsets().into_iter().zip(&storages) {
        out[at as usize..at as usize + s.len()].copy_from_slice(s);
    }
    let crcs: Vec<u32> = storages.iter().map(|s| crc32fast::hash(s)).collect();
    for (off, b) in a.frame_all(&crcs) {
        out[off as usize..off as usize + b.len()].copy_from_slice(&b);
    }
    out
}
