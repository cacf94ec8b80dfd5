//! A table-driven mapper: any model table of [`Entry`] rows converts in both directions.
//! HF → Megatron buffers only the parts of one fused tensor until the last arrives (one
//! layer's q/k/v, or gate/up); Megatron → HF emits as each tensor comes.

use crate::llama;
use bridgeflow_sdk::mapping::{
    fill, fuse_qkv, match_pattern, pad_rows, round_up, row_segments, split_qkv, Entry, Heads, Kind,
};
use bridgeflow_sdk::{
    schemars, serde, Buffer, Emitter, Item, PluginError, Result, StreamPlan, Tensor, TensorInfo,
    Transform,
};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

fn d128() -> u64 {
    128
}
fn one() -> u64 {
    1
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(crate = "bridgeflow_sdk::serde", deny_unknown_fields)]
pub struct MapperConfig {
    /// `to-megatron` (HF names and layouts in, Megatron out) or `to-hf`.
    pub direction: String,
    /// The HF `config.json` (default: `config.json` in the input's `source_dir`).
    #[serde(default)]
    pub hf_config: Option<PathBuf>,
    /// Vocabulary padding on import: rows rounded up to a multiple of this × tensor_parallel.
    #[serde(default = "d128")]
    pub make_vocab_size_divisible_by: u64,
    #[serde(default = "one")]
    pub tensor_parallel: u64,
    /// Emit fused tensors as the pieces they are made of, each with its place in the target
    /// tensor (a shard descriptor), so that nothing is copied (default true). HF -> Megatron:
    /// q/k/v group blocks and gate/up halves become chunks of the stacked torch_dist tensor;
    /// Megatron -> HF: each group's q, k and v rows go straight to their rows of the HF tensors
    /// (the safetensors writer places row pieces). Off: whole tensors, for consumers that need
    /// them (verify, the logits check).
    #[serde(default = "yes")]
    pub zero_copy: bool,
}

fn yes() -> bool {
    true
}

/// One piece of a stacked Megatron tensor: which HF part, which rows of it, and where it goes.
#[derive(Debug, Clone)]
struct Piece {
    info: TensorInfo,
    /// Rows of the HF part this piece takes.
    rows: std::ops::Range<u64>,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: String,
    pub layers: u64,
    pub heads: Heads,
    pub vocab: u64,
    pub tied: bool,
}

pub fn read_json(path: &std::path::Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).map_err(|e| PluginError::io(path, "cannot read", e))?;
    serde_json::from_str(&text)
        .map_err(|e| PluginError::format(format!("{}: invalid JSON: {e}", path.display())))
}

pub fn model_config(path: &std::path::Path) -> Result<ModelConfig> {
    model_config_from(&read_json(path)?, path)
}

/// The geometry of an HF config (`path` only names it in messages).
pub fn model_config_from(c: &serde_json::Value, path: &std::path::Path) -> Result<ModelConfig> {
    let arch = c["architectures"][0].as_str().unwrap_or("").to_string();
    if !llama::ARCHITECTURES.contains(&arch.as_str()) {
        return Err(PluginError::unsupported(format!(
            "{}: architecture '{arch}' is not handled by the llama mapper (it handles {})",
            path.display(),
            llama::ARCHITECTURES.join(", ")
        )));
    }
    let get = |k: &str| c[k].as_u64();
    let need = |k: &str| {
        get(k).ok_or_else(|| PluginError::format(format!("{}: no '{k}'", path.display())))
    };
    let hidden = need("hidden_size")?;
    let heads = need("num_attention_heads")?;
    Ok(ModelConfig {
        architecture: arch,
        layers: need("num_hidden_layers")?,
        heads: Heads {
            heads,
            groups: get("num_key_value_heads").unwrap_or(heads),
            head_dim: get("head_dim").unwrap_or(hidden / heads),
        },
        vocab: need("vocab_size")?,
        tied: c["tie_word_embeddings"].as_bool().unwrap_or(false),
    })
}

pub struct Mapper {
    cfg: MapperConfig,
    to_megatron: bool,
    model: Option<ModelConfig>,
    table: &'static [Entry],
    /// Megatron-side output info by (entry, layer).
    outputs: HashMap<(usize, u64), TensorInfo>,
    /// Parts of fused tensors waiting for the rest.
    pending: HashMap<(usize, u64), Vec<Option<Tensor>>>,
    /// zero_copy: the pieces each HF tensor becomes.
    pieces: HashMap<String, Vec<Piece>>,
}

