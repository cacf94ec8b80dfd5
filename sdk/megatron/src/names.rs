//! Megatron-Core's tensor keys (GPT and hybrid models, TE or local spec) and Megatron-LM's
//! variants of them: every naming rule the Megatron plugins follow, in one place.
//!
//! - Decoder layers: `decoder.layers.<l>.<param>` per layer; torch_dist stacks a homogeneous
//!   decoder's layers as `decoder.layers.<param>` with a leading layer axis. A VLM holds its
//!   decoder in a submodule (`language_model.decoder.layers.…`).
//! - Experts: stacked on a leading expert axis as `…mlp.experts.experts.linear_fcN.weight`
//!   (torch_dist, and the per-layer tensors bridgeflow streams); Megatron-LM keeps local expert
//!   `i` as `…mlp.experts.linear_fcN.weight{i}` (TE grouped GEMM) or
//!   `…mlp.experts.local_experts.{i}.linear_fcN.weight` (local spec).
//! - Transformer Engine fuses the pre-norms into its linears (`linear_qkv.layer_norm_weight`);
//!   the local spec names them apart (`input_layernorm.weight`) — see [`LOCAL_NAMES`].
//! - TE modules carry `_extra_state` entries (see [`te_extra_state`], [`legacy_extra_state`]).
//! - Multi-token-prediction layers: `mtp.layers.<m>.…`, their transformer layer under
//!   `transformer_layer.`.

/// The key prefix of the decoder's layers.
pub const LAYERS: &str = "decoder.layers.";
/// The word embedding (vocabulary-parallel; on the first pipeline stage).
pub const WORD_EMBEDDINGS: &str = "embedding.word_embeddings.weight";
/// The output layer (absent when tied to the embedding; on the last stage).
pub const OUTPUT_LAYER: &str = "output_layer.weight";
/// A GPT decoder's final norm.
pub const FINAL_LAYERNORM: &str = "decoder.final_layernorm.weight";
/// A hybrid model's (megatron-core's HybridModel) final norm.
pub const FINAL_NORM: &str = "decoder.final_norm.weight";
/// The embedding module's prefix.
const EMBEDDING: &str = "embedding.";
/// The output layer's and final norm's module prefixes.
const OUTPUT_MODULES: [&str; 2] = ["output_layer.", "decoder.final_layernorm."];
/// The prefix under which Megatron-Bridge's VLMs hold their language model.
pub const LANGUAGE_MODEL: &str = "language_model.";
/// The prefix of a VLM's vision tower, kept as the HF module (Qwen2.5-VL's `visual.`).
pub const VISION: &str = "visual.";
/// Multi-token-prediction layers.
pub const MTP_LAYERS: &str = "mtp.layers.";
/// An MTP layer's transformer layer (a decoder layer's rows).
const MTP_TRANSFORMER_LAYER: &str = "transformer_layer.";

/// `decoder.layers.<l>.<rest>`.
pub fn layer_key(l: u64, rest: &str) -> String {
    format!("{LAYERS}{l}.{rest}")
}

/// A mapping-table pattern of a per-layer parameter: `decoder.layers.{l}.<rest>`.
pub fn layer_pattern(rest: &str) -> String {
    format!("{LAYERS}{{l}}.{rest}")
}

/// Whether `name` is under the decoder's layers (at the start of the key).
pub fn is_layer_key(name: &str) -> bool {
    name.starts_with(LAYERS)
}

/// (layer, param) of `decoder.layers.<l>.<param>` (the key's start).
pub fn split_layer(name: &str) -> Option<(u64, &str)> {
    let rest = name.strip_prefix(LAYERS)?;
    let (l, param) = rest.split_once('.')?;
    Some((l.parse().ok()?, param))
}

