//! The `sft` transform: conversations to token ids and loss masks.
//!
//! Chat records (`messages`) are rendered with the tokenizer's Jinja `chat_template` (as
//! `apply_chat_template(..., add_generation_prompt=False)`: trim_blocks and lstrip_blocks on) and
//! tokenized without added special tokens. With `loss_mode = "assistant"` the mask is 1 on the
//! tokens that start inside an assistant turn's body: for ChatML templates, from after
//! `<|im_start|>assistant\n` through `<|im_end|>` and the newline after it — what Megatron-Bridge
//! 0.6.2 computes (checked token by token against its output); for other templates, on the
//! assistant messages' content. No EOS is appended to chats.
//!
//! Prompt/completion records (`input`/`output` by default) become
//! `encode(prompt) + encode(completion) + [eos]`, with the mask on the completion and the eos.

use bridgeflow_sdk::arrow_array::builder::{Int8Builder, ListBuilder, UInt32Builder};
use bridgeflow_sdk::arrow_array::{Array, ArrayRef, RecordBatch, StringArray, UInt64Array};
use bridgeflow_sdk::{
    schemars, serde, Emitter, Item, PluginError, PortType, Result, StreamPlan, Transform,
};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokenizers::Tokenizer;

fn default_loss_mode() -> String {
    "assistant".into()
}
fn default_messages() -> String {
    "messages".into()
}
fn default_prompt() -> String {
    "input".into()
}
fn default_completion() -> String {
    "output".into()
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct SftConfig {
    /// Folder with `tokenizer.json` and `tokenizer_config.json` (chat template, eos).
    pub tokenizer: PathBuf,
    /// A Jinja chat template to use instead of the tokenizer's.
    #[serde(default)]
    pub chat_template: Option<String>,
    /// `assistant` (loss on assistant turns only) or `all`.
    #[serde(default = "default_loss_mode")]
    pub loss_mode: String,
    /// Key holding the conversation (default `messages`).
    #[serde(default = "default_messages")]
    pub messages_key: String,
    /// Keys of prompt/completion records (defaults `input` and `output`).
    #[serde(default = "default_prompt")]
    pub prompt_key: String,
    #[serde(default = "default_completion")]
    pub completion_key: String,
    /// Threads (default: all cores).
    #[serde(default)]
    pub workers: usize,
}

/// The most encoding threads: one OS thread each, so a mistyped count (100000) would stall for
/// minutes starting them. 1,024 is more cores than any one host has.
pub const MAX_WORKERS: usize = 1024;

struct Loaded {
    tok: Tokenizer,
    env: minijinja::Environment<'static>,
    eos: Option<(String, u32)>,
    bos: Option<String>,
}

pub struct SftTokenize {
    cfg: SftConfig,
    loaded: Option<Arc<Loaded>>,
    pool: Option<rayon::ThreadPool>,
}

fn token_field(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        o => o.get("content")?.as_str().map(str::to_owned),
    }
}

fn load(cfg: &SftConfig) -> Result<Loaded> {
    let dir: &Path = &cfg.tokenizer;
    let file = dir.join("tokenizer.json");
    let tok = Tokenizer::from_file(&file).map_err(|e| {
        PluginError::config(format!("cannot load tokenizer {}: {e}", file.display()))
    })?;
    let tc: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let template = match &cfg.chat_template {
        Some(t) => Some(t.clone()),
        None => match tc.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
            _ => None,
        },
    }
    .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
    let mut env = minijinja::Environment::new();
    // transformers renders chat templates with these Jinja settings.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    if let Some(t) = template {
        env.add_template_owned("chat", t)
            .map_err(|e| PluginError::config(format!("chat template: {e}")))?;
    }
    let eos = token_field(tc.get("eos_token")).and_then(|t| tok.token_to_id(&t).map(|id| (t, id)));
    let bos = token_field(tc.get("bos_token"));
    Ok(Loaded { tok, env, eos, bos })
}

/// Byte ranges of the rendered text that carry loss.
fn assistant_spans(text: &str, messages: &[serde_json::Value]) -> Vec<(usize, usize)> {
    const START: &str = "<|im_start|>assistant\n";
    const END: &str = "<|im_end|>";
    let mut spans = Vec::new();
    if text.contains(START) {
        let mut from = 0;
        while let Some(i) = text[from..].find(START) {
            let a = from + i + START.len();
            let b = match text[a..].find(END) {
                Some(j) => {
                    let mut b = a + j + END.len();
                    if text[b..].starts_with('\n') {
                        b += 1;
                    }
                    b
                }
                None => text.len(),
            };
            spans.push((a, b));
            from = b;
        }
        return spans;
    }
    // Other templates: each assistant message's content, found in order.
    let mut from = 0;
    for m in messages {
        if m.get("role").and_then(|r| r.as_str()) != Some("assistant") {
            continue;
        }
        let Some(c) = m.get("content").and_then(|c| c.as_str()) else {
            continue;
        };
        if c.is_empty() {
            continue;
        }
        if let Some(i) = text[from..].find(c) {
            spans.push((from + i, from + i + c.len()));
            from += i + c.len();
        }
    }
    spans
}