fn row_bytes(t: &TensorInfo) -> usize {
    let inner: u64 = t.shape.iter().skip(1).product();
    (inner as usize) * t.dtype.size()
}

impl Mapper {
    /// Which table row and part an HF name belongs to.
    fn find_hf(&self, name: &str) -> Option<(usize, usize, u64)> {
        self.table.iter().enumerate().find_map(|(i, e)| {
            e.hf.iter()
                .enumerate()
                .find_map(|(p, pat)| match_pattern(pat, name).map(|l| (i, p, l)))
        })
    }
    fn find_megatron(&self, name: &str) -> Option<(usize, u64)> {
        self.table
            .iter()
            .enumerate()
            .find_map(|(i, e)| match_pattern(e.megatron, name).map(|l| (i, l)))
    }
    fn model(&self) -> &ModelConfig {
        self.model.as_ref().expect("planned")
    }
    fn padded_vocab(&self) -> u64 {
        round_up(
            self.model().vocab,
            self.cfg.make_vocab_size_divisible_by * self.cfg.tensor_parallel.max(1),
        )
    }

    fn plan_to_megatron(&mut self, input: &StreamPlan) -> Result<StreamPlan> {
        let mut parts: BTreeMap<(usize, u64), Vec<Option<TensorInfo>>> = BTreeMap::new();
        for t in input.tensors.iter() {
            if llama::ignorable(t.name()) {
                continue;
            }
            if t.name() == "lm_head.weight" && self.model().tied {
                continue;
            }
            let (i, p, l) = self.find_hf(t.name()).ok_or_else(|| {
                PluginError::unsupported(format!(
                    "tensor '{}' has no mapping in the {} table",
                    t.name(),
                    self.model().architecture
                ))
            })?;
            parts
                .entry((i, l))
                .or_insert_with(|| vec![None; self.table[i].hf.len()])[p] = Some(t.clone());
        }
        let mut out = Vec::new();
        for ((i, l), ps) in &parts {
            let e = self.table[*i];
            let infos: Vec<TensorInfo> = ps
                .iter()
                .enumerate()
                .map(|(p, x)| {
                    x.clone().ok_or_else(|| {
                        PluginError::shape(format!(
                            "'{}' needs '{}', which the input lacks",
                            fill(e.megatron, *l),
                            fill(e.hf[p], *l)
                        ))
                    })
                })
                .collect::<Result<_>>()?;
            let first = &infos[0];
            if self.cfg.zero_copy && *l != u64::MAX && e.kind != Kind::Vocab {
                out.extend(self.plan_pieces(*i, *l, &infos)?);
                continue;
            }
            let mut shape = first.shape.to_vec();
            match e.kind {
                Kind::Direct => {}
                Kind::Vocab => shape[0] = self.padded_vocab().max(shape[0]),
                Kind::Qkv | Kind::GatedMlp => shape[0] = infos.iter().map(|t| t.shape[0]).sum(),
            }
            let info = TensorInfo::new(fill(e.megatron, *l), first.dtype, &shape);
            self.outputs.insert((*i, *l), info.clone());
            out.push(info);
        }
        let mut plan = StreamPlan::new(out);
        plan.attrs = input.attrs.clone();
        let n = self.model().layers;
        let extra: Vec<String> = llama::EXTRA_STATE
            .iter()
            .flat_map(|m| {
                (0..n).map(move |l| format!("decoder.layers.{m}._extra_state/shard_{l}_{n}"))
            })
            .collect();
        plan.set_attr("byte_objects", serde_json::json!(extra));
        plan.set_attr("architecture", self.model().architecture.clone().into());
        Ok(plan)
    }

