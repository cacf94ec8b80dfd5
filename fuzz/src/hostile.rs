//! Hand-made hostile inputs, one family per way a small file can make a parser do unbounded
//! work: what random mutation would take long to stumble on. `bridgeflow-fuzz --hostile` runs
//! each on its target; those a parser handles are fuzz seeds too (`hostile_seeds`), and those
//! it does not are findings (see fuzz/README.md), moved into the seeds once fixed.

/// A hostile input: its target, what it is, its bytes.
pub struct Hostile {
    pub target: &'static str,
    pub name: &'static str,
    pub about: &'static str,
    /// Handled by its parser now (refused in bounded time and memory): a seed of its target.
    /// Set it when the finding is fixed.
    pub handled: bool,
    pub bytes: Vec<u8>,
}

/// The hostile inputs of `target` its parser handles: seeds (the regression corpus in code).
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    all()
        .into_iter()
        .filter(|h| h.target == target && h.handled)
        .map(|h| h.bytes)
        .collect()
}

pub fn all() -> Vec<Hostile> {
    vec![
        Hostile {
            target: "run-config-yaml",
            name: "yaml-alias-depth",
            about: "24 anchors, each a 127-deep nest around an alias of the one before: every \
                    document nests < 128 deep, expanded they nest 3048 deep (6.4 KB)",
            handled: true,
            bytes: yaml_alias_chain(24, 127),
        },
        Hostile {
            target: "run-config-yaml",
            name: "yaml-alias-bomb",
            about: "nine levels of ten aliases each (10^9 nodes from ~400 bytes)",
            handled: true,
            bytes: yaml_alias_bomb(9),
        },
        Hostile {
            target: "dcp-metadata",
            name: "metadata-shared-chunks",
            about: "2000 tensors sharing one memoized TensorStorageMetadata whose chunk list \
                    holds one memoized chunk 100000 times: 2e8 chunks from a 315 KB .metadata",
            handled: true,
            bytes: metadata_fanout(2000, 100_000, gemma_distcp_len()),
        },
        Hostile {
            target: "dcp-metadata",
            name: "metadata-wide-index",
            about: "one memoized MetadataIndex with 40000 junk fields before `fqn`, the key \
                    of 60000 storage_data entries: each field look-up scans them (2.4e9 string \
                    compares from 589 KB)",
            handled: true,
            bytes: metadata_wide_index(60_000, 40_000, gemma_distcp_len()),
        },
        Hostile {
            target: "dcp-metadata",
            name: "metadata-huge-chunked",
            about: "a bf16 tensor of [2^20, 2^20] (2 TiB) stored as two chunks whose items tile \
                    the data file: the reader sizes its output before reading a chunk",
            handled: true,
            bytes: metadata_of(
                &[Tensor {
                    name: "t".into(),
                    size: vec![1 << 20, 1 << 20],
                    chunks: vec![
                        (vec![0, 0], vec![1 << 19, 1 << 20]),
                        (vec![1 << 19, 0], vec![1 << 19, 1 << 20]),
                    ],
                }],
                gemma_distcp_len(),
            ),
        },
        Hostile {
            target: "dcp-metadata",
            name: "metadata-huge-stack",
            about: "a stacked decoder.layers tensor of 2^40 layers in one chunk, planned with \
                    split_layers (the dcp-metadata target sets it on every other input, the \
                    first included)",
            handled: true,
            bytes: metadata_of(
                &[Tensor {
                    name: "decoder.layers.mlp.linear_fc1.weight".into(),
                    size: vec![1 << 40, 1],
                    chunks: vec![(vec![0, 0], vec![1 << 40, 1])],
                }],
                gemma_distcp_len(),
            ),
        },
        Hostile {
            target: "pipeline-toml",
            name: "toml-var-repeat",
            about: "a 256 KiB variable referenced 100000 times in one config string: 26 GB \
                    from a 660 KB pipeline file",
            handled: true,
            bytes: toml_var_repeat(256 << 10, 100_000),
        },
        Hostile {
            target: "pipeline-toml",
            name: "toml-var-array",
            about: "a 256 KiB variable as 100000 whole-string references in an array (each a \
                    copy of the value)",
            handled: true,
            bytes: toml_var_array(256 << 10, 100_000),
        },
    ]
}