/// `(stack, rest)` of a key under a decoder's layers — `decoder.layers.` itself, or nested in a
/// submodule as VLMs hold their language model (`language_model.decoder.layers.`) — and what
/// follows it.
pub fn decoder_layers(key: &str) -> Option<(&str, &str)> {
    let at = key.find(LAYERS)?;
    if at > 0 && !key[..at].ends_with('.') {
        return None;
    }
    Some(key.split_at(at + LAYERS.len()))
}

/// `(stack, layer, param)` of a per-layer name `<stack><layer>.<param>` (see
/// [`decoder_layers`]).
pub fn layer_split(name: &str) -> Option<(&str, u64, &str)> {
    let (stack, rest) = decoder_layers(name)?;
    let (l, param) = rest.split_once('.')?;
    Some((stack, l.parse().ok()?, param))
}

/// Whether a key is stacked over layers (`<stack><param>`, no layer index after the stack).
pub fn is_stacked(key: &str) -> bool {
    decoder_layers(key)
        .and_then(|(_, rest)| rest.split('.').next())
        .is_some_and(|first| first.parse::<u64>().is_err())
}

/// The stacked key of a per-layer parameter: `<stack><param>`.
pub fn stacked_key(stack: &str, param: &str) -> String {
    format!("{stack}{param}")
}

/// Layer `l`'s key of a stacked one: `<stack><l>.<param>`.
pub fn unstacked_key(stack: &str, l: u64, param: &str) -> String {
    format!("{stack}{l}.{param}")
}

/// Whether `name` is the embedding's (the first pipeline stage's).
pub fn is_embedding(name: &str) -> bool {
    name.starts_with(EMBEDDING)
}

/// Whether `name` is the output layer's or the final norm's (the last stage's).
pub fn is_output(name: &str) -> bool {
    OUTPUT_MODULES.iter().any(|p| name.starts_with(p))
}

/// Whether `name` is part of a Mamba mixer (a hybrid model's `M` layers).
pub fn is_mamba_mixer(name: &str) -> bool {
    name.contains(".mixer.")
}

/// Whether `name` is one a GPT decoder (dense, MoE, MLA) has: its layers, embedding, output
/// layer and final norm, no Mamba mixer.
pub fn is_gpt_key(name: &str) -> bool {
    let known = is_layer_key(name) || is_embedding(name) || is_output(name);
    known && !is_mamba_mixer(name)
}

/// A name with the VLM language-model prefix taken off, if it has it.
pub fn without_language_model(name: &str) -> &str {
    name.strip_prefix(LANGUAGE_MODEL).unwrap_or(name)
}

/// `language_model.<name>`.
pub fn in_language_model(name: &str) -> String {
    format!("{LANGUAGE_MODEL}{name}")
}

// ------------------------------------------------------------------------------------ experts

/// The part of a key that marks experts stacked on a leading axis.
pub const STACKED_EXPERTS: &str = ".mlp.experts.experts.";
/// Megatron-LM's TE grouped-GEMM experts: `…mlp.experts.linear_fcN.weight{i}`.
const GROUPED_EXPERTS: &str = ".mlp.experts.";
/// Megatron-LM's local-spec SequentialMLP experts: `…mlp.experts.local_experts.{i}.…`.
const SEQUENTIAL_EXPERTS: &str = ".mlp.experts.local_experts.";

/// The layer parameter of stacked experts' `rest` (`linear_fc1.weight`):
/// `mlp.experts.experts.<rest>`.
pub fn experts_param(rest: &str) -> String {
    format!("{}{rest}", &STACKED_EXPERTS[1..])
}

/// Whether `name` holds experts stacked on a leading axis.
pub fn has_stacked_experts(name: &str) -> bool {
    name.contains(STACKED_EXPERTS)
}

