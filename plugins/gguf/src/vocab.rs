//! The tokenizer as GGUF carries it, from HF's `tokenizer.json` (a byte-level BPE model, what
//! llama.cpp calls `gpt2`): every token by id, its type, the merges, the special ids.

use crate::format::Value;
use bridgeflow_sdk::{PluginError, Result};
use serde_json::Value as Json;
use std::path::Path;

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The `tokenizer.ggml.*` keys for the tokenizer in `dir`, `vocab` tokens long (the model's
/// embedding rows; ids the tokenizer lacks become unused `[PAD{id}]` tokens, as llama.cpp's
/// converter writes them). `ids` are (bos, eos, pad) from the model's configs.
pub fn metadata(dir: &Path, vocab: u64, ids: [Option<u64>; 3]) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.json");
    let text =
        std::fs::read_to_string(&path).map_err(|e| PluginError::io(&path, "cannot read", e))?;
    let tok: Json = serde_json::from_str(&text)
        .map_err(|e| PluginError::config(format!("{}: {e}", path.display())))?;
    let bad = |what: &str| PluginError::config(format!("{}: {what}", path.display()));
    let model = &tok["model"];
    if model["type"] != "BPE" {
        return Err(bad(
            "only BPE tokenizers (llama.cpp's gpt2 model) are written to GGUF",
        ));
    }
    let n = usize::try_from(vocab).map_err(|_| bad("vocabulary too large"))?;
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut types = vec![NORMAL; n];
    let mut put = |id: &Json, text: &str| -> Result<usize> {
        let id = id.as_u64().filter(|&i| i < vocab).ok_or_else(|| {
            bad(&format!(
                "token {text:?} has id {id}, outside the model's {vocab} embeddings"
            ))
        })? as usize;
        tokens[id] = Some(text.to_string());
        Ok(id)
    };
    for (text, id) in model["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab is not an object"))?
    {
        put(id, text)?;
    }
    for added in tok["added_tokens"].as_array().into_iter().flatten() {
        let text = added["content"]
            .as_str()
            .ok_or_else(|| bad("an added token has no content"))?;
        let id = put(&added["id"], text)?;
        types[id] = if added["special"] == true {
            CONTROL
        } else {
            USER_DEFINED
        };
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = UNUSED;
                format!("[PAD{i}]")
            })
        })
        .collect();
    let merges =
        merges(&model["merges"]).ok_or_else(|| bad("model.merges is not a list of pairs"))?;
    let mut meta = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::Str("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::Str(pre_tokenizer(&tok).into()),
        ),
        ("tokenizer.ggml.tokens".to_string(), Value::Strs(tokens)),
        ("tokenizer.ggml.token_type".to_string(), Value::I32s(types)),
        ("tokenizer.ggml.merges".to_string(), Value::Strs(merges)),
    ];
    for (key, id) in ["bos_token_id", "eos_token_id", "padding_token_id"]
        .iter()
        .zip(ids)
    {
        if let Some(id) = id.filter(|&i| i < vocab) {
            meta.push((format!("tokenizer.ggml.{key}"), Value::U32(id as u32)));
        }
    }
    Ok(meta)
}

/// llama.cpp's name for the pre-tokenizer: GPT-2's byte-level split when that is all there is
/// (what the converter recognizes such a tokenizer as), else its default.
fn pre_tokenizer(tok: &Json) -> &'static str {
    let p = &tok["pre_tokenizer"];
    if p["type"] == "ByteLevel" && p["use_regex"] != false {
        "gpt-2"
    } else {
        "default"
    }
}

/// Merges as `"a b"` strings, from either form tokenizers writes (`"a b"` or `["a", "b"]`).
fn merges(m: &Json) -> Option<Vec<String>> {
    let Some(list) = m.as_array() else {
        return m.is_null().then(Vec::new);
    };
    list.iter()
        .map(|e| match e {
            Json::String(s) => Some(s.clone()),
            Json::Array(p) if p.len() == 2 => {
                Some(format!("{} {}", p[0].as_str()?, p[1].as_str()?))
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_by_id_with_types_and_padding() {
        let dir = tempfile::tempdir().unwrap();
        let tok = serde_json::json!({
            "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]},
            "added_tokens": [{"id": 3, "content": "<s>", "special": true}],
        });
        std::fs::write(dir.path().join("tokenizer.json"), tok.to_string()).unwrap();
        let m = metadata(dir.path(), 5, [Some(3), Some(9), None]).unwrap();
        let get = |k: &str| m.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(
            get("tokenizer.ggml.tokens"),
            Some(Value::Strs(vec![
                "a".into(),
                "b".into(),
                "ab".into(),
                "<s>".into(),
                "[PAD4]".into()
            ]))
        );
        assert_eq!(
            get("tokenizer.ggml.token_type"),
            Some(Value::I32s(vec![1, 1, 1, 3, 5]))
        );
        assert_eq!(
            get("tokenizer.ggml.merges"),
            Some(Value::Strs(vec!["a b".into()]))
        );
        assert_eq!(get("tokenizer.ggml.bos_token_id"), Some(Value::U32(3)));
        // An id past the embeddings is not written.
        assert_eq!(get("tokenizer.ggml.eos_token_id"), None);
        // A token outside the embeddings is refused by name.
        let e = metadata(dir.path(), 3, [None; 3]).unwrap_err();
        assert!(e.message.contains("\"<s>\" has id 3"), "{}", e.message);
    }
}