    /// The pieces of layer `l`'s tensor of entry `i` in the stacked global tensor
    /// `decoder.layers.<param>` [layers, rows, ...].
    fn plan_pieces(&mut self, i: usize, l: u64, parts: &[TensorInfo]) -> Result<Vec<TensorInfo>> {
        let e = self.table[i];
        let key = e.megatron.replace("{l}.", "");
        let layers = self.model().layers;
        let inner: Vec<u64> = parts[0].shape[1..].to_vec();
        let total: u64 = parts.iter().map(|t| t.shape[0]).sum();
        let mut global = vec![layers, total];
        global.extend(&inner);
        // (part, rows of the part, row offset in the fused tensor)
        let mut layout: Vec<(usize, std::ops::Range<u64>, u64)> = Vec::new();
        match e.kind {
            Kind::Qkv => {
                let h = self.model().heads;
                let (q_rows, kv_rows) = ((h.heads / h.groups) * h.head_dim, h.head_dim);
                if parts[0].shape[0] != h.groups * q_rows || parts[1].shape[0] != h.groups * kv_rows
                {
                    return Err(PluginError::shape(format!(
                        "{}: q/k shapes do not fit {} heads in {} groups of dim {}",
                        fill(e.megatron, l),
                        h.heads,
                        h.groups,
                        h.head_dim
                    )));
                }
                let group = q_rows + 2 * kv_rows;
                for g in 0..h.groups {
                    layout.push((0, g * q_rows..(g + 1) * q_rows, g * group));
                    layout.push((1, g * kv_rows..(g + 1) * kv_rows, g * group + q_rows));
                    layout.push((
                        2,
                        g * kv_rows..(g + 1) * kv_rows,
                        g * group + q_rows + kv_rows,
                    ));
                }
            }
            _ => {
                let mut off = 0;
                for (p, t) in parts.iter().enumerate() {
                    layout.push((p, 0..t.shape[0], off));
                    off += t.shape[0];
                }
            }
        }
        let mut out = Vec::new();
        for (k, (p, rows, off)) in layout.into_iter().enumerate() {
            let mut shape = vec![1, rows.end - rows.start];
            shape.extend(&inner);
            let mut offsets = vec![l, off];
            offsets.extend(std::iter::repeat_n(0, inner.len()));
            let mut info = TensorInfo::new(format!("{key}#{l}.{k}"), parts[0].dtype, &shape);
            info.shard = bridgeflow_sdk::abi_option::RSome(bridgeflow_sdk::ShardInfo {
                global_shape: global.clone().into(),
                offsets: offsets.into(),
            });
            self.pieces
                .entry(parts[p].name().to_string())
                .or_default()
                .push(Piece {
                    info: info.clone(),
                    rows,
                });
            out.push(info);
        }
        Ok(out)
    }

    fn plan_to_hf(&mut self, input: &StreamPlan) -> Result<StreamPlan> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for t in input.tensors.iter() {
            // A piece (a stored block of rows) stands for its whole tensor, announced once.
            if !seen.insert(t.base_name().to_string()) {
                continue;
            }
            let (i, l) = self.find_megatron(t.base_name()).ok_or_else(|| {
                PluginError::unsupported(format!(
                    "Megatron tensor '{}' has no mapping in the llama table",
                    t.base_name()
                ))
            })?;
            let e = self.table[i];
            let mut shape = match t.shard() {
                Some(s) => s.global_shape.to_vec(),
                None => t.shape.to_vec(),
            };
            let names: Vec<String> = e.hf.iter().map(|p| fill(p, l)).collect();
            let m = self.model();
            let rows = match shape.first() {
                Some(&r) => {
                    row_segments(e.kind, r, m.heads, m.vocab)
                        .map_err(|err| err.context(t.base_name()))?
                        .0
                }
                None => vec![0],
            };
            for (n, r) in names.iter().zip(rows) {
                if let Some(first) = shape.first_mut() {
                    *first = r;
                }
                out.push(TensorInfo::new(n.clone(), t.dtype, &shape));
            }
        }
        let mut plan = StreamPlan::new(out);
        plan.attrs = input.attrs.clone();
        if let Some(c) = &self.cfg.hf_config {
            if let Some(dir) = c.parent() {
                plan.set_attr("source_dir", dir.to_string_lossy().into_owned().into());
            }
        }
        Ok(plan)
    }

    fn emit_megatron(
        &mut self,
        key: (usize, u64),
        parts: Vec<Tensor>,
        out: &mut Emitter,
    ) -> Result<()> {
        let e = self.table[key.0];
        let info = self.outputs.get(&key).cloned().ok_or_else(|| {
            PluginError::internal(format!("no output planned for {}", fill(e.megatron, key.1)))
        })?;
        let data = match e.kind {
            Kind::Direct => {
                let t = parts.into_iter().next().expect("one part");
                return out.tensor(Tensor::new(info, t.data)?);
            }
            Kind::Vocab => {
                let t = &parts[0];
                if info.shape[0] == t.info.shape[0] {
                    return out.tensor(Tensor::new(info, t.data.clone())?);
                }
                pad_rows(t.bytes(), row_bytes(&t.info), info.shape[0] as usize)
            }
            Kind::Qkv => {
                let row = row_bytes(&parts[0].info);
                fuse_qkv(
                    parts[0].bytes(),
                    parts[1].bytes(),
                    parts[2].bytes(),
                    self.model().heads,
                    row,
                )
                .map_err(|err| err.context(&info.name))?
            }
            Kind::GatedMlp => [parts[0].bytes(), parts[1].bytes()].concat(),
        };
        out.tensor(Tensor::new(info, Buffer::from_vec(data))?)
    }
}