/// Megatron-LM's key for local expert `i` of a stacked-experts key: TE's grouped GEMM
/// (`experts.linear_fcN.weight{i}`) or, with `local_spec`, the SequentialMLP's
/// (`experts.local_experts.{i}.linear_fcN.weight`).
pub fn legacy_expert_key(stacked: &str, i: u64, local_spec: bool) -> String {
    let from = &STACKED_EXPERTS[1..];
    if local_spec {
        let to = format!("{}{i}.", &SEQUENTIAL_EXPERTS[1..]);
        return stacked.replacen(from, &to, 1);
    }
    format!("{}{i}", stacked.replacen(from, &GROUPED_EXPERTS[1..], 1))
}

/// (module as the grouped key names it — `…mlp.experts.linear_fcN` —, local expert) of a
/// Megatron-LM local expert's key in either spec.
pub fn legacy_local_expert(key: &str) -> Option<(String, u64)> {
    if let Some((before, rest)) = key.split_once(SEQUENTIAL_EXPERTS) {
        let (i, linear) = rest.split_once('.')?;
        let linear = linear.strip_suffix(".weight")?;
        return Some((
            format!("{before}{GROUPED_EXPERTS}{linear}"),
            i.parse().ok()?,
        ));
    }
    key.rsplit_once(".weight").and_then(|(m, n)| {
        (m.contains(GROUPED_EXPERTS) && !n.is_empty())
            .then(|| n.parse::<u64>().ok())
            .flatten()
            .map(|n| (m.to_string(), n))
    })
}

/// The stacked-experts weight of a grouped module's layer parameter
/// (`mlp.experts.linear_fc1` → `mlp.experts.experts.linear_fc1.weight`).
pub fn stacked_expert_weight(grouped_param: &str) -> String {
    let param = grouped_param.replacen(&GROUPED_EXPERTS[1..], &STACKED_EXPERTS[1..], 1);
    format!("{param}.weight")
}

// ---------------------------------------------------------------------------- TE / local spec

/// Local-spec (`--transformer-impl local`) names of the norms TE fuses into its linears, as
/// (TE layer parameter, local layer parameter).
pub const LOCAL_NAMES: &[(&str, &str)] = &[
    (
        "self_attention.linear_qkv.layer_norm_weight",
        "input_layernorm.weight",
    ),
    (
        "mlp.linear_fc1.layer_norm_weight",
        "pre_mlp_layernorm.weight",
    ),
    // MLA's norms of the compressed q and kv.
    (
        "self_attention.linear_q_up_proj.layer_norm_weight",
        "self_attention.q_layernorm.weight",
    ),
    (
        "self_attention.linear_kv_up_proj.layer_norm_weight",
        "self_attention.kv_layernorm.weight",
    ),
];

/// A TE layer parameter's local-spec name (itself when the spec names it alike).
pub fn local_spec_name(te: &str) -> &str {
    LOCAL_NAMES
        .iter()
        .find(|(t, _)| *t == te)
        .map_or(te, |(_, local)| local)
}

/// A local-spec layer parameter's TE name, where the layer holds the linear that TE fuses the
/// norm into (`has` says whether the layer holds a parameter): DeepSeek's `input_layernorm`
/// stays itself, its attention has no `linear_qkv`.
pub fn te_name(local: &str, has: impl Fn(&str) -> bool) -> &str {
    LOCAL_NAMES
        .iter()
        .find(|(te, l)| *l == local && has(&te.replace("layer_norm_weight", "weight")))
        .map_or(local, |(te, _)| te)
}

// -------------------------------------------------------------------------------- extra state

/// Whether a key is a TE module's `_extra_state` entry.
pub fn is_extra_state(key: &str) -> bool {
    key.contains("_extra_state")
}

/// `<module>._extra_state`.
fn extra_state(module: &str) -> String {
    format!("{module}._extra_state")
}

/// The `_extra_state` entry Megatron-LM's TE modules save after a decoder linear's weight
/// (`….linear_*.weight`); a grouped-GEMM expert weight (`…weight{i}`) shares one module, whose
/// extra state goes with local expert 0 (`…weight0`).
pub fn legacy_extra_state(key: &str) -> Option<String> {
    let module = key.strip_suffix(".weight").or_else(|| {
        key.strip_suffix(".weight0")
            .filter(|_| key.contains(GROUPED_EXPERTS))
    });
    module
        .filter(|m| {
            is_layer_key(m)
                && m.rsplit('.')
                    .next()
                    .is_some_and(|x| x.starts_with("linear_"))
        })
        .map(extra_state)
}

