//! # Plan attributes
//!
//! A [`StreamPlan`] carries, beside its tensors, attributes: a JSON object (`StreamPlan::attrs`
//! on the wire, so the ABI stays one string). This module is the one documented list of the
//! keys bridgeflow's stages use, each a typed [`Attr`] constant, and typed accessors on
//! [`StreamPlan`]:
//!
//! ```
//! use bridgeflow_sdk::{attrs, StreamPlan};
//! use std::path::PathBuf;
//!
//! let mut plan = StreamPlan::default();
//! plan.set(attrs::FORMAT, "safetensors");
//! plan.set(attrs::SOURCE_DIR, PathBuf::from("/models/llama"));
//! assert_eq!(plan.get(attrs::SOURCE_DIR), Some(PathBuf::from("/models/llama")));
//! assert_eq!(plan.get(attrs::VOCAB_SIZE), None);
//! ```
//!
//! - [`StreamPlan::get`]: the value, or `None` when the key is absent *or* holds JSON of another
//!   type (what a stage that falls back to a default wants);
//! - [`StreamPlan::try_get`]: `Ok(None)` when absent, an error naming the key when present but
//!   ill-typed (for a stage that must not silently ignore a broken upstream);
//! - [`StreamPlan::set`]: replaces the key, keeping every other key (also ones not listed here).
//!
//! The JSON on the wire is what the untyped `set_attr` wrote: same keys, same values. Transforms
//! that start from `inputs[0].clone()` pass every attribute on; a stage that builds a fresh plan
//! starts with none.
//!
//! ## The keys
//!
//! | key | type | set by | read by |
//! |---|---|---|---|
//! | [`FORMAT`] `format` | `String` | readers: safetensors, torch_dist, Megatron-LM, megatron-indexed | `inspect` |
//! | [`SOURCE_DIR`] `source_dir` | `PathBuf` | safetensors reader, torch_dist reader, models mapper (to HF) | models mapper, safetensors writer, torch_dist writer |
//! | [`CHECKPOINT_DIR`] `checkpoint_dir` | `PathBuf` | torch_dist reader | models mapper (to HF), torch_dist writer |
//! | [`BYTE_OBJECTS`] `byte_objects` | `Vec<String>` | torch_dist reader | torch_dist writer |
//! | [`CHUNKS`] `chunks` | JSON object | torch_dist reader | `inspect` |
//! | [`MEGATRON_ARGS`] `megatron_args` | `BTreeMap<String, Value>` | Megatron-LM reader | `inspect` |
//! | [`MEGATRON_MODEL`] `megatron_model` | JSON object | models mapper (to Megatron) | torch_dist writer, Megatron-LM writer |
//! | [`RUN_CONFIG_YAML`] `run_config_yaml` | `String` | models mapper (to Megatron) | torch_dist writer |
//! | [`HF_CONFIG`] `hf_config` | JSON object | models mapper (to HF, config rebuilt), serving exporters | safetensors writer |
//! | [`FILES_BY_PREFIX`] `files_by_prefix` | `bool` | serving exporters (TensorRT-LLM, vLLM sharded) | safetensors writer |
//! | [`ARCHITECTURE`] `architecture` | `String` | models mapper (to Megatron) | `inspect` |
//! | [`DTYPE`] `dtype` | `String` | cast, fp8 dequantize | models mapper (to Megatron) |
//! | [`DROP_CONFIG_KEYS`] `drop_config_keys` | `Vec<String>` | fp8 / mxfp4 dequantize | safetensors writer, models mapper |
//! | [`CONFIG_UPDATES`] `config_updates` | JSON object | fp8 quantize, fp8-static | safetensors writer |
//! | [`EXTRA_FILES`] `extra_files` | JSON object | fp8-static | safetensors writer |
//! | [`JSON_KEYS`] `json_keys` | `Vec<String>` | jsonl, columnar and megatron-indexed readers, tokenize | megatron-indexed writer |
//! | [`INPUT_FILES`] `input_files` | `Vec<PathBuf>` | jsonl and columnar readers | `inspect` |
//! | [`INPUT_BYTES`] `input_bytes` | `u64` | jsonl reader | `inspect` |
//! | [`VOCAB_SIZE`] `vocab_size` | `u64` | tokenize, sft chat | megatron-indexed writer |
//! | [`EOD_ID`] `eod_id` | `u32` | tokenize, sft chat | sft pack |
//! | [`TOKEN_DTYPE`] `token_dtype` | `String` | megatron-indexed reader | megatron-indexed writer |
//! | [`DOCUMENTS`] `documents` | `u64` | megatron-indexed reader | `inspect` |
//! | [`SEQUENCES`] `sequences` | `u64` | megatron-indexed reader | `inspect` |
//! | [`TOKENS`] `tokens` | `u64` | megatron-indexed reader | `inspect` |
//! | [`LONGEST_DOCUMENT_TOKENS`] `longest_document_tokens` | `u64` | megatron-indexed reader | `inspect` |
//! | [`DOCUMENT_LENGTH_HISTOGRAM`] `document_length_histogram` | `BTreeMap<String, u64>` | megatron-indexed reader | `inspect` |
//!
//! `inspect` prints every attribute of a source's plan, listed or not.
//!
//! ## Keys of your own
//!
//! A plugin may define its own keys the same way (`pub const MY_KEY: Attr<u64> =
//! Attr::new("my_plugin.my_key");`); prefix them with the plugin's name so they cannot collide
//! with keys added here later. The value type must implement [`AttrValue`]: strings, paths,
//! integers, `bool`, `f64`, JSON values and objects, and `Vec`s and string-keyed `BTreeMap`s of
//! those do.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::error::{PluginError, Result};
use crate::stage::StreamPlan;