impl SftTokenize {
    fn encode(&self, l: &Loaded, json: &str) -> std::result::Result<(Vec<u32>, Vec<i8>), String> {
        let doc: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
        if let Some(msgs) = doc.get(&self.cfg.messages_key) {
            let messages = msgs
                .as_array()
                .ok_or_else(|| format!("'{}' is not a list", self.cfg.messages_key))?;
            let tmpl = l.env.get_template("chat").map_err(|_| {
                "the tokenizer has no chat_template (set chat_template)".to_string()
            })?;
            let ctx = minijinja::context! {
                messages => minijinja::Value::from_serialize(messages),
                add_generation_prompt => false,
                bos_token => l.bos.clone().unwrap_or_default(),
                eos_token => l.eos.as_ref().map(|e| e.0.clone()).unwrap_or_default(),
            };
            let text = tmpl
                .render(ctx)
                .map_err(|e| format!("chat template: {e}"))?;
            let enc = l
                .tok
                .encode(text.as_str(), false)
                .map_err(|e| e.to_string())?;
            let ids = enc.get_ids().to_vec();
            let mask: Vec<i8> = if self.cfg.loss_mode == "all" {
                vec![1; ids.len()]
            } else {
                let spans = assistant_spans(&text, messages);
                enc.get_offsets()
                    .iter()
                    .map(|&(s, _)| spans.iter().any(|&(a, b)| a <= s && s < b) as i8)
                    .collect()
            };
            return Ok((ids, mask));
        }
        let get = |k: &str| -> std::result::Result<String, String> {
            doc.get(k)
                .and_then(|v| v.as_str())
                .map(str::to_owned)
                .ok_or_else(|| {
                    format!(
                        "neither '{}' (chat) nor a string '{k}' (prompt/completion)",
                        self.cfg.messages_key
                    )
                })
        };
        let (prompt, completion) = (get(&self.cfg.prompt_key)?, get(&self.cfg.completion_key)?);
        let p = l
            .tok
            .encode(prompt.as_str(), true)
            .map_err(|e| e.to_string())?;
        let c = l
            .tok
            .encode(completion.as_str(), false)
            .map_err(|e| e.to_string())?;
        let mut ids = p.get_ids().to_vec();
        let mut mask = vec![0i8; ids.len()];
        ids.extend_from_slice(c.get_ids());
        mask.extend(std::iter::repeat_n(1, c.get_ids().len()));
        if let Some((_, eos)) = &l.eos {
            ids.push(*eos);
            mask.push(1);
        }
        if self.cfg.loss_mode == "all" {
            mask.iter_mut().for_each(|m| *m = 1);
        }
        Ok((ids, mask))
    }
}

impl Transform for SftTokenize {
    type Config = SftConfig;
    const DESCRIPTION: &'static str =
        "Chat template + tokenizer -> input_ids and loss_mask (assistant turns), or prompt/completion";
    const INPUTS: &'static [PortType] = &[PortType::Records];
    const OUTPUT: PortType = PortType::Records;

    fn new(cfg: SftConfig) -> Result<Self> {
        if cfg.workers > MAX_WORKERS {
            return Err(PluginError::config(format!(
                "workers is {}; allowed: 0 (all cores) to {MAX_WORKERS}",
                cfg.workers
            )));
        }
        if cfg.loss_mode != "assistant" && cfg.loss_mode != "all" {
            return Err(PluginError::config(format!(
                "loss_mode '{}': expected assistant or all",
                cfg.loss_mode
            )));
        }
        Ok(SftTokenize {
            cfg,
            loaded: None,
            pool: None,
        })
    }

    fn plan(&mut self, inputs: &[StreamPlan]) -> Result<StreamPlan> {
        let l = load(&self.cfg)?;
        let mut plan = inputs[0].clone();
        plan.set(
            bridgeflow_sdk::attrs::VOCAB_SIZE,
            l.tok.get_vocab_size(true) as u64,
        );
        if let Some((_, id)) = &l.eos {
            plan.set(bridgeflow_sdk::attrs::EOD_ID, *id);
        }
        self.loaded = Some(Arc::new(l));
        let threads = if self.cfg.workers == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            self.cfg.workers
        };
        self.pool = Some(
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .map_err(|e| PluginError::internal(e.to_string()))?,
        );
        Ok(plan)
    }

    fn process(&mut self, _port: usize, item: Item, out: &mut Emitter) -> Result<()> {
        let batch = item.into_records()?;
        let json = batch
            .column_by_name("_json")
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .ok_or_else(|| {
                PluginError::shape(
                    "input has no '_json' column (read it with jsonl raw_json = true)",
                )
            })?;
        let lines = batch
            .column_by_name("_line")
            .and_then(|c| c.as_any().downcast_ref::<UInt64Array>());
        let l = self.loaded.clone().expect("planned");
        let docs: Vec<&str> = (0..json.len()).map(|i| json.value(i)).collect();
        let results: Vec<_> = self
            .pool
            .as_ref()
            .expect("planned")
            .install(|| docs.par_iter().map(|d| self.encode(&l, d)).collect());
        let mut ids_b = ListBuilder::new(UInt32Builder::new());
        let mut mask_b = ListBuilder::new(Int8Builder::new());
        for (i, r) in results.into_iter().enumerate() {
            let (ids, mask) = r.map_err(|e| {
                let line = lines.map(|l| l.value(i)).unwrap_or(0);
                PluginError::format(format!("line {line}: {e}"))
            })?;
            ids_b.values().append_slice(&ids);
            ids_b.append(true);
            mask_b.values().append_slice(&mask);
            mask_b.append(true);
        }
        let mut columns: Vec<(String, ArrayRef)> = Vec::new();
        if let Some(c) = batch.column_by_name("_line") {
            columns.push(("_line".into(), c.clone()));
        }
        columns.push(("input_ids".into(), Arc::new(ids_b.finish())));
        columns.push(("loss_mask".into(), Arc::new(mask_b.finish())));
        let out_batch = RecordBatch::try_from_iter(columns)
            .map_err(|e| PluginError::internal(e.to_string()))?;
        out.records(&out_batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_spans_cover_assistant_body_and_end_marker() {
        let t = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n";
        let s = assistant_spans(t, &[]);
        assert_eq!(s.len(), 1);
        assert_eq!(&t[s[0].0..s[0].1], "yo<|im_end|>\n");
    }
}