/// `k` anchors `aI: &aI [[[ ... *a(I-1) ... ]]]`, each `depth` deep.
pub fn yaml_alias_chain(k: usize, depth: usize) -> Vec<u8> {
    let mut s = String::new();
    for i in 0..k {
        let inner = if i == 0 {
            "1".to_string()
        } else {
            format!("*a{}", i - 1)
        };
        s.push_str(&format!(
            "a{i}: &a{i} {}{inner}{}\n",
            "[".repeat(depth),
            "]".repeat(depth)
        ));
    }
    s.into_bytes()
}

/// The classic: each level a list of ten aliases of the level before.
pub fn yaml_alias_bomb(levels: usize) -> Vec<u8> {
    let mut s = String::from(
        "a0: &a0 [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    for i in 1..levels {
        let refs = vec![format!("*a{}", i - 1); 10].join(",");
        s.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    s.into_bytes()
}

/// A pipeline whose one config string repeats a large variable `times` times.
pub fn toml_var_repeat(len: usize, times: usize) -> Vec<u8> {
    format!(
        "[vars]\nv = \"{}\"\n\n[stages.read]\nplugin = \"jsonl\"\nkind = \"reader\"\nconfig = {{ path = \"{}\" }}\n",
        "A".repeat(len),
        "${v}".repeat(times)
    )
    .into_bytes()
}

/// A pipeline whose config array holds `times` whole references to a large variable.
pub fn toml_var_array(len: usize, times: usize) -> Vec<u8> {
    format!(
        "[vars]\nv = \"{}\"\n\n[stages.read]\nplugin = \"jsonl\"\nkind = \"reader\"\nconfig = {{ path = [{}] }}\n",
        "A".repeat(len),
        vec!["\"${v}\""; times].join(",")
    )
    .into_bytes()
}

/// A raw protocol-4 pickle writer with explicit memo indices (MEMOIZE, BINGET / LONG_BINGET).
struct Raw {
    out: Vec<u8>,
    memo: u32,
}

impl Raw {
    fn new() -> Raw {
        Raw {
            out: vec![0x80, 4],
            memo: 0,
        }
    }
    /// MEMOIZE the top of the stack: its index.
    fn memoize(&mut self) -> u32 {
        self.out.push(0x94);
        self.memo += 1;
        self.memo - 1
    }
    fn get(&mut self, i: u32) {
        if i < 256 {
            self.out.extend_from_slice(&[b'h', i as u8]);
        } else {
            self.out.push(b'j');
            self.out.extend_from_slice(&i.to_le_bytes());
        }
    }
    fn str(&mut self, s: &str) {
        if s.len() < 256 {
            self.out.extend_from_slice(&[0x8c, s.len() as u8]);
        } else {
            self.out.push(b'X');
            self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        }
        self.out.extend_from_slice(s.as_bytes());
    }
    fn int(&mut self, v: u32) {
        self.out.push(b'J');
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    fn op(&mut self, b: &[u8]) {
        self.out.extend_from_slice(b);
    }
    /// STACK_GLOBAL of module.name, memoized: its index.
    fn global(&mut self, module: &str, name: &str) -> u32 {
        self.str(module);
        self.str(name);
        self.op(&[0x93]);
        self.memoize()
    }
    /// `cls()` via NEWOBJ, then `{...}` BUILD with `fields` written by `f`.
    fn object(&mut self, cls: u32, f: impl FnOnce(&mut Raw)) {
        self.get(cls);
        self.op(b")\x81}(");
        f(self);
        self.op(b"ub");
    }
    /// torch.Size((dims...)).
    fn size(&mut self, size_cls: u32, dims: &[u32]) {
        self.get(size_cls);
        self.op(b"(");
        for &d in dims {
            self.int(d);
        }
        self.op(b"t\x85R");
    }
}

const DCP: &str = "torch.distributed.checkpoint.metadata";

/// The classes a tensor `.metadata` refers to, each a memoized global.
struct Classes {
    meta: u32,
    tsm: u32,
    props: u32,
    chunk: u32,
    index: u32,
    info: u32,
    size: u32,
    bf16: u32,
    layout: u32,
    mem: u32,
}

impl Classes {
    fn new(p: &mut Raw) -> Classes {
        Classes {
            meta: p.global(DCP, "Metadata"),
            tsm: p.global(DCP, "TensorStorageMetadata"),
            props: p.global(DCP, "TensorProperties"),
            chunk: p.global(DCP, "ChunkStorageMetadata"),
            index: p.global(DCP, "MetadataIndex"),
            info: p.global("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
            size: p.global("torch", "Size"),
            bf16: p.global("torch", "bfloat16"),
            layout: p.global("torch.serialization", "_get_layout"),
            mem: p.global(DCP, "_MEM_FORMAT_ENCODING"),
        }
    }
}

impl Raw {
    /// A TensorStorageMetadata's `properties` field: bf16, strided, contiguous.
    fn bf16_properties(&mut self, c: &Classes) {
        self.str("properties");
        self.get(c.props);
        self.op(b")\x81(");
        self.get(c.bf16);
        self.get(c.layout);
        self.str("torch.strided");
        self.op(b"\x85R\x89");
        self.get(c.mem);
        self.op(b"K\x00\x85R\x89");
        self.op(b"tb");
    }
    /// A `_StorageInfo` (class `info`): bytes `offset..offset + length` of `__0_0.distcp`.
    fn storage_info(&mut self, info: u32, offset: u32, length: u32) {
        self.object(info, |p| {
            p.str("relative_path");
            p.str("__0_0.distcp");
            p.str("offset");
            p.int(offset);
            p.str("length");
            p.int(length);
        });
    }
}

/// The length of the data file the dcp-metadata target puts beside each `.metadata`.
pub fn gemma_distcp_len() -> u32 {
    std::fs::metadata(
        crate::targets::root().join("tests/fixtures/bridge/gemma/iter_0000000/__0_0.distcp"),
    )
    .map_or(0, |m| m.len() as u32)
}

/// A `.metadata` whose `n` tensors (`t0..`) all share one memoized TensorStorageMetadata of
/// size `[m]` whose chunk list is one memoized `[1]` chunk at `[0]` repeated `m` times: every
/// chunk has storage (`t0`'s item the whole `__0_0.distcp` of `file_len` bytes, the others'
/// one shared empty item at its end: they tile it) and read_metadata's element count check
/// holds (m chunks of 1 element = m).
pub fn metadata_fanout(n: usize, m: usize, file_len: u32) -> Vec<u8> {
    let mut p = Raw::new();
    let c = Classes::new(&mut p);
    let (meta, tsm, chunk, index, size) = (c.meta, c.tsm, c.chunk, c.index, c.size);
    p.object(meta, |p| {
        p.str("state_dict_metadata");
        p.op(b"}(");
        let mut shared = None;
        for i in 0..n {
            p.str(&format!("t{i}"));
            match shared {
                Some(s) => p.get(s),
                None => {
                    p.object(tsm, |p| {
                        p.bf16_properties(&c);
                        p.str("size");
                        p.size(size, &[m as u32]);
                        p.str("chunks");
                        p.op(b"](");
                        let mut c = None;
                        for _ in 0..m {
                            match c {
                                Some(c) => p.get(c),
                                None => {
                                    p.object(chunk, |p| {
                                        p.str("offsets");
                                        p.size(size, &[0]);
                                        p.str("sizes");
                                        p.size(size, &[1]);
                                    });
                                    c = Some(p.memoize());
                                }
                            }
                        }
                        p.op(b"e");
                    });
                    shared = Some(p.memoize());
                }
            }
        }
        p.op(b"u");
        p.str("planner_data");
        p.op(b"N");
        p.str("storage_data");
        p.op(b"}(");
        let mut storage = None;
        for i in 0..n {
            p.object(index, |p| {
                p.str("fqn");
                p.str(&format!("t{i}"));
                p.str("offset");
                p.size(size, &[0]);
                p.str("index");
                p.op(b"N");
            });
            match storage {
                _ if i == 0 => p.storage_info(c.info, 0, file_len),
                Some(s) => p.get(s),
                None => {
                    p.storage_info(c.info, file_len, 0);
                    storage = Some(p.memoize());
                }
            }
        }
        p.op(b"u");
        p.str("version");
        p.str("1.0.0");
    });
    p.op(b".");
    p.out
}

/// A `.metadata` whose storage_data has `n` entries keyed by one memoized MetadataIndex whose
/// field dict holds `junk` other fields before `fqn` (and one _StorageInfo covering the data
/// file); state_dict_metadata is one tensor-less bytes entry.
pub fn metadata_wide_index(n: usize, junk: usize, file_len: u32) -> Vec<u8> {
    let mut p = Raw::new();
    let meta = p.global(DCP, "Metadata");
    let bytes = p.global(DCP, "BytesStorageMetadata");
    let index = p.global(DCP, "MetadataIndex");
    let info = p.global("torch.distributed.checkpoint.filesystem", "_StorageInfo");
    p.object(meta, |p| {
        p.str("state_dict_metadata");
        p.op(b"}(");
        p.str("k");
        p.get(bytes);
        p.op(b")\x81");
        p.op(b"u");
        p.str("planner_data");
        p.op(b"N");
        p.str("storage_data");
        p.op(b"}(");
        let (mut key, mut value) = (None, None);
        for _ in 0..n {
            match key {
                Some(k) => p.get(k),
                None => {
                    p.object(index, |p| {
                        for j in 0..junk {
                            p.str(&format!("j{j}"));
                            p.op(b"N");
                        }
                        p.str("fqn");
                        p.str("k");
                        p.str("offset");
                        p.op(b"N");
                    });
                    key = Some(p.memoize());
                }
            }
            match value {
                Some(v) => p.get(v),
                None => {
                    p.storage_info(info, 0, file_len);
                    value = Some(p.memoize());
                }
            }
        }
        p.op(b"u");
        p.str("version");
        p.str("1.0.0");
    });
    p.op(b".");
    p.out
}

/// A tensor of a hand-made `.metadata`: its chunks as (offsets, sizes).
pub struct Tensor {
    pub name: String,
    pub size: Vec<u64>,
    pub chunks: Vec<(Vec<u64>, Vec<u64>)>,
}

/// A `.metadata` of bf16 `tensors`, their chunks' items splitting a data file of `file_len`
/// bytes in equal parts (so that they tile it).
pub fn metadata_of(tensors: &[Tensor], file_len: u32) -> Vec<u8> {
    let mut p = Raw::new();
    let c = Classes::new(&mut p);
    let (meta, tsm, chunk, index, size) = (c.meta, c.tsm, c.chunk, c.index, c.size);
    let long = |p: &mut Raw, v: u64| {
        p.op(&[0x8a, 8]);
        p.op(&v.to_le_bytes());
    };
    let big_size = |p: &mut Raw, dims: &[u64]| {
        p.get(size);
        p.op(b"(");
        for &d in dims {
            long(p, d);
        }
        p.op(b"t\x85R");
    };
    let n: usize = tensors.iter().map(|t| t.chunks.len()).sum();
    p.object(meta, |p| {
        p.str("state_dict_metadata");
        p.op(b"}(");
        for t in tensors {
            p.str(&t.name);
            p.object(tsm, |p| {
                p.bf16_properties(&c);
                p.str("size");
                big_size(p, &t.size);
                p.str("chunks");
                p.op(b"](");
                for (o, z) in &t.chunks {
                    p.object(chunk, |p| {
                        p.str("offsets");
                        big_size(p, o);
                        p.str("sizes");
                        big_size(p, z);
                    });
                }
                p.op(b"e");
            });
        }
        p.op(b"u");
        p.str("planner_data");
        p.op(b"N");
        p.str("storage_data");
        p.op(b"}(");
        let part = file_len / n.max(1) as u32;
        let mut k = 0u32;
        for t in tensors {
            for (o, _) in &t.chunks {
                p.object(index, |p| {
                    p.str("fqn");
                    p.str(&t.name);
                    p.str("offset");
                    big_size(p, o);
                    p.str("index");
                    p.op(b"N");
                });
                let len = if k as usize + 1 == n {
                    file_len - k * part
                } else {
                    part
                };
                p.storage_info(c.info, k * part, len);
                k += 1;
            }
        }
        p.op(b"u");
        p.str("version");
        p.str("1.0.0");
    });
    p.op(b".");
    p.out
}