impl Transform for Mapper {
    type Config = MapperConfig;
    const DESCRIPTION: &'static str =
        "Llama/Mistral/Qwen2/Qwen3 HF <-> Megatron-Core names and layouts (QKV per group, gated MLP, vocab padding)";

    fn new(cfg: MapperConfig) -> Result<Self> {
        let to_megatron = match cfg.direction.as_str() {
            "to-megatron" => true,
            "to-hf" => false,
            d => {
                return Err(PluginError::config(format!(
                    "direction '{d}': expected to-megatron or to-hf"
                )))
            }
        };
        Ok(Mapper {
            cfg,
            to_megatron,
            model: None,
            table: llama::TABLE,
            outputs: HashMap::new(),
            pending: HashMap::new(),
            pieces: HashMap::new(),
        })
    }

    fn plan(&mut self, inputs: &[StreamPlan]) -> Result<StreamPlan> {
        let input = &inputs[0];
        // The HF config: given, beside the input, or (export) rebuilt from the checkpoint's
        // run_config.yaml, as Megatron-Bridge or bridgeflow wrote it.
        let given = match &self.cfg.hf_config {
            Some(p) => Some(p.clone()),
            None => input
                .attr_str("source_dir")
                .map(|d| PathBuf::from(d).join("config.json"))
                .filter(|p| p.is_file()),
        };
        let (hf, path, derived) = match given {
            Some(p) => (read_json(&p)?, p, false),
            None => {
                let run_config = input
                    .attr_str("checkpoint_dir")
                    .map(|d| PathBuf::from(d).join("run_config.yaml"))
                    .filter(|p| p.is_file())
                    .ok_or_else(|| {
                        PluginError::config(
                            "no HF config: set hf_config (the input has no config.json beside it and no run_config.yaml)",
                        )
                    })?;
                let hf = crate::megatron_config::hf_config_from_run_config(&run_config)?;
                (hf, run_config, true)
            }
        };
        self.model = Some(model_config_from(&hf, &path)?);
        let mut plan = if self.to_megatron {
            use crate::megatron_config::{model_section, run_config, to_yaml};
            let mut p = self.plan_to_megatron(input)?;
            // Bridge's hf_model_id and tokenizer_model: the HF folder we read.
            let source = input
                .attr_str("source_dir")
                .map(|d| std::fs::canonicalize(&d).map_or(d, |p| p.display().to_string()));
            let model = model_section(
                &hf,
                source.as_deref(),
                self.cfg.make_vocab_size_divisible_by,
                self.cfg.tensor_parallel.max(1),
            )?;
            let yaml = to_yaml(
                &run_config(&hf, model, source.as_deref()),
                "# Written by bridgeflow as Megatron-Bridge writes it: `model` instantiates a\n# GPTModelProvider (load_megatron_model, export_ckpt); `bridgeflow.hf_config` is the\n# original config.json, from which export rebuilds it exactly.\n",
            );
            p.set_attr("run_config_yaml", yaml.into());
            p
        } else {
            self.plan_to_hf(input)?
        };
        if !self.to_megatron && derived {
            plan.set_attr("hf_config", hf);
        }
        Ok(plan)
    }