/// A plan attribute's key and the Rust type of its value.
pub struct Attr<T> {
    pub key: &'static str,
    _t: PhantomData<fn() -> T>,
}

impl<T> Attr<T> {
    pub const fn new(key: &'static str) -> Self {
        Attr {
            key,
            _t: PhantomData,
        }
    }
}

impl<T> Clone for Attr<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Attr<T> {}

impl<T> fmt::Debug for Attr<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Attr({})", self.key)
    }
}

/// A type a plan attribute can hold, and its JSON form on the wire.
pub trait AttrValue: Sized {
    /// The JSON form.
    fn to_json(&self) -> Value;
    /// The value, or `None` when `v` is JSON of another type.
    fn from_json(v: &Value) -> Option<Self>;
    /// What the JSON must be, in words, for error messages ("a string").
    fn expected() -> String;
}

impl AttrValue for String {
    fn to_json(&self) -> Value {
        Value::String(self.clone())
    }
    fn from_json(v: &Value) -> Option<Self> {
        v.as_str().map(str::to_owned)
    }
    fn expected() -> String {
        "a string".into()
    }
}

/// A path is a JSON string; one that is not UTF-8 is written lossily (as `set_attr` callers did
/// with `to_string_lossy`).
impl AttrValue for PathBuf {
    fn to_json(&self) -> Value {
        Value::String(self.to_string_lossy().into_owned())
    }
    fn from_json(v: &Value) -> Option<Self> {
        v.as_str().map(PathBuf::from)
    }
    fn expected() -> String {
        "a string (a path)".into()
    }
}

impl AttrValue for bool {
    fn to_json(&self) -> Value {
        Value::Bool(*self)
    }
    fn from_json(v: &Value) -> Option<Self> {
        v.as_bool()
    }
    fn expected() -> String {
        "a boolean".into()
    }
}

impl AttrValue for u64 {
    fn to_json(&self) -> Value {
        Value::from(*self)
    }
    fn from_json(v: &Value) -> Option<Self> {
        v.as_u64()
    }
    fn expected() -> String {
        "a non-negative integer".into()
    }
}

impl AttrValue for u32 {
    fn to_json(&self) -> Value {
        Value::from(*self)
    }
    fn from_json(v: &Value) -> Option<Self> {
        v.as_u64().and_then(|n| u32::try_from(n).ok())
    }
    fn expected() -> String {
        "an integer in 0..=4294967295".into()
    }
}

impl AttrValue for i64 {
    fn to_json(&self) -> Value {
        Value::from(*self)
    }
    fn from_json(v: &Value) -> Option<Self> {
        v.as_i64()
    }
    fn expected() -> String {
        "an integer".into()
    }
}

/// A float; NaN and the infinities (which JSON cannot hold) are written as `null`.
impl AttrValue for f64 {
    fn to_json(&self) -> Value {
        Value::from(*self)
    }
    fn from_json(v: &Value) -> Option<Self> {
        v.as_f64()
    }
    fn expected() -> String {
        "a number".into()
    }
}

