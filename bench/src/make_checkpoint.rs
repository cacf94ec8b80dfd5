//! Writes a Llama-shaped HF checkpoint of random bf16 weights, streaming (never more than one
//! tensor in memory), for benchmarks.
//!
//! make-checkpoint OUT_DIR HIDDEN LAYERS FFN VOCAB

use std::io::{BufWriter, Write};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 6 {
        eprintln!("usage: make-checkpoint OUT_DIR HIDDEN LAYERS FFN VOCAB");
        std::process::exit(2);
    }
    let out = std::path::PathBuf::from(&a[1]);
    let n = |i: usize| a[i].parse::<u64>().expect("a number");
    let (h, layers, ffn, vocab) = (n(2), n(3), n(4), n(5));
    let heads = h / 128;
    let kv = (heads / 4).max(1);
    let kvd = kv * 128;

    let mut tensors: Vec<(String, Vec<u64>)> =
        vec![("model.embed_tokens.weight".into(), vec![vocab, h])];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        tensors.push((format!("{p}.input_layernorm.weight"), vec![h]));
        tensors.push((format!("{p}.self_attn.q_proj.weight"), vec![h, h]));
        tensors.push((format!("{p}.self_attn.k_proj.weight"), vec![kvd, h]));
        tensors.push((format!("{p}.self_attn.v_proj.weight"), vec![kvd, h]));
        tensors.push((format!("{p}.self_attn.o_proj.weight"), vec![h, h]));
        tensors.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        tensors.push((format!("{p}.mlp.gate_proj.weight"), vec![ffn, h]));
        tensors.push((format!("{p}.mlp.up_proj.weight"), vec![ffn, h]));
        tensors.push((format!("{p}.mlp.down_proj.weight"), vec![h, ffn]));
    }
    tensors.push(("model.norm.weight".into(), vec![h]));
    tensors.push(("lm_head.weight".into(), vec![vocab, h]));
    tensors.sort_by(|a, b| a.0.cmp(&b.0));

    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut off = 0u64;
    for (name, shape) in &tensors {
        let bytes = shape.iter().product::<u64>() * 2;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [off, off + bytes]}),
        );
        off += bytes;
    }
    let mut hb = serde_json::to_vec(&header).unwrap();
    hb.resize(hb.len().next_multiple_of(8), b' ');

    std::fs::create_dir_all(&out).unwrap();
    let f = std::fs::File::create(out.join("model.safetensors")).unwrap();
    let mut w = BufWriter::with_capacity(8 << 20, f);
    w.write_all(&(hb.len() as u64).to_le_bytes()).unwrap();
    w.write_all(&hb).unwrap();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut buf = Vec::new();
    for (_, shape) in &tensors {
        let numel = shape.iter().product::<u64>() as usize;
        buf.clear();
        buf.reserve(numel * 2);
        for _ in 0..numel {
            // xorshift64*, mapped to small bf16 values (sign, exponent 0x3c..0x3f).
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let r = (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 48) as u16;
            let v: u16 = (r & 0x807f) | 0x3c00 | ((r >> 4) & 0x0380);
            buf.extend_from_slice(&v.to_le_bytes());
        }
        w.write_all(&buf).unwrap();
    }
    w.flush().unwrap();
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "bfloat16",
            "hidden_size": h, "num_hidden_layers": layers, "intermediate_size": ffn,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
            "head_dim": 128, "rms_norm_eps": 1e-5, "tie_word_embeddings": false
        }))
        .unwrap(),
    )
    .unwrap();
    let params: u64 = tensors.iter().map(|(_, s)| s.iter().product::<u64>()).sum();
    println!("{} params, {} bytes -> {}", params, off, out.display());
}