    fn process(&mut self, _port: usize, item: Item, out: &mut Emitter) -> Result<()> {
        let t = item.into_tensor()?;
        if self.to_megatron {
            if llama::ignorable(t.name()) || (t.name() == "lm_head.weight" && self.model().tied) {
                return Ok(());
            }
            if let Some(pieces) = self.pieces.get(t.name()) {
                // zero_copy: row slices of the input, placed by their shard descriptors.
                let row = row_bytes(&t.info);
                for pc in pieces {
                    let data = t
                        .data
                        .slice(pc.rows.start as usize * row..pc.rows.end as usize * row);
                    out.tensor(Tensor::new(pc.info.clone(), data)?)?;
                }
                return Ok(());
            }
            let (i, p, l) = self.find_hf(t.name()).ok_or_else(|| {
                PluginError::unsupported(format!("tensor '{}' has no mapping", t.name()))
            })?;
            let n = self.table[i].hf.len();
            if n == 1 {
                return self.emit_megatron((i, l), vec![t], out);
            }
            let slot = self.pending.entry((i, l)).or_insert_with(|| vec![None; n]);
            slot[p] = Some(t);
            if slot.iter().all(Option::is_some) {
                let parts: Vec<Tensor> = self
                    .pending
                    .remove(&(i, l))
                    .unwrap()
                    .into_iter()
                    .map(Option::unwrap)
                    .collect();
                self.emit_megatron((i, l), parts, out)?;
            }
            return Ok(());
        }
        let (i, l) = self.find_megatron(t.info.base_name()).ok_or_else(|| {
            PluginError::unsupported(format!("Megatron tensor '{}' has no mapping", t.name()))
        })?;
        let e = self.table[i];
        let names: Vec<String> = e.hf.iter().map(|p| fill(p, l)).collect();
        if e.kind == Kind::Direct {
            // Renamed; a piece stays a piece of the renamed tensor.
            let name = match t.name().split_once('#') {
                Some((_, id)) => format!("{}#{id}", names[0]),
                None => names[0].clone(),
            };
            return out.tensor(Tensor::new(t.info.clone().with_name(name), t.data)?);
        }
        if e.kind == Kind::Qkv && !self.cfg.zero_copy {
            if t.info.shard().is_some() {
                return Err(PluginError::config(format!(
                    "'{}' arrives in pieces; whole q/k/v tensors need zero_copy = true or a reader without row_pieces",
                    t.name()
                )));
            }
            let row = row_bytes(&t.info);
            let (q, k, v) = split_qkv(t.bytes(), self.model().heads, row)
                .map_err(|err| err.context(t.name()))?;
            let mut shape = t.info.shape.to_vec();
            for (name, data) in names.iter().zip([q, k, v]) {
                shape[0] = (data.len() / row) as u64;
                out.tensor(Tensor::new(
                    TensorInfo::new(name.clone(), t.info.dtype, &shape),
                    Buffer::from_vec(data),
                )?)?;
            }
            return Ok(());
        }
        // Every run of rows goes to its place in the HF tensors as a view of the input: a whole
        // HF tensor when the run covers one, else a row piece the writer places.
        let (fused_rows, first) = match t.info.shard() {
            Some(s) => (s.global_shape[0], s.offsets[0]),
            None => (t.info.shape[0], 0),
        };
        let m = self.model();
        let (part_rows, segments) = row_segments(e.kind, fused_rows, m.heads, m.vocab)
            .map_err(|err| err.context(t.name()))?;
        let row = row_bytes(&t.info) as u64;
        let inner = &t.info.shape[1..];
        for s in segments
            .iter()
            .filter_map(|s| s.clip(first..first + t.info.shape[0]))
        {
            let mut shape = vec![s.rows];
            shape.extend(inner);
            let from = (s.fused - first) * row;
            let data = t.data.slice(from as usize..(from + s.rows * row) as usize);
            let info = if s.at == 0 && s.rows == part_rows[s.part] {
                TensorInfo::new(names[s.part].clone(), t.info.dtype, &shape)
            } else {
                let mut global = vec![part_rows[s.part]];
                global.extend(inner);
                let mut offsets = vec![s.at];
                offsets.extend(std::iter::repeat_n(0, inner.len()));
                TensorInfo::new(
                    format!("{}#{}", names[s.part], s.fused),
                    t.info.dtype,
                    &shape,
                )
                .with_shard(&global, &offsets)
            };
            out.tensor(Tensor::new(info, data)?)?;
        }
        Ok(())
    }

    fn finish(&mut self, _out: &mut Emitter) -> Result<()> {
        if let Some(((i, l), _)) = self.pending.iter().next() {
            return Err(PluginError::shape(format!(
                "'{}' never got all its parts from the input",
                fill(self.table[*i].megatron, *l)
            )));
        }
        Ok(())
    }
}