/// Any JSON.
impl AttrValue for Value {
    fn to_json(&self) -> Value {
        self.clone()
    }
    fn from_json(v: &Value) -> Option<Self> {
        Some(v.clone())
    }
    fn expected() -> String {
        "any JSON".into()
    }
}

/// A JSON object, its fields untyped.
impl AttrValue for Map<String, Value> {
    fn to_json(&self) -> Value {
        Value::Object(self.clone())
    }
    fn from_json(v: &Value) -> Option<Self> {
        v.as_object().cloned()
    }
    fn expected() -> String {
        "an object".into()
    }
}

impl<T: AttrValue> AttrValue for Vec<T> {
    fn to_json(&self) -> Value {
        Value::Array(self.iter().map(T::to_json).collect())
    }
    fn from_json(v: &Value) -> Option<Self> {
        v.as_array()?.iter().map(T::from_json).collect()
    }
    fn expected() -> String {
        format!("an array, each element {}", T::expected())
    }
}

/// A JSON object whose values all have one type.
impl<T: AttrValue> AttrValue for BTreeMap<String, T> {
    fn to_json(&self) -> Value {
        Value::Object(self.iter().map(|(k, v)| (k.clone(), v.to_json())).collect())
    }
    fn from_json(v: &Value) -> Option<Self> {
        v.as_object()?
            .iter()
            .map(|(k, v)| Some((k.clone(), T::from_json(v)?)))
            .collect()
    }
    fn expected() -> String {
        format!("an object, each value {}", T::expected())
    }
}

/// Typed access to a plan's attributes (see the [module docs](self)).
impl StreamPlan {
    /// The attribute's value; `None` when absent or when it holds JSON of another type (and
    /// when the attributes do not parse as a JSON object, as with [`StreamPlan::attrs`]).
    pub fn get<T: AttrValue>(&self, a: Attr<T>) -> Option<T> {
        self.attrs().get(a.key).and_then(T::from_json)
    }

    /// The attribute's value, `Ok(None)` when absent; a format error naming the key when it
    /// is present but holds JSON of another type.
    pub fn try_get<T: AttrValue>(&self, a: Attr<T>) -> Result<Option<T>> {
        match self.attrs().get(a.key) {
            None => Ok(None),
            Some(v) => match T::from_json(v) {
                Some(t) => Ok(Some(t)),
                None => Err(PluginError::format(format!(
                    "stream plan attribute '{}': expected {}, got {}",
                    a.key,
                    T::expected(),
                    brief(v)
                ))),
            },
        }
    }

    /// Sets the attribute, replacing its old value and keeping every other key.
    pub fn set<T: AttrValue>(&mut self, a: Attr<T>, v: impl Into<T>) {
        self.set_attr(a.key, v.into().to_json());
    }
}

