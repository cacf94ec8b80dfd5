#!/usr/bin/env python3
"""Inputs of bench/train.sh: the model and data of the PyTorch baseline
(shared/oracle/train/torch_baseline.py), so both trainers start from the same weights.

    python scripts/train_bench_setup.py OUT_DIR

- OUT_DIR/llama25m: the baseline's 32M-parameter Llama (hidden 512, 8 layers, 8 heads / 4 KV
  heads of 64, ffn 1408, vocab 8192), made exactly as the baseline makes it (torch.manual_seed(0),
  LlamaForCausalLM._from_config, fp32) and saved with save_pretrained, plus a byte-level BPE
  tokenizer.json of 8192 tokens (the trainer reads token ids, never text).
- OUT_DIR/mixtral: a Mixtral of the same attention, embeddings and depth, its MLPs 8 routed
  experts of ffn 704, top-2 (the same active FFN width per token as the Llama's 1408; 84M
  parameters in all), made the same way.
- OUT_DIR/tokens_text_document.{bin,idx}: a Megatron indexed dataset (uint16) of random token
  ids 3..8191 in documents of 200..2000 tokens, 2M tokens in all (seed 1234);
  OUT_DIR/tiny_text_document the same with ids 3..255 (the tiny fixture's vocabulary).

Needs torch and transformers (the oracle venv).
"""
import json
import struct
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

LLAMA_25M = dict(
    vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024,
    rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu", attention_bias=False,
    mlp_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


MIXTRAL = {**{k: v for k, v in LLAMA_25M.items() if k not in ("attention_bias", "mlp_bias")},
           "intermediate_size": 704, "num_local_experts": 8, "num_experts_per_tok": 2,
           "router_aux_loss_coef": 0.01}


def model(out: Path, config=LlamaConfig, arch=LlamaForCausalLM, fields=LLAMA_25M):
    cfg = config(**fields, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg.use_cache = False
    torch.manual_seed(0)
    m = arch._from_config(cfg, attn_implementation="sdpa", torch_dtype=torch.float32)
    m.save_pretrained(out, safe_serialization=True)
    vocab = {f"<t{i}>": i for i in range(cfg.vocab_size)}
    tok = {"model": {"type": "BPE", "vocab": vocab, "merges": []}, "added_tokens": []}
    (out / "tokenizer.json").write_text(json.dumps(tok))


def dataset(prefix: Path, vocab: int, tokens=2_000_000, seed=1234):
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < tokens:
        sizes.append(int(rng.integers(200, 2001)))
    ids = rng.integers(3, vocab, size=sum(sizes), dtype=np.uint16)
    prefix.with_suffix(".bin").write_bytes(ids.tobytes())
    sizes = np.array(sizes, dtype=np.int32)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    pointers[1:] = np.cumsum(sizes[:-1].astype(np.int64) * 2)
    doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)
    with open(prefix.with_suffix(".idx"), "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", 8))  # uint16
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(sizes.tobytes())
        f.write(pointers.tobytes())
        f.write(doc_idx.tobytes())


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    model(out / "llama25m")
    model(out / "mixtral", MixtralConfig, MixtralForCausalLM, MIXTRAL)
    dataset(out / "tokens_text_document", 8192)
    dataset(out / "tiny_text_document", 256)
    print(out)
