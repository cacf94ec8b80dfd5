//! Megatron-LM checkpoints whose rank files lie: a tensor view outside its storage, an empty
//! weight, a rank file copied over another, untrusted parallel degrees, rank files that
//! disagree on the model. Each is refused with an error naming the file (and the tensor), and
//! nothing is written. The rank files are written by bridgeflow from megatron-core's TP=2
//! fixture, then edited here: their `data.pkl` changed opcode by opcode and the archive
//! rebuilt (STORED records, CRC-32s recomputed, so the CRC checks pass and the reader's own
//! checks are what refuse them).

use bridgeflow_tests::*;
use std::path::{Path, PathBuf};

/// torch_dist fixture → Megatron-LM checkpoint at `out` with `layout`.
fn legacy(dir: &Path, out: &Path, layout: &str) {
    let p = read_write(
        "torch-dist",
        &format!(
            "{}, split_layers = true",
            path_cfg(&fixtures().join("mcore/tp2"))
        ),
        "megatron-lm",
        &format!("{}, {layout}", path_cfg(out)),
    );
    run_text(dir, &p, &[], 1 << 30).unwrap();
}

/// Reads the checkpoint into one safetensors file: the error, after checking nothing is left.
fn read_err(dir: &Path, ckpt: &Path, tag: &str) -> String {
    let out = dir.join(format!("{tag}.safetensors"));
    let p = read_write(
        "megatron-lm",
        &path_cfg(ckpt),
        "safetensors",
        &path_cfg(&out),
    );
    let e = match run_text(dir, &p, &[], 1 << 30) {
        Ok(_) => panic!("{tag}: read without an error"),
        Err(e) => e,
    };
    eprintln!("{tag}: {e}");
    assert!(!out.exists(), "{tag}: output left behind");
    assert!(leftovers(dir).is_empty(), "{tag}: {:?}", leftovers(dir));
    e
}

fn rank_file(ckpt: &Path, rank: &str) -> PathBuf {
    ckpt.join("iter_0000000")
        .join(rank)
        .join("model_optim_rng.pt")
}

// ------------------------------------------------------------------------- a tiny zip editor