/// `v` for an error message: its JSON, cut short.
fn brief(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(60) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

/// The format the source read: `"safetensors"`, `"torch_dist"`, `"megatron-lm"` or
/// `"megatron-indexed"`. Set by those readers; shown by `inspect`.
pub const FORMAT: Attr<String> = Attr::new("format");

/// The directory holding the HF `config.json` and tokenizer files of the stream: the
/// safetensors reader's input directory, the torch_dist reader's `tokenizer/` (when the
/// checkpoint has one), or the folder of the models mapper's `hf_config` (to HF). Read by the
/// models mapper (the HF config beside the input; Megatron-Bridge's `hf_model_id`), the
/// safetensors writer (side files to copy) and the torch_dist writer (tokenizer files to copy).
pub const SOURCE_DIR: Attr<PathBuf> = Attr::new("source_dir");

/// The torch_dist checkpoint directory (the one holding `.metadata`) the stream was read from.
/// Set by the torch_dist reader; read by the models mapper (its `run_config.yaml`, to rebuild
/// the HF config on export) and the torch_dist writer (the run config carried over when
/// re-sharding).
pub const CHECKPOINT_DIR: Attr<PathBuf> = Attr::new("checkpoint_dir");

/// The keys of the checkpoint's byte objects (pickled extra state), in its order. Set by the
/// torch_dist reader; read by the torch_dist writer (which byte objects to write, unless
/// configured).
pub const BYTE_OBJECTS: Attr<Vec<String>> = Attr::new("byte_objects");

/// How each tensor of a torch_dist checkpoint is stored: by tensor key, a list of
/// `{"offsets": [u64], "sizes": [u64], "file": string}`. Set by the torch_dist reader; shown by
/// `inspect` (and checked against megatron-core's layout by tests).
pub const CHUNKS: Attr<Map<String, Value>> = Attr::new("chunks");

/// The `args` namespace of a Megatron-LM checkpoint, by argument name. Set by the Megatron-LM
/// reader; shown by `inspect`.
pub const MEGATRON_ARGS: Attr<BTreeMap<String, Value>> = Attr::new("megatron_args");

/// The Megatron model fields (`num_layers`, `num_query_groups`, `gated_linear_unit`,
/// `is_hybrid_model`, …; the `model` section of the run config). Set by the models mapper (to
/// Megatron); read by the torch_dist writer (the tensor-parallel check, gated MLPs, hybrid
/// models) and the Megatron-LM writer (its `args`).
pub const MEGATRON_MODEL: Attr<Map<String, Value>> = Attr::new("megatron_model");

/// The Megatron-Bridge `run_config.yaml` to write beside the checkpoint, as text. Set by the
/// models mapper (to Megatron); read by the torch_dist writer.
pub const RUN_CONFIG_YAML: Attr<String> = Attr::new("run_config_yaml");

/// The HF `config.json` to write beside the weights, when it was rebuilt from a checkpoint's
/// `run_config.yaml` rather than read from a file. Set by the models mapper (to HF); read by
/// the safetensors writer, for which it wins over a `config.json` in [`SOURCE_DIR`]. Exporters
/// set it to their engine's config (TensorRT-LLM's `config.json`).
pub const HF_CONFIG: Attr<Map<String, Value>> = Attr::new("hf_config");

/// JSON files to write beside the weights, by file name (`hf_quant_config.json` of a ModelOpt
/// checkpoint). Set by `fp8-static`; written by the safetensors writer.
pub const EXTRA_FILES: Attr<Map<String, Value>> = Attr::new("extra_files");

/// Tensor names are `FILE/NAME`: the safetensors writer puts tensor `NAME` into file `FILE`
/// (`rank1.safetensors`), one file per prefix, instead of sharding by size. Set by the serving
/// exporters, whose engines want one file set per rank.
pub const FILES_BY_PREFIX: Attr<bool> = Attr::new("files_by_prefix");

/// The HF architecture of the model (`"LlamaForCausalLM"`). Set by the models mapper (to
/// Megatron); shown by `inspect`.
pub const ARCHITECTURE: Attr<String> = Attr::new("architecture");

/// The torch name of the dtype the weights now have (`"torch.bfloat16"`). Set by the cast
/// and fp8 dequantize transforms; read by the models mapper (to Megatron), which writes it as
/// the kept HF config's `dtype`.
pub const DTYPE: Attr<String> = Attr::new("dtype");

/// Keys of the HF config that no longer hold for the weights (`["quantization_config"]` after a
/// dequantization). Set by the fp8 and mxfp4 dequantize transforms; read by the safetensors
/// writer and the models mapper (to Megatron), which drop them from the config they write.
pub const DROP_CONFIG_KEYS: Attr<Vec<String>> = Attr::new("drop_config_keys");

/// Keys to set in the HF config written beside the weights (the `quantization_config` of
/// re-quantized weights). Set by the fp8 quantize transform; read by the safetensors writer.
pub const CONFIG_UPDATES: Attr<Map<String, Value>> = Attr::new("config_updates");

/// The text fields of the records (and so the datasets a writer makes, one per key). Set by
/// the jsonl, columnar and megatron-indexed readers and the tokenize transform; read by the
/// megatron-indexed writer (unless configured).
pub const JSON_KEYS: Attr<Vec<String>> = Attr::new("json_keys");

/// The files a records source reads, in order. Set by the jsonl and columnar readers; shown by
/// `inspect`.
pub const INPUT_FILES: Attr<Vec<PathBuf>> = Attr::new("input_files");

/// The total size of [`INPUT_FILES`] in bytes. Set by the jsonl reader; shown by `inspect`.
pub const INPUT_BYTES: Attr<u64> = Attr::new("input_bytes");

/// The tokenizer's vocabulary size with added tokens (`len(tokenizer)`, by which Megatron sizes
/// the token dtype). Set by the tokenize and sft chat transforms; read by the megatron-indexed
/// writer (the token dtype, unless configured or given by [`TOKEN_DTYPE`]).
pub const VOCAB_SIZE: Attr<u64> = Attr::new("vocab_size");

/// The end-of-document token id, when the tokenizer has one. Set by the tokenize and sft chat
/// transforms; read by sft pack (its default pad id).
pub const EOD_ID: Attr<u32> = Attr::new("eod_id");

/// The token dtype of a Megatron indexed dataset (`"uint16"`, `"int32"`, …). Set by the
/// megatron-indexed reader; read by the megatron-indexed writer (unless configured), which
/// refuses a non-integer one.
pub const TOKEN_DTYPE: Attr<String> = Attr::new("token_dtype");

/// The documents in the indexed datasets read. Set by the megatron-indexed reader; shown by
/// `inspect`.
pub const DOCUMENTS: Attr<u64> = Attr::new("documents");

/// The sequences in the indexed datasets read. Set by the megatron-indexed reader; shown by
/// `inspect`.
pub const SEQUENCES: Attr<u64> = Attr::new("sequences");

/// The tokens in the indexed datasets read. Set by the megatron-indexed reader; shown by
/// `inspect`.
pub const TOKENS: Attr<u64> = Attr::new("tokens");

/// The tokens of the longest document read. Set by the megatron-indexed reader; shown by
/// `inspect`.
pub const LONGEST_DOCUMENT_TOKENS: Attr<u64> = Attr::new("longest_document_tokens");

/// Documents by length in tokens, in buckets `"0"`, `"1-63"`, `"64-255"`, `"256-1023"`,
/// `"1k-4k"`, `"4k-16k"`, `"16k-64k"`, `">=64k"`. Set by the megatron-indexed reader; shown by
/// `inspect`.
pub const DOCUMENT_LENGTH_HISTOGRAM: Attr<BTreeMap<String, u64>> =
    Attr::new("document_length_histogram");

/// Every key above, in the order listed.
pub const KEYS: &[&str] = &[
    FORMAT.key,
    SOURCE_DIR.key,
    CHECKPOINT_DIR.key,
    BYTE_OBJECTS.key,
    CHUNKS.key,
    MEGATRON_ARGS.key,
    MEGATRON_MODEL.key,
    RUN_CONFIG_YAML.key,
    HF_CONFIG.key,
    FILES_BY_PREFIX.key,
    ARCHITECTURE.key,
    DTYPE.key,
    DROP_CONFIG_KEYS.key,
    CONFIG_UPDATES.key,
    EXTRA_FILES.key,
    JSON_KEYS.key,
    INPUT_FILES.key,
    INPUT_BYTES.key,
    VOCAB_SIZE.key,
    EOD_ID.key,
    TOKEN_DTYPE.key,
    DOCUMENTS.key,
    SEQUENCES.key,
    TOKENS.key,
    LONGEST_DOCUMENT_TOKENS.key,
    DOCUMENT_LENGTH_HISTOGRAM.key,
];

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trip() {
        let mut p = StreamPlan::default();
        p.set(FORMAT, "torch_dist");
        p.set(SOURCE_DIR, PathBuf::from("/a/b"));
        p.set(
            INPUT_FILES,
            vec![PathBuf::from("x.jsonl"), PathBuf::from("y.jsonl")],
        );
        p.set(EOD_ID, 2u32);
        p.set(INPUT_BYTES, 12u32);
        p.set(JSON_KEYS, vec!["text".to_string()]);
        let hist: BTreeMap<String, u64> = [("0".to_string(), 1), ("1-63".to_string(), 5)].into();
        p.set(DOCUMENT_LENGTH_HISTOGRAM, hist.clone());
        let model = json!({"num_layers": 2, "gated_linear_unit": true});
        p.set(MEGATRON_MODEL, model.as_object().unwrap().clone());
        assert_eq!(p.get(FORMAT).as_deref(), Some("torch_dist"));
        assert_eq!(p.get(SOURCE_DIR), Some(PathBuf::from("/a/b")));
        assert_eq!(p.try_get(EOD_ID), Ok(Some(2)));
        assert_eq!(p.get(INPUT_BYTES), Some(12));
        assert_eq!(p.get(JSON_KEYS), Some(vec!["text".to_string()]));
        assert_eq!(p.get(DOCUMENT_LENGTH_HISTOGRAM), Some(hist));
        assert_eq!(p.get(MEGATRON_MODEL).map(Value::Object), Some(model));
        assert_eq!(p.get(VOCAB_SIZE), None);
        assert_eq!(p.try_get(VOCAB_SIZE), Ok(None));
    }

    /// The typed setters write what `set_attr` with hand-made JSON wrote.
    #[test]
    fn same_json_as_set_attr() {
        let (mut typed, mut untyped) = (StreamPlan::default(), StreamPlan::default());
        typed.set(SOURCE_DIR, PathBuf::from("/m"));
        untyped.set_attr("source_dir", "/m".into());
        typed.set(INPUT_FILES, vec![PathBuf::from("a"), PathBuf::from("b")]);
        untyped.set_attr(
            "input_files",
            json!([PathBuf::from("a"), PathBuf::from("b")]),
        );
        typed.set(LONGEST_DOCUMENT_TOKENS, 88886u64);
        untyped.set_attr("longest_document_tokens", 88886i64.into());
        typed.set(EOD_ID, 0u32);
        untyped.set_attr("eod_id", 0u32.into());
        typed.set(DROP_CONFIG_KEYS, vec!["quantization_config".to_string()]);
        untyped.set_attr("drop_config_keys", json!(["quantization_config"]));
        let args: BTreeMap<String, Value> =
            [("b".into(), json!(1)), ("a".into(), json!("x"))].into();
        typed.set(MEGATRON_ARGS, args.clone());
        untyped.set_attr("megatron_args", json!(args));
        let labels = ["0", "1-63", "64-255"];
        let hist: serde_json::Map<String, Value> = labels
            .iter()
            .map(|l| (l.to_string(), 3u64.into()))
            .collect();
        typed.set(
            DOCUMENT_LENGTH_HISTOGRAM,
            labels
                .iter()
                .map(|l| (l.to_string(), 3u64))
                .collect::<BTreeMap<_, _>>(),
        );
        untyped.set_attr("document_length_histogram", hist.into());
        assert_eq!(typed.attrs, untyped.attrs);
    }

    #[test]
    fn ill_typed_is_not_absent() {
        let mut p = StreamPlan::default();
        p.set_attr("vocab_size", "many".into());
        p.set_attr("eod_id", (u64::from(u32::MAX) + 1).into());
        p.set_attr("json_keys", json!(["text", 3]));
        assert_eq!(p.get(VOCAB_SIZE), None);
        let e = p.try_get(VOCAB_SIZE).unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::Format);
        assert_eq!(
            e.message.as_str(),
            "stream plan attribute 'vocab_size': expected a non-negative integer, got \"many\""
        );
        assert!(p.try_get(EOD_ID).unwrap_err().message.contains("'eod_id'"));
        assert_eq!(p.get(JSON_KEYS), None);
        let e = p.try_get(JSON_KEYS).unwrap_err();
        assert!(
            e.message
                .contains("expected an array, each element a string"),
            "{e}"
        );
        p.set_attr("hf_config", Value::String("x".repeat(100)));
        let e = p.try_get(HF_CONFIG).unwrap_err();
        assert!(e.message.ends_with("…"), "{e}");
    }

    #[test]
    fn unknown_keys_preserved() {
        let mut p = StreamPlan::default();
        p.set_attr("my_plugin.flag", json!({"x": [1, 2]}));
        p.set(TOKENS, 7u64);
        p.set(TOKENS, 9u64);
        const MINE: Attr<Value> = Attr::new("my_plugin.flag");
        assert_eq!(p.get(MINE), Some(json!({"x": [1, 2]})));
        assert_eq!(p.get(TOKENS), Some(9));
        assert_eq!(p.attrs().len(), 2);
        // Unparsable attributes read as none, as `attrs()` does.
        p.attrs = "not json".into();
        assert_eq!(p.get(TOKENS), None);
        assert_eq!(p.try_get(TOKENS), Ok(None));
    }

    #[test]
    fn keys_are_distinct() {
        let set: std::collections::HashSet<_> = KEYS.iter().collect();
        assert_eq!(set.len(), KEYS.len());
    }
}
