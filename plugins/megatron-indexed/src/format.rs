//! The `.idx` layout, token dtypes, and a validating parser.

use bridgeflow_sdk::{PluginError, Result};
use std::path::Path;

pub const MAGIC: &[u8; 9] = b"MMIDIDX\x00\x00";
pub const VERSION: u64 = 1;
pub const HEADER_LEN: usize = 9 + 8 + 1 + 8 + 8;

/// Token element types, with Megatron's `DType` codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    U8,
    I8,
    I16,
    I32,
    I64,
    F64,
    F32,
    U16,
}

impl TokenType {
    pub fn code(self) -> u8 {
        match self {
            TokenType::U8 => 1,
            TokenType::I8 => 2,
            TokenType::I16 => 3,
            TokenType::I32 => 4,
            TokenType::I64 => 5,
            TokenType::F64 => 6,
            TokenType::F32 => 7,
            TokenType::U16 => 8,
        }
    }
    pub fn from_code(c: u8) -> Option<TokenType> {
        Some(match c {
            1 => TokenType::U8,
            2 => TokenType::I8,
            3 => TokenType::I16,
            4 => TokenType::I32,
            5 => TokenType::I64,
            6 => TokenType::F64,
            7 => TokenType::F32,
            8 => TokenType::U16,
            _ => return None,
        })
    }
    pub fn size(self) -> usize {
        match self {
            TokenType::U8 | TokenType::I8 => 1,
            TokenType::I16 | TokenType::U16 => 2,
            TokenType::I32 | TokenType::F32 => 4,
            TokenType::I64 | TokenType::F64 => 8,
        }
    }
    /// Token ids are integers: a float dtype is refused wherever a dataset is read or written.
    pub fn is_integer(self) -> bool {
        !matches!(self, TokenType::F32 | TokenType::F64)
    }
    /// The integer token types, by name (for error messages).
    pub const INTEGER_NAMES: &'static str = "uint8, int8, int16, int32, int64, uint16";
    pub fn name(self) -> &'static str {
        match self {
            TokenType::U8 => "uint8",
            TokenType::I8 => "int8",
            TokenType::I16 => "int16",
            TokenType::I32 => "int32",
            TokenType::I64 => "int64",
            TokenType::F64 => "float64",
            TokenType::F32 => "float32",
            TokenType::U16 => "uint16",
        }
    }
    pub fn parse(s: &str) -> Option<TokenType> {
        [
            TokenType::U8,
            TokenType::I8,
            TokenType::I16,
            TokenType::I32,
            TokenType::I64,
            TokenType::F64,
            TokenType::F32,
            TokenType::U16,
        ]
        .into_iter()
        .find(|t| t.name() == s)
    }
    /// `DType.optimal_dtype`: uint16 when the vocabulary is below 65,500, else int32.
    pub fn optimal(vocab_size: u64) -> TokenType {
        if vocab_size < 65_500 {
            TokenType::U16
        } else {
            TokenType::I32
        }
    }
    /// Encodes one token id; errors when it does not fit.
    pub fn put(self, id: u32, out: &mut Vec<u8>) -> std::result::Result<(), u32> {
        match self {
            TokenType::U16 => {
                out.extend_from_slice(&u16::try_from(id).map_err(|_| id)?.to_le_bytes())
            }
            TokenType::I32 => {
                out.extend_from_slice(&i32::try_from(id).map_err(|_| id)?.to_le_bytes())
            }
            TokenType::I64 => out.extend_from_slice(&(id as i64).to_le_bytes()),
            TokenType::U8 => out.push(u8::try_from(id).map_err(|_| id)?),
            TokenType::I16 => {
                out.extend_from_slice(&i16::try_from(id).map_err(|_| id)?.to_le_bytes())
            }
            TokenType::I8 => {
                out.extend_from_slice(&i8::try_from(id).map_err(|_| id)?.to_le_bytes())
            }
            TokenType::F32 => out.extend_from_slice(&(id as f32).to_le_bytes()),
            TokenType::F64 => out.extend_from_slice(&(id as f64).to_le_bytes()),
        }
        Ok(())
    }
    /// Decodes one token id; `Err(value)` when it is not one (negative, or beyond u32).
    pub fn get_checked(self, b: &[u8]) -> std::result::Result<u32, i64> {
        let v: i64 = match self {
            TokenType::U16 => u16::from_le_bytes([b[0], b[1]]) as i64,
            TokenType::I32 => i32::from_le_bytes(b[..4].try_into().unwrap()) as i64,
            TokenType::I64 => i64::from_le_bytes(b[..8].try_into().unwrap()),
            TokenType::U8 => b[0] as i64,
            TokenType::I8 => b[0] as i8 as i64,
            TokenType::I16 => i16::from_le_bytes([b[0], b[1]]) as i64,
            TokenType::F32 | TokenType::F64 => return Ok(self.get(b)),
        };
        u32::try_from(v).map_err(|_| v)
    }
    pub fn get(self, b: &[u8]) -> u32 {
        match self {
            TokenType::U16 => u16::from_le_bytes([b[0], b[1]]) as u32,
            TokenType::I32 => i32::from_le_bytes(b[..4].try_into().unwrap()) as u32,
            TokenType::I64 => i64::from_le_bytes(b[..8].try_into().unwrap()) as u32,
            TokenType::U8 => b[0] as u32,
            TokenType::I8 => b[0] as i8 as u32,
            TokenType::I16 => i16::from_le_bytes([b[0], b[1]]) as u32,
            TokenType::F32 => f32::from_le_bytes(b[..4].try_into().unwrap()) as u32,
            TokenType::F64 => f64::from_le_bytes(b[..8].try_into().unwrap()) as u32,
        }
    }
}