/// The `_extra_state` byte objects megatron-core's Transformer Engine modules write for a key
/// (it refuses to load without them): one per layer — and per expert — of every `linear_*`
/// module's weight in the decoder, named by the shard's place among the stacked layers
/// (`shard_{l}_{L}`, `shard_{l}.{e}_{L}.{E}`) or, for a per-layer key, among the experts
/// (`shard_{e}_{E}`, else `shard_0_1`).
/// A hybrid model (megatron-core's HybridModel) also has them for its Mamba mixers' `in_proj` /
/// `out_proj` and for the output layer; multi-token-prediction layers (`mtp.layers.{m}.…`,
/// never stacked) for their linears and `eh_proj`.
pub fn te_extra_state<'a>(
    key: &'a str,
    global: &[u64],
    stacked: bool,
    hybrid: bool,
) -> Vec<String> {
    if hybrid && key == OUTPUT_LAYER {
        return vec![format!("{}/shard_0_1", extra_state("output_layer"))];
    }
    // A weight stored as named row blocks (`in_proj.weight.z`, ...) is still one module's.
    let weight = |k: &'a str| k.strip_suffix(".weight");
    // Decoder layers, and multi-token-prediction layers (their projection `eh_proj` too).
    let mtp = is_mtp(key);
    let Some(module) = (decoder_layers(key).is_some() || mtp)
        .then(|| weight(key).or_else(|| key.rsplit_once('.').and_then(|(w, _)| weight(w))))
        .flatten()
    else {
        return Vec::new();
    };
    if !module.rsplit('.').next().is_some_and(|m| {
        m.starts_with("linear_")
            || (mtp && m == "eh_proj")
            || (hybrid && module.ends_with(&format!("mixer.{m}")) && m.ends_with("_proj"))
    }) {
        return Vec::new();
    }
    let experts = has_stacked_experts(module);
    let name = |shard: String| format!("{}/shard_{shard}", extra_state(module));
    let stacked = stacked && !mtp && layer_split(key).is_none();
    match (stacked, experts) {
        (true, true) => {
            let (l, e) = (global[0], global[1]);
            (0..l)
                .flat_map(|i| (0..e).map(move |j| name(format!("{i}.{j}_{l}.{e}"))))
                .collect()
        }
        (true, false) => (0..global[0])
            .map(|i| name(format!("{i}_{}", global[0])))
            .collect(),
        (false, true) => (0..global[0])
            .map(|j| name(format!("{j}_{}", global[0])))
            .collect(),
        (false, false) => vec![name("0_1".into())],
    }
}

// ----------------------------------------------------------------- multi-token prediction

/// Whether `name` is a multi-token-prediction layer's.
pub fn is_mtp(name: &str) -> bool {
    name.starts_with(MTP_LAYERS)
}

/// A mapping-table pattern of an MTP layer's parameter: `mtp.layers.{l}.<rest>`.
pub fn mtp_pattern(rest: &str) -> String {
    format!("{MTP_LAYERS}{{l}}.{rest}")
}

/// The Megatron name of a table name whose layer index counts the MTP layers after the
/// decoder's `decoder_layers` (as HF numbers them): a decoder row `decoder.layers.{l}.…` with
/// l ≥ L is `mtp.layers.{l-L}.transformer_layer.…`, an MTP row `mtp.layers.{l}.…` is
/// `mtp.layers.{l-L}.…`; other names are themselves.
pub fn mtp_from_table(name: String, decoder_layers: u64) -> String {
    let split = |prefix: &str| {
        let (n, tail) = name.strip_prefix(prefix)?.split_once('.')?;
        let n: u64 = n.parse().ok()?;
        (n >= decoder_layers).then(|| (n - decoder_layers, tail.to_string()))
    };
    if let Some((m, tail)) = split(LAYERS) {
        return format!("{MTP_LAYERS}{m}.{MTP_TRANSFORMER_LAYER}{tail}");
    }
    if let Some((m, tail)) = split(MTP_LAYERS) {
        return format!("{MTP_LAYERS}{m}.{tail}");
    }
    name
}

