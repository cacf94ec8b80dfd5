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
        let dtype = TokenType::from_code(b[17])
            .ok_or_else(|| bad(format!("unknown dtype code {}", b[17])))?;
        let sequences = u64::from_le_bytes(b[18..26].try_into().unwrap()) as usize;
        let doc_entries = u64::from_le_bytes(b[26..34].try_into().unwrap()) as usize;
        let want = sequences
            .checked_mul(12)
            .and_then(|x| x.checked_add(doc_entries.checked_mul(8)?))
            .and_then(|x| x.checked_add(HEADER_LEN))
            .ok_or_else(|| bad("counts overflow".into()))?;
        if b.len() != want {
            return Err(bad(format!(
                "{} bytes, but {sequences} sequences and {doc_entries} document entries need {want} (truncated, or a multimodal index)",
                b.len()
            )));
        }
        let l_end = HEADER_LEN + 4 * sequences;
        let p_end = l_end + 8 * sequences;
        let idx = Index {
            dtype,
            sequences,
            doc_entries,
            lengths: &b[HEADER_LEN..l_end],
            pointers: &b[l_end..p_end],
            docs: &b[p_end..],
        };
        if doc_entries == 0 || idx.doc_index(0) != 0 {
            return Err(bad("document indices must start with 0".into()));
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
            ptr += len as u64 * dtype.size() as u64;
        }
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
        (0..self.sequences)
            .map(|i| self.length(i) as u64)
            .sum::<u64>()
            * self.dtype.size() as u64
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
