//! Writes benchmark HF checkpoints of random weights, streaming (never more than one tensor in
//! memory):
//!
//! make-checkpoint OUT_DIR HIDDEN LAYERS FFN VOCAB          a Llama in bf16
//! make-checkpoint OUT_DIR deepseek LAYERS EXPERTS [fp8]   DeepSeek-V3's real widths (hidden
//!     7168, 128 heads, MLA ranks 1536/512, expert ffn 2048, dense ffn 18432, vocab 129280), the
//!     first layer dense and the rest MoE with EXPERTS routed experts and one shared; `fp8`
//!     stores the projections as the release does (F8_E4M3 + f32 `weight_scale_inv` per 128×128)
//! make-checkpoint OUT_DIR gpt-oss LAYERS EXPERTS          GPT-OSS's real widths (hidden 2880,
//!     64 heads of 64, 8 KV heads, expert ffn 2880, vocab 201088; 120B has 128 experts, 20B 32)
//!     with the experts in MXFP4 as the release stores them (U8 `*_blocks` + E8M0 `*_scales`)

use serde_json::json;
use std::io::{BufWriter, Write};

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Bf16,
    F32,
    Fp8,
    /// Packed FP4 codes (any byte).
    U8,
    /// E8M0 exponents of MXFP4 blocks, 2^-9..2^0.
    E8m0,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u16 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 48) as u16
    }
}

fn write_safetensors(path: &std::path::Path, mut tensors: Vec<(String, Vec<u64>, Kind)>) -> u64 {
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let size = |k: Kind| match k {
        Kind::Bf16 => 2,
        Kind::F32 => 4,
        Kind::Fp8 | Kind::U8 | Kind::E8m0 => 1,
    };
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut off = 0u64;
    for (name, shape, k) in &tensors {
        let bytes = shape.iter().product::<u64>() * size(*k);
        let dtype = match k {
            Kind::Bf16 => "BF16",
            Kind::F32 => "F32",
            Kind::Fp8 => "F8_E4M3",
            Kind::U8 | Kind::E8m0 => "U8",
        };
        header.insert(
            name.clone(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [off, off + bytes]}),
        );
        off += bytes;
    }
    let mut hb = serde_json::to_vec(&header).unwrap();
    hb.resize(hb.len().next_multiple_of(8), b' ');
    let f = std::fs::File::create(path).unwrap();
    let mut w = BufWriter::with_capacity(8 << 20, f);
    w.write_all(&(hb.len() as u64).to_le_bytes()).unwrap();
    w.write_all(&hb).unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut buf = Vec::new();
    for (_, shape, k) in &tensors {
        let numel = shape.iter().product::<u64>() as usize;
        buf.clear();
        buf.reserve(numel * size(*k) as usize);
        for _ in 0..numel {
            let r = rng.next();
            match k {
                // Small bf16 values (sign, exponent 0x3c..0x3f).
                Kind::Bf16 => {
                    let v: u16 = (r & 0x807f) | 0x3c00 | ((r >> 4) & 0x0380);
                    buf.extend_from_slice(&v.to_le_bytes());
                }
                // Positive scales around 1e-3.
                Kind::F32 => {
                    buf.extend_from_slice(&(1e-3 * (1.0 + r as f32 / 65536.0)).to_le_bytes())
                }
                // Any E4M3 value but NaN (exponent ≤ 14).
                Kind::Fp8 => buf.push((r as u8) & 0xf7),
                Kind::U8 => buf.push(r as u8),
                Kind::E8m0 => buf.push(118 + (r % 10) as u8),
            }
        }
        w.write_all(&buf).unwrap();
    }
    w.flush().unwrap();
    off
}

fn llama(a: &[String]) -> (Vec<(String, Vec<u64>, Kind)>, serde_json::Value) {
    let n = |i: usize| a[i].parse::<u64>().expect("a number");
    let (h, layers, ffn, vocab) = (n(2), n(3), n(4), n(5));
    let heads = h / 128;
    let kv = (heads / 4).max(1);
    let kvd = kv * 128;
    let mut t: Vec<(String, Vec<u64>, Kind)> = Vec::new();
    let mut add = |name: String, shape: Vec<u64>| t.push((name, shape, Kind::Bf16));
    add("model.embed_tokens.weight".into(), vec![vocab, h]);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), vec![h]);
        add(format!("{p}.self_attn.q_proj.weight"), vec![h, h]);
        add(format!("{p}.self_attn.k_proj.weight"), vec![kvd, h]);
        add(format!("{p}.self_attn.v_proj.weight"), vec![kvd, h]);
        add(format!("{p}.self_attn.o_proj.weight"), vec![h, h]);
        add(format!("{p}.post_attention_layernorm.weight"), vec![h]);
        add(format!("{p}.mlp.gate_proj.weight"), vec![ffn, h]);
        add(format!("{p}.mlp.up_proj.weight"), vec![ffn, h]);
        add(format!("{p}.mlp.down_proj.weight"), vec![h, ffn]);
    }
    add("model.norm.weight".into(), vec![h]);
    add("lm_head.weight".into(), vec![vocab, h]);
    let cfg = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "bfloat16",
        "hidden_size": h, "num_hidden_layers": layers, "intermediate_size": ffn,
        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "head_dim": 128, "rms_norm_eps": 1e-5, "tie_word_embeddings": false
    });
    (t, cfg)
}