/// The inverse of [`mtp_from_table`]: a Megatron name as the table writes it (MTP layers by
/// HF index).
pub fn mtp_to_table(name: &str, decoder_layers: u64) -> String {
    let Some((m, tail)) = name
        .strip_prefix(MTP_LAYERS)
        .and_then(|r| r.split_once('.'))
        .and_then(|(m, t)| Some((m.parse::<u64>().ok()?, t)))
    else {
        return name.to_string();
    };
    match tail.strip_prefix(MTP_TRANSFORMER_LAYER) {
        Some(rest) => layer_key(m + decoder_layers, rest),
        None => format!("{MTP_LAYERS}{}.{tail}", m + decoder_layers),
    }
}

// ------------------------------------------------------------------------ checkpoint folders

/// The file in a checkpoint root naming its latest iteration (a number, or `release`).
pub const LATEST_ITERATION: &str = "latest_checkpointed_iteration.txt";
/// The folder of a checkpoint released without an iteration.
pub const RELEASE: &str = "release";

/// The folder of iteration `n`: `iter_{n:07}`.
pub fn iteration_dir(n: u64) -> String {
    format!("iter_{n:07}")
}

// ------------------------------------------------------------------ Megatron-LM rank files

/// A Megatron-LM rank file's name in its rank folder.
pub const LEGACY_FILE: &str = "model_optim_rng.pt";

/// `mp_rank_{tp:02}`, with pipeline stages `mp_rank_{tp:02}_{pp:03}`, and with expert
/// parallelism `_{ep:03}` after that (Megatron-LM's `get_checkpoint_name`).
pub fn legacy_rank_dir(tp: u64, pp: u64, stages: u64, ep: u64, eps: u64) -> String {
    let mut d = format!("mp_rank_{tp:02}");
    if stages > 1 {
        d.push_str(&format!("_{pp:03}"));
    }
    if eps > 1 {
        d.push_str(&format!("_{ep:03}"));
    }
    d
}

/// The first rank folders a Megatron-LM checkpoint has (without and with pipeline stages).
pub const LEGACY_FIRST_RANKS: [&str; 2] = ["mp_rank_00", "mp_rank_00_000"];

/// Whether a folder name is a Megatron-LM rank folder's.
pub fn is_legacy_rank_dir(name: &str) -> bool {
    name.starts_with("mp_rank_")
}

/// A rank file's state dict of the model (without virtual pipeline chunks).
pub const MODEL: &str = "model";

/// The state-dict key of virtual pipeline chunk `v` (the interleaved schedule's): `model{v}`.
pub fn virtual_chunk_key(v: usize) -> String {
    format!("{MODEL}{v}")
}