/// The `.idx` header fields.
pub fn header(dtype: TokenType, sequences: u64, documents_plus_one: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.push(dtype.code());
    h.extend_from_slice(&sequences.to_le_bytes());
    h.extend_from_slice(&documents_plus_one.to_le_bytes());
    h
}

/// A parsed, validated `.idx` (arrays as views into its bytes).
pub struct Index<'a> {
    pub dtype: TokenType,
    pub sequences: usize,
    /// Entries in `document_indices` (documents + 1).
    pub doc_entries: usize,
    lengths: &'a [u8],
    pointers: &'a [u8],
    docs: &'a [u8],
    /// Bytes the `.bin` must have (sum of lengths × item size, overflow-checked).
    data_bytes: u64,
}

impl<'a> Index<'a> {
    pub fn parse(path: &Path, b: &'a [u8]) -> Result<Index<'a>> {
        let bad = |m: String| PluginError::format(format!("{}: {m}", path.display()));
        if b.len() < HEADER_LEN {
            return Err(bad(format!(
                "{} bytes: too short for an index header",
                b.len()
            )));
        }
        if &b[..9] != MAGIC {
            return Err(bad("not a Megatron index (magic is not MMIDIDX)".into()));
        }
        let version = u64::from_le_bytes(b[9..17].try_into().unwrap());
        if version != VERSION {
            return Err(bad(format!(
                "index version {version}; only version 1 is known"
            )));
        }
        let dtype = TokenType::from_code(b[17]).ok_or_else(|| {
            bad(format!(
                "unknown dtype code {} (Megatron's codes are 1 to 8)",
                b[17]
            ))
        })?;
        if !dtype.is_integer() {
            return Err(bad(format!(
                "dtype code {} is {}: token data must be an integer type ({})",
                b[17],
                dtype.name(),
                TokenType::INTEGER_NAMES
            )));
        }
        let count = |at: usize, what: &str| {
            let n = u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
            usize::try_from(n).map_err(|_| bad(format!("{what} {n} does not fit this machine")))
        };
        let sequences = count(18, "sequence count")?;
        let doc_entries = count(26, "document count")?;
        // Counts are checked against the file's length before anything is sized from them.
        let want = sequences
            .checked_mul(12)
            .and_then(|x| x.checked_add(doc_entries.checked_mul(8)?))
            .and_then(|x| x.checked_add(HEADER_LEN));
        let Some(want) = want else {
            return Err(bad(format!(
                "{} bytes, but its header claims {sequences} sequences and {doc_entries} document \
                 entries, more than any file holds",
                b.len()
            )));
        };
        if b.len() != want {
            return Err(bad(format!(
                "{} bytes, but {sequences} sequences and {doc_entries} document entries need {want} (truncated, or a multimodal index)",
                b.len()
            )));
        }
        let l_end = HEADER_LEN + 4 * sequences;
        let p_end = l_end + 8 * sequences;
        let mut idx = Index {
            dtype,
            sequences,
            doc_entries,
            lengths: &b[HEADER_LEN..l_end],
            pointers: &b[l_end..p_end],
            docs: &b[p_end..],
            data_bytes: 0,
        };
        if doc_entries == 0 || idx.doc_index(0) != 0 {
            return Err(bad("document indices must start with 0".into()));
        }
        let last = idx.doc_index(doc_entries - 1);
        if last != sequences as u64 {
            return Err(bad(format!(
                "the last document index is {last}, not the sequence count {sequences}"
            )));
        }
        let mut prev = 0;
        for i in 0..doc_entries {
            let d = idx.doc_index(i);
            if d < prev || d > sequences as u64 {
                return Err(bad(format!(
                    "document index {i} = {d} is out of order or range"
                )));
            }
            prev = d;
        }
        let mut ptr = 0u64;
        for i in 0..sequences {
            if idx.pointer(i) != ptr {
                return Err(bad(format!(
                    "pointer {i} is {}, lengths say {ptr}",
                    idx.pointer(i)
                )));
            }
            let len = idx.length(i);
            if len < 0 {
                return Err(bad(format!("sequence {i} has negative length {len}")));
            }
            ptr = ptr
                .checked_add(len as u64 * dtype.size() as u64)
                .ok_or_else(|| bad(format!("sequence {i}: the lengths overflow 64 bits")))?;
        }
        idx.data_bytes = ptr;
        Ok(idx)
    }

    pub fn length(&self, i: usize) -> i32 {
        i32::from_le_bytes(self.lengths[4 * i..4 * i + 4].try_into().unwrap())
    }
    pub fn pointer(&self, i: usize) -> u64 {
        u64::from_le_bytes(self.pointers[8 * i..8 * i + 8].try_into().unwrap())
    }
    pub fn doc_index(&self, i: usize) -> u64 {
        u64::from_le_bytes(self.docs[8 * i..8 * i + 8].try_into().unwrap())
    }
    /// Bytes the `.bin` must have.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }
}

/// `{prefix}.bin` / `{prefix}.idx`, accepting a prefix or either file's path.
pub fn paths(prefix: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let p = prefix
        .strip_suffix(".bin")
        .or_else(|| prefix.strip_suffix(".idx"))
        .unwrap_or(prefix);
    (format!("{p}.bin").into(), format!("{p}.idx").into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An index of `lens` (sequences) grouped into documents by `docs` (document indices).
    fn index(dtype: TokenType, lens: &[i32], docs: &[u64]) -> Vec<u8> {
        let mut b = header(dtype, lens.len() as u64, docs.len() as u64);
        for l in lens {
            b.extend_from_slice(&l.to_le_bytes());
        }
        let mut ptr = 0i64;
        for l in lens {
            b.extend_from_slice(&ptr.to_le_bytes());
            ptr += *l as i64 * dtype.size() as i64;
        }
        for d in docs {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b
    }

    fn err(b: &[u8]) -> String {
        match Index::parse(Path::new("/data/x_text_document.idx"), b) {
            Ok(_) => panic!("accepted"),
            Err(e) => {
                assert_eq!(e.kind, bridgeflow_sdk::ErrorKind::Format);
                let m = e.message.to_string();
                assert!(m.starts_with("/data/x_text_document.idx: "), "{m}");
                m
            }
        }
    }

    #[test]
    fn valid_indexes_parse() {
        let b = index(TokenType::U16, &[3, 0, 5], &[0, 2, 3]);
        let i = Index::parse(Path::new("x.idx"), &b).unwrap();
        assert_eq!((i.sequences, i.doc_entries, i.data_bytes()), (3, 3, 16));
        let empty = index(TokenType::I32, &[], &[0]);
        assert_eq!(
            Index::parse(Path::new("x.idx"), &empty)
                .unwrap()
                .data_bytes(),
            0
        );
    }

    #[test]
    fn float_and_unknown_dtypes_are_refused() {
        for (code, name) in [(6u8, "float64"), (7, "float32")] {
            let mut b = index(TokenType::U16, &[1], &[0, 1]);
            b[17] = code;
            let m = err(&b);
            assert!(
                m.contains(name) && m.contains("must be an integer type"),
                "{m}"
            );
        }
        for code in [0u8, 9, 255] {
            let mut b = index(TokenType::U16, &[1], &[0, 1]);
            b[17] = code;
            assert!(err(&b).contains(&format!("unknown dtype code {code}")));
        }
        assert!(TokenType::parse("float32").is_some_and(|t| !t.is_integer()));
    }

    #[test]
    fn every_header_number_is_checked() {
        let good = index(TokenType::U16, &[3, 0, 5], &[0, 2, 3]);
        let set = |at: usize, v: u64| {
            let mut b = good.clone();
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            b
        };
        assert!(err(&set(9, 2)).contains("index version 2"));
        // Counts beyond the file: refused from the length alone, before anything is sized.
        for huge in [u64::MAX, u64::MAX / 12, 1 << 40] {
            let m = err(&set(18, huge));
            assert!(
                m.contains("more than any file holds") || m.contains("need"),
                "{m}"
            );
            let m = err(&set(26, huge));
            assert!(
                m.contains("more than any file holds") || m.contains("need"),
                "{m}"
            );
        }
        assert!(err(&set(18, 4)).contains("need"));
        assert!(err(&good[..good.len() - 1]).contains("truncated"));
        assert!(err(&good[..20]).contains("too short"));
        let lens = HEADER_LEN;
        let ptrs = lens + 12;
        let docs = ptrs + 24;
        let mut neg = good.clone();
        neg[lens + 4..lens + 8].copy_from_slice(&(-1i32).to_le_bytes());
        assert!(err(&neg).contains("negative length -1"));
        assert!(err(&set(ptrs + 8, 7)).contains("pointer 1 is 7, lengths say 6"));
        assert!(err(&set(docs, 1)).contains("start with 0"));
        assert!(err(&set(docs + 8, 4)).contains("out of order or range"));
        let b = index(TokenType::U16, &[1, 1, 1], &[0, 2, 1, 3]);
        assert!(err(&b).contains("document index 2 = 1 is out of order"));
        let b = index(TokenType::U16, &[1, 1, 1], &[0, 2]);
        assert!(err(&b).contains("last document index is 2, not the sequence count 3"));
    }

    #[test]
    fn property_corrupted_indexes_never_panic() {
        let good = index(TokenType::I32, &[3, 0, 5, 2, 9], &[0, 2, 3, 5]);
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut b = good.clone();
            let at = (x % b.len() as u64) as usize;
            b[at] = (x >> 32) as u8;
            if x & 1 == 0 {
                b.truncate(((x >> 8) % (b.len() as u64 + 1)) as usize);
            }
            if let Ok(i) = Index::parse(Path::new("x.idx"), &b) {
                // What parses is consistent: every sequence lies inside data_bytes.
                for s in 0..i.sequences {
                    let end = i.pointer(s) + i.length(s) as u64 * i.dtype.size() as u64;
                    assert!(end <= i.data_bytes());
                }
                assert_eq!(i.doc_index(i.doc_entries - 1), i.sequences as u64);
            }
        }
    }

    #[test]
    fn token_ids_are_checked_on_read() {
        assert_eq!(TokenType::I32.get_checked(&(-1i32).to_le_bytes()), Err(-1));
        assert_eq!(
            TokenType::I64.get_checked(&(1i64 << 32).to_le_bytes()),
            Err(1 << 32)
        );
        assert_eq!(TokenType::I8.get_checked(&[0xff]), Err(-1));
        assert_eq!(TokenType::U16.get_checked(&[0xff, 0xff]), Ok(65535));
        assert_eq!(
            TokenType::I64.get_checked(&(u32::MAX as i64).to_le_bytes()),
            Ok(u32::MAX)
        );
    }
}