fn deepseek(a: &[String]) -> (Vec<(String, Vec<u64>, Kind)>, serde_json::Value) {
    let layers: u64 = a[3].parse().expect("layers");
    let experts: u64 = a[4].parse().expect("experts");
    let fp8 = a.get(5).is_some_and(|s| s == "fp8");
    let (h, heads, q_rank, kv_rank, nope, rope, v) = (7168, 128, 1536, 512, 128, 64, 128);
    let (moe_ffn, ffn, vocab) = (2048, 18432, 129280);
    let mut t: Vec<(String, Vec<u64>, Kind)> = Vec::new();
    let plain = |t: &mut Vec<_>, name: String, shape: Vec<u64>| t.push((name, shape, Kind::Bf16));
    // A projection: FP8 with its block scales in the fp8 release, else bf16.
    let proj = |t: &mut Vec<(String, Vec<u64>, Kind)>, name: String, shape: Vec<u64>| {
        if fp8 {
            let s = vec![shape[0].div_ceil(128), shape[1].div_ceil(128)];
            t.push((format!("{name}_scale_inv"), s, Kind::F32));
            t.push((name, shape, Kind::Fp8));
        } else {
            t.push((name, shape, Kind::Bf16));
        }
    };
    plain(&mut t, "model.embed_tokens.weight".into(), vec![vocab, h]);
    plain(&mut t, "lm_head.weight".into(), vec![vocab, h]);
    plain(&mut t, "model.norm.weight".into(), vec![h]);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        plain(&mut t, format!("{p}.input_layernorm.weight"), vec![h]);
        plain(
            &mut t,
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
        );
        let a = format!("{p}.self_attn");
        proj(&mut t, format!("{a}.q_a_proj.weight"), vec![q_rank, h]);
        plain(&mut t, format!("{a}.q_a_layernorm.weight"), vec![q_rank]);
        proj(
            &mut t,
            format!("{a}.q_b_proj.weight"),
            vec![heads * (nope + rope), q_rank],
        );
        proj(
            &mut t,
            format!("{a}.kv_a_proj_with_mqa.weight"),
            vec![kv_rank + rope, h],
        );
        plain(&mut t, format!("{a}.kv_a_layernorm.weight"), vec![kv_rank]);
        proj(
            &mut t,
            format!("{a}.kv_b_proj.weight"),
            vec![heads * (nope + v), kv_rank],
        );
        proj(&mut t, format!("{a}.o_proj.weight"), vec![h, heads * v]);
        let m = format!("{p}.mlp");
        let mlp = |t: &mut Vec<_>, pre: &str, f: u64| {
            proj(t, format!("{pre}.gate_proj.weight"), vec![f, h]);
            proj(t, format!("{pre}.up_proj.weight"), vec![f, h]);
            proj(t, format!("{pre}.down_proj.weight"), vec![h, f]);
        };
        if l == 0 {
            mlp(&mut t, &m, ffn);
        } else {
            plain(&mut t, format!("{m}.gate.weight"), vec![experts, h]);
            t.push((
                format!("{m}.gate.e_score_correction_bias"),
                vec![experts],
                Kind::F32,
            ));
            mlp(&mut t, &format!("{m}.shared_experts"), moe_ffn);
            for e in 0..experts {
                mlp(&mut t, &format!("{m}.experts.{e}"), moe_ffn);
            }
        }
    }
    let mut cfg = json!({
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "dtype": "bfloat16", "hidden_size": h, "num_hidden_layers": layers,
        "intermediate_size": ffn, "moe_intermediate_size": moe_ffn,
        "num_attention_heads": heads, "num_key_value_heads": heads, "vocab_size": vocab,
        "q_lora_rank": q_rank, "kv_lora_rank": kv_rank, "qk_nope_head_dim": nope,
        "qk_rope_head_dim": rope, "v_head_dim": v, "head_dim": rope,
        "n_routed_experts": experts, "n_shared_experts": 1, "num_experts_per_tok": 8,
        "first_k_dense_replace": 1, "n_group": 8, "topk_group": 4, "norm_topk_prob": true,
        "routed_scaling_factor": 2.5, "rms_norm_eps": 1e-6, "max_position_embeddings": 163840,
        "rope_theta": 10000.0, "tie_word_embeddings": false
    });
    if fp8 {
        cfg["quantization_config"] = json!({"activation_scheme": "dynamic", "fmt": "e4m3",
            "quant_method": "fp8", "weight_block_size": [128, 128]});
    }
    (t, cfg)
}