/// The state-dict key of model chunk `v` in a rank file of `chunks` virtual pipeline chunks:
/// `model`, or `model0`, `model1`, ... with the interleaved schedule.
pub fn model_chunk_key(v: usize, chunks: usize) -> String {
    if chunks > 1 {
        virtual_chunk_key(v)
    } else {
        MODEL.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_keys() {
        assert_eq!(layer_key(3, "mlp.w"), "decoder.layers.3.mlp.w");
        assert_eq!(layer_pattern("mlp.w"), "decoder.layers.{l}.mlp.w");
        assert_eq!(split_layer("decoder.layers.12.mlp.w"), Some((12, "mlp.w")));
        assert_eq!(split_layer("decoder.layers.mlp.w"), None);
        assert_eq!(split_layer("language_model.decoder.layers.1.w"), None);
        assert_eq!(
            layer_split("language_model.decoder.layers.1.w"),
            Some(("language_model.decoder.layers.", 1, "w"))
        );
        assert!(is_stacked("decoder.layers.mlp.w"));
        assert!(!is_stacked("decoder.layers.0.mlp.w"));
        assert!(!is_stacked("embedding.word_embeddings.weight"));
        assert_eq!(
            unstacked_key("decoder.layers.", 2, "mlp.w"),
            layer_key(2, "mlp.w")
        );
        assert_eq!(
            stacked_key("decoder.layers.", "mlp.w"),
            "decoder.layers.mlp.w"
        );
        assert!(is_gpt_key(WORD_EMBEDDINGS) && is_gpt_key(OUTPUT_LAYER));
        assert!(is_gpt_key(FINAL_LAYERNORM) && is_gpt_key(&layer_key(0, "mlp.w")));
        assert!(!is_gpt_key("decoder.layers.0.mixer.in_proj.weight"));
        assert!(!is_gpt_key("mtp.layers.0.enorm.weight"));
        assert!(!is_gpt_key(FINAL_NORM));
    }

    #[test]
    fn decoder_layers_may_sit_in_a_submodule() {
        use super::decoder_layers as d;
        assert_eq!(
            d("decoder.layers.3.mlp.w"),
            Some(("decoder.layers.", "3.mlp.w"))
        );
        assert_eq!(
            d("language_model.decoder.layers.mlp.w"),
            Some(("language_model.decoder.layers.", "mlp.w"))
        );
        assert_eq!(d("xdecoder.layers.1.w"), None);
        assert_eq!(d("visual.blocks.0.attn.qkv.weight"), None);
    }

    #[test]
    fn expert_keys() {
        let stacked = layer_key(1, &experts_param("linear_fc1.weight"));
        assert_eq!(
            stacked,
            "decoder.layers.1.mlp.experts.experts.linear_fc1.weight"
        );
        assert!(has_stacked_experts(&stacked));
        let grouped = legacy_expert_key(&stacked, 3, false);
        assert_eq!(grouped, "decoder.layers.1.mlp.experts.linear_fc1.weight3");
        let local = legacy_expert_key(&stacked, 3, true);
        assert_eq!(
            local,
            "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"
        );
        for k in [&grouped, &local] {
            let (module, i) = legacy_local_expert(k).unwrap();
            assert_eq!(
                (module.as_str(), i),
                ("decoder.layers.1.mlp.experts.linear_fc1", 3)
            );
            let (l, param) = split_layer(&module).unwrap();
            assert_eq!(layer_key(l, &stacked_expert_weight(param)), stacked);
        }
        assert_eq!(
            legacy_local_expert("decoder.layers.1.mlp.linear_fc1.weight"),
            None
        );
        assert_eq!(
            legacy_local_expert("decoder.layers.1.mlp.experts.linear_fc1.weight"),
            None
        );
    }

    #[test]
    fn spec_names_and_extra_state() {
        let qkv_norm = "self_attention.linear_qkv.layer_norm_weight";
        assert_eq!(local_spec_name(qkv_norm), "input_layernorm.weight");
        assert_eq!(
            local_spec_name("mlp.linear_fc2.weight"),
            "mlp.linear_fc2.weight"
        );
        let has = |p: &str| p == "self_attention.linear_qkv.weight";
        assert_eq!(te_name("input_layernorm.weight", has), qkv_norm);
        assert_eq!(
            te_name("input_layernorm.weight", |_| false),
            "input_layernorm.weight"
        );
        assert_eq!(
            legacy_extra_state("decoder.layers.0.mlp.linear_fc1.weight").as_deref(),
            Some("decoder.layers.0.mlp.linear_fc1._extra_state")
        );
        assert_eq!(
            legacy_extra_state("decoder.layers.0.mlp.experts.linear_fc1.weight0").as_deref(),
            Some("decoder.layers.0.mlp.experts.linear_fc1._extra_state")
        );
        assert_eq!(
            legacy_extra_state("decoder.layers.0.mlp.experts.linear_fc1.weight1"),
            None
        );
        assert_eq!(
            legacy_extra_state("decoder.layers.0.input_layernorm.weight"),
            None
        );
        assert_eq!(legacy_extra_state(OUTPUT_LAYER), None);
        assert!(is_extra_state(
            "decoder.layers.0.mlp.linear_fc1._extra_state"
        ));
        // Stacked layers and experts, per-layer keys, the hybrid output layer.
        let fc1 = format!("{LAYERS}{}", experts_param("linear_fc1.weight"));
        assert_eq!(
            te_extra_state(&fc1, &[2, 2, 8, 4], true, false),
            ["0.0_2.2", "0.1_2.2", "1.0_2.2", "1.1_2.2"].map(|s| format!(
                "decoder.layers.mlp.experts.experts.linear_fc1._extra_state/shard_{s}"
            ))
        );
        assert_eq!(
            te_extra_state(
                "decoder.layers.3.mlp.linear_fc2.weight",
                &[4, 8],
                true,
                false
            ),
            ["decoder.layers.3.mlp.linear_fc2._extra_state/shard_0_1"]
        );
        assert_eq!(
            te_extra_state(
                "decoder.layers.self_attention.linear_qkv.weight",
                &[2, 6, 4],
                true,
                false
            ),
            ["0_2", "1_2"].map(|s| format!(
                "decoder.layers.self_attention.linear_qkv._extra_state/shard_{s}"
            ))
        );
        assert_eq!(
            te_extra_state(OUTPUT_LAYER, &[8, 4], false, true),
            ["output_layer._extra_state/shard_0_1"]
        );
        assert!(te_extra_state(OUTPUT_LAYER, &[8, 4], false, false).is_empty());
        assert_eq!(
            te_extra_state(
                "decoder.layers.0.mixer.in_proj.weight.z",
                &[8, 4],
                false,
                true
            ),
            ["decoder.layers.0.mixer.in_proj._extra_state/shard_0_1"]
        );
        assert_eq!(
            te_extra_state("mtp.layers.0.eh_proj.weight", &[8, 4], true, false),
            ["mtp.layers.0.eh_proj._extra_state/shard_0_1"]
        );
    }

    #[test]
    fn mtp_names_round_trip() {
        assert_eq!(mtp_pattern("enorm.weight"), "mtp.layers.{l}.enorm.weight");
        for (table, megatron) in [
            (
                "decoder.layers.4.mlp.linear_fc1.weight",
                "mtp.layers.1.transformer_layer.mlp.linear_fc1.weight",
            ),
            ("mtp.layers.3.enorm.weight", "mtp.layers.0.enorm.weight"),
            ("decoder.layers.2.mlp.w", "decoder.layers.2.mlp.w"),
            (OUTPUT_LAYER, OUTPUT_LAYER),
        ] {
            assert_eq!(mtp_from_table(table.into(), 3), megatron);
            assert_eq!(mtp_to_table(megatron, 3), table);
        }
    }

    #[test]
    fn rank_folders() {
        assert_eq!(iteration_dir(42), "iter_0000042");
        assert_eq!(legacy_rank_dir(1, 0, 1, 0, 1), "mp_rank_01");
        assert_eq!(legacy_rank_dir(1, 2, 4, 0, 1), "mp_rank_01_002");
        assert_eq!(legacy_rank_dir(0, 2, 4, 1, 2), "mp_rank_00_002_001");
        assert!(LEGACY_FIRST_RANKS.iter().all(|d| is_legacy_rank_dir(d)));
        assert_eq!(model_chunk_key(0, 1), "model");
        assert_eq!(model_chunk_key(1, 2), "model1");
    }
}