fn crc32(data: &[u8]) -> u32 {
    let mut table = [0u32; 256];
    for (i, t) in table.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
        *t = c;
    }
    let mut c = !0u32;
    for &b in data {
        c = table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

fn u16_at(b: &[u8], i: usize) -> usize {
    u16::from_le_bytes([b[i], b[i + 1]]) as usize
}
fn u32_at(b: &[u8], i: usize) -> usize {
    u32::from_le_bytes(b[i..i + 4].try_into().unwrap()) as usize
}

/// The records (name, bytes) of a small STORED zip, in order.
fn unzip(b: &[u8]) -> Vec<(String, Vec<u8>)> {
    let eocd = (0..=b.len() - 22)
        .rev()
        .find(|&i| &b[i..i + 4] == b"PK\x05\x06")
        .unwrap();
    let (count, mut p) = (u16_at(b, eocd + 10), u32_at(b, eocd + 16));
    let mut out = Vec::new();
    for _ in 0..count {
        assert_eq!(&b[p..p + 4], b"PK\x01\x02");
        let size = u32_at(b, p + 20);
        let (n, x, c) = (u16_at(b, p + 28), u16_at(b, p + 30), u16_at(b, p + 32));
        let name = String::from_utf8(b[p + 46..p + 46 + n].to_vec()).unwrap();
        let l = u32_at(b, p + 42);
        let data = l + 30 + u16_at(b, l + 26) + u16_at(b, l + 28);
        out.push((name, b[data..data + size].to_vec()));
        p += 46 + n + x + c;
    }
    out
}

/// A STORED zip of `records`, each payload 64-byte aligned (as torch.save's).
fn zip(records: &[(String, Vec<u8>)]) -> Vec<u8> {
    let (mut out, mut central) = (Vec::new(), Vec::new());
    for (name, data) in records {
        let at = out.len();
        let pad = (64 - (at + 30 + name.len() + 4) % 64) % 64;
        let crc = crc32(data);
        let header = |sig: &[u8], central: bool| {
            let mut h = sig.to_vec();
            if central {
                h.extend_from_slice(&20u16.to_le_bytes());
            }
            h.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            h.extend_from_slice(&crc.to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(name.len() as u16).to_le_bytes());
            h
        };
        out.extend(header(b"PK\x03\x04", false));
        out.extend_from_slice(&((pad + 4) as u16).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&[0xFB, 0x00]);
        out.extend_from_slice(&(pad as u16).to_le_bytes());
        out.extend(std::iter::repeat_n(b'Z', pad));
        out.extend_from_slice(data);
        central.extend(header(b"PK\x01\x02", true));
        central.extend_from_slice(&[0; 8]); // extra, comment, disk, internal attributes
        central.extend_from_slice(&0u32.to_le_bytes()); // external attributes
        central.extend_from_slice(&(at as u32).to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let cd = out.len();
    out.extend_from_slice(&central);
    out.extend_from_slice(b"PK\x05\x06\0\0\0\0");
    let n = (records.len() as u16).to_le_bytes();
    out.extend_from_slice(&[n[0], n[1], n[0], n[1]]);
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&(cd as u32).to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out
}

/// Rewrites the `data.pkl` of the archive at `path` with `f`.
fn edit_pickle(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut records = unzip(&std::fs::read(path).unwrap());
    let pkl = records
        .iter_mut()
        .find(|(n, _)| n.ends_with("/data.pkl"))
        .expect("data.pkl");
    let before = pkl.1.clone();
    f(&mut pkl.1);
    assert_ne!(before, pkl.1, "the edit changed nothing");
    std::fs::write(path, zip(&records)).unwrap();
}

// ---------------------------------------------------------------------- a tiny pickle editor

/// Where the value after the pickled string `s` (BINUNICODE, then its BINPUT) starts.
fn after_str(pkl: &[u8], s: &str) -> usize {
    let mut needle = vec![b'X'];
    needle.extend_from_slice(&(s.len() as u32).to_le_bytes());
    needle.extend_from_slice(s.as_bytes());
    let at = pkl
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("'{s}' not in the pickle"));
    let i = at + needle.len();
    match pkl[i] {
        b'q' => i + 2,
        b'r' => i + 5,
        _ => i,
    }
}

/// The length of the integer opcode at `i` (BININT1, BININT2, BININT, LONG1).
fn int_len(pkl: &[u8], i: usize) -> usize {
    match pkl[i] {
        b'K' => 2,
        b'M' => 3,
        b'J' => 5,
        0x8a => 2 + pkl[i + 1] as usize,
        op => panic!("no integer at {i} (opcode {op:#x})"),
    }
}

/// A pickled integer as the writer's Pickler writes it.
fn int_op(v: i64) -> Vec<u8> {
    if (0..256).contains(&v) {
        vec![b'K', v as u8]
    } else if let Ok(x) = i32::try_from(v) {
        let mut b = vec![b'J'];
        b.extend_from_slice(&x.to_le_bytes());
        b
    } else {
        let mut b = vec![0x8a, 8];
        b.extend_from_slice(&v.to_le_bytes());
        b
    }
}

/// Replaces the integer at `i` with `v`.
fn set_int(pkl: &mut Vec<u8>, i: usize, v: i64) {
    let n = int_len(pkl, i);
    pkl.splice(i..i + n, int_op(v));
}

/// The integer value at `i`.
fn int_at(pkl: &[u8], i: usize) -> i64 {
    match pkl[i] {
        b'K' => pkl[i + 1] as i64,
        b'M' => u16::from_le_bytes([pkl[i + 1], pkl[i + 2]]) as i64,
        b'J' => i32::from_le_bytes(pkl[i + 1..i + 5].try_into().unwrap()) as i64,
        op => panic!("int opcode {op:#x}"),
    }
}

/// The argument `k` of the run's args (an integer) set to `v`.
fn set_arg(pkl: &mut Vec<u8>, k: &str, v: i64) {
    let i = after_str(pkl, k);
    set_int(pkl, i, v);
}

/// For the tensor stored under `key`: where its storage offset, and its 1-D size and stride,
/// are: `_rebuild_tensor_v2(storage (BINPERSID), offset, (n,), (1,), ...)`.
fn view_of(pkl: &[u8], key: &str) -> (usize, usize, usize) {
    let from = after_str(pkl, key);
    let q = from
        + pkl[from..]
            .windows(3)
            .position(|w| w == b"QK\x00")
            .expect("BINPERSID then offset 0");
    let offset = q + 1;
    let size = offset + 2;
    let mut i = size + int_len(pkl, size);
    assert_eq!(pkl[i], 0x85, "'{key}' is not 1-D");
    i += if pkl[i + 1] == b'q' { 3 } else { 6 };
    (offset, size, i)
}

const NORM: &str = "decoder.final_layernorm.weight";

/// A tensor view outside its storage record (offset -1, offset past the end), an empty
/// weight, a non-contiguous stride: each named with its file and tensor, nothing written.
#[test]
fn hostile_tensor_views_are_named() {
    let dir = tempdir();
    type Edit = fn(&mut Vec<u8>);
    let cases: [(&str, Edit, &str); 5] = [
        (
            "offset-1",
            |p| {
                let (o, _, _) = view_of(p, NORM);
                set_int(p, o, -1)
            },
            "storage offset -1 is negative",
        ),
        (
            "offset-past",
            |p| {
                let (o, _, _) = view_of(p, NORM);
                set_int(p, o, 5)
            },
            "lie outside its storage",
        ),
        (
            "empty",
            |p| {
                let (_, s, _) = view_of(p, NORM);
                set_int(p, s, 0)
            },
            "empty (size [0])",
        ),
        (
            "strided",
            |p| {
                let (_, _, st) = view_of(p, NORM);
                set_int(p, st, 2)
            },
            "non-contiguous",
        ),
        (
            "negative-size",
            |p| {
                let (_, s, _) = view_of(p, NORM);
                set_int(p, s, -64)
            },
            "negative",
        ),
    ];
    for (tag, edit, want) in cases {
        let ckpt = dir.path().join(tag);
        legacy(dir.path(), &ckpt, "tp = 2");
        edit_pickle(&rank_file(&ckpt, "mp_rank_01"), edit);
        let e = read_err(dir.path(), &ckpt, tag);
        assert!(
            e.contains("mp_rank_01/model_optim_rng.pt")
                && e.contains(&format!("tensor '{NORM}'"))
                && e.contains(want),
            "{tag}: {e}"
        );
    }
}

/// Rank 1's file a byte copy of rank 0's (every shape fits): refused, both files named. The
/// same for a TP2·PP2 checkpoint whose last stage is a copy of the first.
#[test]
fn a_rank_file_copied_over_another_is_refused() {
    let dir = tempdir();
    let ckpt = dir.path().join("tp2");
    legacy(dir.path(), &ckpt, "tp = 2");
    std::fs::copy(
        rank_file(&ckpt, "mp_rank_00"),
        rank_file(&ckpt, "mp_rank_01"),
    )
    .unwrap();
    let e = read_err(dir.path(), &ckpt, "copy");
    assert!(
        e.contains("identical shards")
            && e.contains("mp_rank_00/model_optim_rng.pt")
            && e.contains("mp_rank_01/model_optim_rng.pt"),
        "{e}"
    );

    let ckpt = dir.path().join("tp2pp2");
    legacy(dir.path(), &ckpt, "tp = 2, pp = 2");
    std::fs::copy(
        rank_file(&ckpt, "mp_rank_01_000"),
        rank_file(&ckpt, "mp_rank_01_001"),
    )
    .unwrap();
    let e = read_err(dir.path(), &ckpt, "stage-copy");
    assert!(
        e.contains("mp_rank_01_000/model_optim_rng.pt")
            && e.contains("mp_rank_01_001/model_optim_rng.pt")
            && e.contains("copy"),
        "{e}"
    );
}

/// A parallel degree of 2^32 (which once aborted on a 32 GiB allocation), a degree the rank
/// folders do not fit, and one with files missing: named, with the file stating it.
#[test]
fn untrusted_parallel_degrees_are_bounded() {
    let dir = tempdir();
    let cases: [(&str, &str, i64, &str); 4] = [
        (
            "pp-huge",
            "pipeline_model_parallel_size",
            1 << 32,
            "args.pipeline_model_parallel_size = 4294967296: not a parallel degree",
        ),
        (
            "tp-negative",
            "tensor_model_parallel_size",
            -2,
            "args.tensor_model_parallel_size = -2: not a parallel degree",
        ),
        // TP 1 while two rank folders are there.
        (
            "tp-1",
            "tensor_model_parallel_size",
            1,
            "2 rank folders, but",
        ),
        (
            "pp-2",
            "pipeline_model_parallel_size",
            2,
            "mp_rank_00_000/model_optim_rng.pt: missing",
        ),
    ];
    for (tag, arg, v, want) in cases {
        let ckpt = dir.path().join(tag);
        legacy(dir.path(), &ckpt, "tp = 2");
        edit_pickle(&rank_file(&ckpt, "mp_rank_00"), |p| set_arg(p, arg, v));
        let e = read_err(dir.path(), &ckpt, tag);
        assert!(e.contains(want), "{tag}: {e}");
        if tag != "pp-2" {
            assert!(e.contains("mp_rank_00/model_optim_rng.pt"), "{tag}: {e}");
        }
    }
}

/// Rank files that disagree on the model (num_layers, hidden_size) or on the split (a huge
/// pipeline size only in rank 1): the disagreeing file and the argument named.
#[test]
fn args_must_agree_across_ranks() {
    let dir = tempdir();
    for (tag, arg) in [
        ("layers", "num_layers"),
        ("pp", "pipeline_model_parallel_size"),
        ("padded-vocab", "padded_vocab_size"),
    ] {
        let ckpt = dir.path().join(tag);
        legacy(dir.path(), &ckpt, "tp = 2");
        edit_pickle(&rank_file(&ckpt, "mp_rank_01"), |p| {
            let i = after_str(p, arg);
            let v = int_at(p, i);
            set_int(p, i, if tag == "pp" { 1 << 32 } else { v + 1 })
        });
        let e = read_err(dir.path(), &ckpt, tag);
        assert!(
            e.contains("mp_rank_01/model_optim_rng.pt")
                && e.contains(&format!("args.{arg} = "))
                && e.contains("mp_rank_00/model_optim_rng.pt"),
            "{tag}: {e}"
        );
    }
}

/// An untouched copy reads (the editor and the checks leave real checkpoints alone), and one
/// whose pickle is only re-zipped by the editor reads the same tensors.
#[test]
fn unedited_checkpoints_still_read() {
    let dir = tempdir();
    let ckpt = dir.path().join("tp2");
    legacy(dir.path(), &ckpt, "tp = 2");
    let read = |tag: &str| {
        let out = dir.path().join(format!("{tag}.safetensors"));
        let p = read_write(
            "megatron-lm",
            &path_cfg(&ckpt),
            "safetensors",
            &path_cfg(&out),
        );
        run_text(dir.path(), &p, &[], 1 << 30).unwrap();
        load_tensors(&out)
    };
    let a = read("a");
    let f = rank_file(&ckpt, "mp_rank_01");
    let records = unzip(&std::fs::read(&f).unwrap());
    std::fs::write(&f, zip(&records)).unwrap();
    assert!(!a.is_empty());
    assert_eq!(read("b"), a);
}
