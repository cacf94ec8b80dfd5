"""PyTorch eager training throughput of an HF model (bench/train.sh's MoE row, and its dense rows
when shared/oracle/train/torch_baseline.py is not there), in the
protocol of shared/oracle/train/torch_baseline.py: fp32, AdamW (lr 1e-4, wd 0.1), clip 1.0,
`threads` threads, 3 warm-up steps then 10 timed steps; the loss is the LM cross-entropy plus
megatron-core's load-balancing loss for an MoE model (scripts/moe_replay.py's, coefficient from
the config).
Prints one JSON line: tokens_per_s, peak_rss_mib.

    python scripts/moe_bench_torch.py MODEL_DIR DATA_PREFIX [--seq 512 --batch 4 --threads 2]
"""
import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_replay  # noqa: E402


def batches(prefix, seq, batch, steps):
    ids = np.fromfile(f"{prefix}.bin", dtype=np.uint16)
    n = seq + 1
    for s in range(steps):
        rows = [ids[(s * batch + b) * n:(s * batch + b + 1) * n].astype(np.int64) for b in range(batch)]
        yield torch.from_numpy(np.stack(rows))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    # A dense model (bench/train.sh's fallback when the shared baseline is not there): the LM
    # loss alone.
    moe = getattr(model.config, "num_local_experts", None) or getattr(model.config, "num_experts", None)
    if moe:
        experts, topk = moe_replay.moe_shape(model.config)
        coeff = model.config.router_aux_loss_coef
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    t0 = None
    for i, tok in enumerate(batches(a.data, a.seq, a.batch, a.warmup + a.steps)):
        if i == a.warmup:
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=tok[:, :-1], **({"output_router_logits": True} if moe else {}))
        v = out.logits.shape[-1]
        loss = F.cross_entropy(out.logits.float().reshape(-1, v), tok[:, 1:].reshape(-1))
        if moe:
            loss = loss + torch.stack(moe_replay.aux_losses(out.router_logits, experts, topk, coeff)).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    secs = time.perf_counter() - t0
    print(json.dumps({"tokens_per_s": a.steps * a.batch * a.seq / secs,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