fn gpt_oss(a: &[String]) -> (Vec<(String, Vec<u64>, Kind)>, serde_json::Value) {
    let layers: u64 = a[3].parse().expect("layers");
    let experts: u64 = a[4].parse().expect("experts");
    let (h, heads, kv, hd, ffn, vocab) = (2880, 64, 8, 64, 2880, 201088);
    let mut t: Vec<(String, Vec<u64>, Kind)> = Vec::new();
    let mut add = |name: String, shape: Vec<u64>, k: Kind| t.push((name, shape, k));
    add(
        "model.embed_tokens.weight".into(),
        vec![vocab, h],
        Kind::Bf16,
    );
    add("lm_head.weight".into(), vec![vocab, h], Kind::Bf16);
    add("model.norm.weight".into(), vec![h], Kind::Bf16);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for n in ["input_layernorm", "post_attention_layernorm"] {
            add(format!("{p}.{n}.weight"), vec![h], Kind::Bf16);
        }
        let a = format!("{p}.self_attn");
        for (n, rows) in [("q", heads * hd), ("k", kv * hd), ("v", kv * hd)] {
            add(format!("{a}.{n}_proj.weight"), vec![rows, h], Kind::Bf16);
            add(format!("{a}.{n}_proj.bias"), vec![rows], Kind::Bf16);
        }
        add(
            format!("{a}.o_proj.weight"),
            vec![h, heads * hd],
            Kind::Bf16,
        );
        add(format!("{a}.o_proj.bias"), vec![h], Kind::Bf16);
        add(format!("{a}.sinks"), vec![heads], Kind::Bf16);
        let m = format!("{p}.mlp");
        add(format!("{m}.router.weight"), vec![experts, h], Kind::Bf16);
        add(format!("{m}.router.bias"), vec![experts], Kind::Bf16);
        // MXFP4: [E, out, in/32, 16] codes and [E, out, in/32] exponents.
        for (n, out, inp) in [("gate_up_proj", 2 * ffn, h), ("down_proj", h, ffn)] {
            let x = format!("{m}.experts.{n}");
            add(
                format!("{x}_blocks"),
                vec![experts, out, inp / 32, 16],
                Kind::U8,
            );
            add(
                format!("{x}_scales"),
                vec![experts, out, inp / 32],
                Kind::E8m0,
            );
            add(format!("{x}_bias"), vec![experts, out], Kind::Bf16);
        }
    }
    let cfg = json!({
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "dtype": "bfloat16",
        "hidden_size": h, "num_hidden_layers": layers, "intermediate_size": ffn,
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
        "vocab_size": vocab, "num_local_experts": experts, "num_experts_per_tok": 4,
        "attention_bias": true, "rms_norm_eps": 1e-5, "sliding_window": 128,
        "layer_types": (0..layers).map(|l| if l % 2 == 0 { "sliding_attention" } else { "full_attention" }).collect::<Vec<_>>(),
        "max_position_embeddings": 131072, "tie_word_embeddings": false,
        "rope_parameters": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
            "beta_slow": 1.0, "original_max_position_embeddings": 4096, "rope_theta": 150000.0,
            "truncate": false},
        "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
            "lm_head"]}
    });
    (t, cfg)
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (tensors, cfg) = match a.get(2).map(String::as_str) {
        Some("deepseek") if a.len() >= 5 => deepseek(&a),
        Some("gpt-oss") if a.len() == 5 => gpt_oss(&a),
        Some(_) if a.len() == 6 => llama(&a),
        _ => {
            eprintln!("usage: make-checkpoint OUT_DIR HIDDEN LAYERS FFN VOCAB\n       make-checkpoint OUT_DIR deepseek LAYERS EXPERTS [fp8]\n       make-checkpoint OUT_DIR gpt-oss LAYERS EXPERTS");
            std::process::exit(2);
        }
    };
    let out = std::path::PathBuf::from(&a[1]);
    std::fs::create_dir_all(&out).unwrap();
    let params: u64 = tensors
        .iter()
        .map(|(_, s, _)| s.iter().product::<u64>())
        .sum();
    let bytes = write_safetensors(&out.join("model.safetensors"), tensors);
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    println!("{params} params, {bytes} bytes -> {}", out.display());
}
