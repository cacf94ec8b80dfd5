"""Replay megatron-core's training loop in plain torch on an HF LlamaForCausalLM, as the judge
for the trainer's numerical tests (goldens in tests/fixtures/train/).

    python scripts/train_replay.py                       # one run, default (per-micro-batch) loss
    python scripts/train_replay.py --per-token-loss      # one run, calculate_per_token_loss=True
    python scripts/train_replay.py --write-fixtures tests/fixtures/train   # both runs + goldens
    python scripts/train_replay.py --write-bf16 tests/fixtures/train --batches tests/fixtures/train/batches.safetensors

Loop per iteration k (1-based), all fp32, data parallel 1:
  zero_grad
  for each micro-batch j (samples [j*MBS, (j+1)*MBS) of the global batch):
      ce = cross_entropy(logits.float().view(-1, V), labels.view(-1), reduction='none')
      s, n = sum(ce * mask), sum(mask)
      default:   backward(s / max(n, 1) / num_microbatches)
      per-token: backward(s)                           (then grads *= 1/max(sum n, 1))
  grad_norm = global L2 norm (pre-clip); grads *= 1/(norm + 1e-6) if that is < 1
  lr = OptimizerParamScheduler.get_lr(n_samples = (k-1)*GBS), written into every group
  AdamW step (decoupled wd on the >=2-D non-bias params only)

--bf16 replays megatron-core's mixed precision (`--bf16`): fp32 master weights rounded to a bf16
copy of the model each iteration, forward and backward in bf16 (HF's eager Llama: RMSNorm and
softmax computed in fp32, logits upcast for the loss), each micro-batch's bf16 gradients added
into fp32 gradients (megatron-core's main_grad), clip and AdamW in fp32 on the master weights.

Needs torch, transformers, safetensors (the oracle venv). Not used by the build or CI.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "tests" / "fixtures" / "shared" / "hf" / "llama"


# ----------------------------------------------------------------------------- settings
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="HF LlamaForCausalLM directory")
    p.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=32)
    p.add_argument("--gbs", type=int, default=4, help="global batch size (samples per iteration)")
    p.add_argument("--mbs", type=int, default=2, help="micro batch size")
    p.add_argument("--train-iters", type=int, default=20)
    p.add_argument("--per-token-iters", type=int, default=5,
                   help="iterations of the per-token golden run (--write-fixtures only)")
    p.add_argument("--seed", type=int, default=1234, help="data seed")
    p.add_argument("--mask-prob", type=float, default=0.8, help="P(loss_mask = 1) before the edits")
    p.add_argument("--batches", default=None,
                   help="read tokens/loss_mask from this safetensors file instead of generating")
    p.add_argument("--lr-warmup-init", type=float, default=0.0)
    p.add_argument("--max-lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--lr-warmup-iters", type=int, default=2)
    p.add_argument("--lr-decay-iters", type=int, default=20)
    p.add_argument("--lr-decay-style", default="cosine", choices=["cosine", "linear", "constant"])
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--weight-decay", type=float, default=0.033,
                   help="effective wd (the scheduler's constant start/end wd) on >=2-D non-bias params")
    p.add_argument("--clip-grad", type=float, default=1.0, help="max global L2 norm; 0 disables")
    p.add_argument("--per-token-loss", action="store_true",
                   help="calculate_per_token_loss=True (single-run mode)")
    p.add_argument("--json", default=None, help="single-run mode: write the run's record here")
    p.add_argument("--write-bf16", default=None, metavar="DIR",
                   help="the mixed-precision golden: final_bf16.safetensors + expected_bf16.json")
    p.add_argument("--write-lora", default=None, metavar="DIR",
                   help="the LoRA golden (r 8, alpha 16, Bridge's fused adapters): lora_init, lora_grads_iter1, final_lora_merged, expected_lora.json")
    p.add_argument("--dora", action="store_true", help="with --write-lora: Bridge's DoRA (dora_* goldens)")
    p.add_argument("--canonical", action="store_true",
                   help="with --write-lora: canonical LoRA trained by peft itself (canonical_* goldens)")
    p.add_argument("--bf16-base", action="store_true",
                   help="with --write-lora --canonical: the frozen model in bf16, peft's adapters kept in fp32 "
                        "(its autocast_adapter_dtype; our lora_dtype = f32 under bf16): canonical_bf16base_* goldens")
    p.add_argument("--write-fp16", default=None, metavar="DIR",
                   help="the same in fp16 with dynamic loss scaling: final_fp16.safetensors + expected_fp16.json")
    p.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32)
    p.add_argument("--loss-scale-window", type=int, default=1000)
    p.add_argument("--write-fixtures", default=None, metavar="DIR",
                   help="run both loss modes and the self-checks, write the golden files into DIR")
    return p.parse_args(argv)


def settings_dict(a, loss_mode, train_iters):
    return {
        "model": "tests/fixtures/shared/hf/llama" if Path(a.model).resolve() == DEFAULT_MODEL.resolve() else a.model,
        "attn_implementation": a.attn,
        "dtype": "float32",
        "seq_length": a.seq_length,
        "global_batch_size": a.gbs,
        "micro_batch_size": a.mbs,
        "num_microbatches": a.gbs // a.mbs,
        "data_parallel_size": 1,
        "train_iters": train_iters,
        "seed": a.seed,
        "mask_prob": a.mask_prob,
        "loss_mode": loss_mode,
        "calculate_per_token_loss": loss_mode == "per_token",
        "lr_schedule": {
            "style": a.lr_decay_style,
            "lr_warmup_init": a.lr_warmup_init,
            "max_lr": a.max_lr,
            "min_lr": a.min_lr,
            "lr_warmup_iters": a.lr_warmup_iters,
            "lr_decay_iters": a.lr_decay_iters,
            "lr_warmup_steps_samples": a.lr_warmup_iters * a.gbs,
            "lr_decay_steps_samples": a.lr_decay_iters * a.gbs,
            "num_steps_at_iteration_k": "(k-1)*global_batch_size",
        },
        "optimizer": {
            "type": "torch.optim.AdamW",
            "foreach": False,
            "betas": [a.beta1, a.beta2],
            "eps": a.eps,
            "weight_decay": a.weight_decay,
            "weight_decay_applies_to": "params with ndim >= 2 not named *.bias; 0 for the rest",
        },
        "clip_grad": a.clip_grad,
        "clip_eps": 1e-6,
    }


# ----------------------------------------------------------------------------- data
def make_batches(a, vocab, iters):
    """tokens int64 [iters, GBS, seq+1] uniform in [0, vocab); loss_mask f32 [iters, GBS, seq]
    (aligned with labels = tokens[..., 1:]), Bernoulli(mask_prob), then two edits in
    iteration 0 so that the per-micro-batch average differs from the token average:
      * sample 0: mask all zero in its second half;
      * samples 2 and 3 (micro-batch 1 at MBS 2): only 6 masked tokens in all
        (the first 4 positions of sample 2, the last 2 of sample 3)."""
    g = torch.Generator().manual_seed(a.seed)
    tokens, mask = [], []
    for _ in range(iters):  # per iteration, so that fewer iterations give a prefix
        tokens.append(torch.randint(0, vocab, (a.gbs, a.seq_length + 1), generator=g, dtype=torch.int64))
        mask.append((torch.rand((a.gbs, a.seq_length), generator=g) < a.mask_prob).to(torch.float32))
    tokens, mask = torch.stack(tokens), torch.stack(mask)
    mask[0, 0, a.seq_length // 2:] = 0.0
    if a.gbs >= 4:
        mask[0, 2, :] = 0.0
        mask[0, 2, :4] = 1.0
        mask[0, 3, :] = 0.0
        mask[0, 3, -2:] = 1.0
    return tokens, mask


# ----------------------------------------------------------------------------- model / optim
def load_model(path, attn):
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    model = LlamaForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32)
    model.train()  # dropout is 0 in the fixture; train() only mirrors a training run
    # megatron-core's VocabParallelEmbedding has no padding index: the pad token's row gets its
    # gradient like any other (HF's nn.Embedding(padding_idx=pad_token_id) would zero it).
    model.model.embed_tokens.padding_idx = None
    return model


def param_groups(model, wd):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if (p.ndim < 2 or name.endswith(".bias")) else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def get_lr(a, num_steps):
    """megatron-core OptimizerParamScheduler.get_lr, num_steps counted in samples."""
    warmup = a.lr_warmup_iters * a.gbs
    decay = a.lr_decay_iters * a.gbs
    if warmup > 0 and num_steps <= warmup:
        return a.lr_warmup_init + (a.max_lr - a.lr_warmup_init) * float(num_steps) / float(warmup)
    if a.lr_decay_style == "constant":
        return a.max_lr
    if num_steps > decay:
        return a.min_lr
    ratio = float(num_steps - warmup) / float(decay - warmup)
    if a.lr_decay_style == "linear":
        coeff = 1.0 - ratio
    else:
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return a.min_lr + coeff * (a.max_lr - a.min_lr)


def microbatch_loss(model, tokens, mask):
    """tokens [b, seq+1], mask [b, seq] -> (masked CE sum, num_tokens, logits)"""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    logits = model(input_ids=inputs).logits.float()
    v = logits.shape[-1]
    ce = F.cross_entropy(logits.reshape(-1, v), labels.reshape(-1), reduction="none")
    m = mask.reshape(-1)
    return torch.sum(ce * m), torch.sum(m), logits


def forward_backward(model, tokens, mask, mbs, per_token):
    """One iteration's micro-batches (tokens [GBS, seq+1]). Grads are accumulated into .grad
    (zero them first) and, in per-token mode, scaled by 1/total_tokens as finalize_model_grads
    does. Returns the record of the iteration's losses."""
    gbs = tokens.shape[0]
    assert gbs % mbs == 0, "GBS must be a multiple of MBS"
    nmb = gbs // mbs
    sums, counts = [], []
    for j in range(nmb):
        s, n, _ = microbatch_loss(model, tokens[j * mbs:(j + 1) * mbs], mask[j * mbs:(j + 1) * mbs])
        if per_token:
            s.backward()
        else:
            (s / torch.clamp(n, min=1) / nmb).backward()
        sums.append(s.detach())
        counts.append(n.detach())
    sums, counts = torch.stack(sums), torch.stack(counts)
    total_tokens = counts.sum()
    if per_token:
        scale = 1.0 / torch.clamp(total_tokens.to(torch.int64), min=1)  # f32 scalar, as mcore
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    loss_mb = sums / torch.clamp(counts, min=1)
    token_mean = (sums.sum() / torch.clamp(total_tokens, min=1)).item()
    return {
        # the iteration loss: default mode = mean over micro-batches of the per-micro-batch
        # token mean; per-token mode = total masked CE / total tokens
        "loss": token_mean if per_token else loss_mb.mean().item(),
        # what Megatron-Bridge's train_step logs in either mode ([sum, n] summed over mbs)
        "loss_token_mean": token_mean,
        "loss_mb": [x.item() for x in loss_mb],
        "loss_sum_mb": [x.item() for x in sums],
        "num_tokens_mb": [int(x.item()) for x in counts],
        "num_tokens": int(total_tokens.item()),
    }


def grad_norm_and_clip(model, clip):
    params = [p for p in model.parameters() if p.grad is not None]
    if clip > 0:
        # total = ||(||g_i||)_i||_2, coeff = clip/(total + 1e-6) applied only if < 1
        norm = torch.nn.utils.clip_grad_norm_(params, clip, norm_type=2.0, foreach=False)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    norm = norm.item()
    return norm, bool(clip > 0 and clip / (norm + 1e-6) < 1.0)


def setup_torch(threads):
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)


def train(a, tokens, mask, per_token, iters, attn=None, grads_at_iter1=None, log=True):
    """Runs `iters` iterations from the fixture's weights. Returns (records, model)."""
    model = load_model(a.model, attn or a.attn)
    opt = torch.optim.AdamW(param_groups(model, a.weight_decay), lr=0.0, betas=(a.beta1, a.beta2),
                            eps=a.eps, foreach=False)
    records = []
    for k in range(1, iters + 1):
        opt.zero_grad(set_to_none=True)
        rec = forward_backward(model, tokens[k - 1], mask[k - 1], a.mbs, per_token)
        if k == 1 and grads_at_iter1 is not None:
            for name, p in model.named_parameters():
                grads_at_iter1[name] = p.grad.detach().clone().contiguous()
        rec["grad_norm"], rec["clipped"] = grad_norm_and_clip(model, a.clip_grad)
        lr = get_lr(a, (k - 1) * a.gbs)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        with torch.no_grad():
            rec["param_norm"] = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p) for p in model.parameters()])).item()
        rec = {"iteration": k, "lr": lr, **rec}
        records.append(rec)
        if log:
            print(f"  iter {k:3d}  lr {lr:.6e}  loss {rec['loss']:.9f}  tokens {rec['num_tokens']:3d} "
                  f"{rec['num_tokens_mb']}  grad_norm {rec['grad_norm']:.6e}"
                  f"{'  (clipped)' if rec['clipped'] else ''}")
    return records, model


class DynamicScaler:
    """megatron-core's DynamicGradScaler (backoff 0.5, growth 2)."""

    def __init__(self, scale, min_scale, window, hysteresis):
        self.scale, self.min_scale, self.window, self.hysteresis = scale, min_scale, window, hysteresis
        self.growth, self.hyst = 0, hysteresis

    def update(self, found_inf):
        if found_inf:
            self.growth = 0
            self.hyst -= 1
            if self.hyst <= 0:
                self.scale = max(self.scale * 0.5, self.min_scale)
        else:
            self.growth += 1
            if self.growth == self.window:
                self.growth, self.hyst = 0, self.hysteresis
                self.scale *= 2.0


def train_bf16(a, tokens, mask, iters, log=True, dtype=torch.bfloat16):
    """`train` under mixed precision (see the module docstring); fp16 with megatron-core's
    dynamic loss scaling. Returns (records, master)."""
    import copy

    master = load_model(a.model, a.attn)
    compute = copy.deepcopy(master).to(dtype)
    scaler = DynamicScaler(a.initial_loss_scale, 1.0, a.loss_scale_window, 2) if dtype == torch.float16 else None
    scheduled = 0
    pairs = list(zip(master.parameters(), compute.parameters()))
    opt = torch.optim.AdamW(param_groups(master, a.weight_decay), lr=0.0, betas=(a.beta1, a.beta2),
                            eps=a.eps, foreach=False)
    records = []
    nmb = a.gbs // a.mbs
    for k in range(1, iters + 1):
        with torch.no_grad():
            for m, c in pairs:
                c.copy_(m)  # round to nearest even
        for m, _ in pairs:
            m.grad = torch.zeros_like(m)
        sums, counts = [], []
        for j in range(nmb):
            compute.zero_grad(set_to_none=True)
            sl = slice(j * a.mbs, (j + 1) * a.mbs)
            s_, n, _ = microbatch_loss(compute, tokens[k - 1][sl], mask[k - 1][sl])
            scaled = s_ / torch.clamp(n, min=1) / nmb
            (scaled * scaler.scale if scaler else scaled).backward()
            with torch.no_grad():
                for m, c in pairs:
                    if c.grad is not None:
                        m.grad += c.grad.float()
            sums.append(s_.detach())
            counts.append(n.detach())
        sums, counts = torch.stack(sums), torch.stack(counts)
        rec = {"loss": (sums.sum() / torch.clamp(counts.sum(), min=1)).item(),
               "num_tokens": int(counts.sum().item())}
        lr = get_lr(a, scheduled)
        if scaler:
            inv = torch.tensor(1.0 / scaler.scale, dtype=torch.float32)
            found_inf = False
            with torch.no_grad():
                for m, _ in pairs:
                    m.grad.mul_(inv)
                    found_inf |= not bool(torch.isfinite(m.grad).all())
            rec["loss_scale"] = scaler.scale
            scaler.update(found_inf)
            rec["skipped"] = found_inf
            if found_inf:
                records.append({"iteration": k, "lr": lr, **rec})
                if log:
                    print(f"  fp16 iter {k:3d}  skipped at loss scale {rec['loss_scale']}")
                continue
        rec["grad_norm"], rec["clipped"] = grad_norm_and_clip(master, a.clip_grad)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        scheduled += a.gbs
        records.append({"iteration": k, "lr": lr, **rec})
        if log:
            print(f"  mixed iter {k:3d}  lr {lr:.6e}  loss {rec['loss']:.9f}  grad_norm {rec['grad_norm']:.6e}")
    return records, master


def train_adapters(a, model, adapters, tokens, mask, iters, tag):
    """megatron-core's loop over the adapter tensors only (`adapters`: Megatron name ->
    parameter; Megatron's no-decay rule for the 1-D ones, DoRA's magnitudes). Returns the
    records and the first iteration's gradients by Megatron name; prints a line per iteration
    under `tag` (None: quiet)."""
    params = list(adapters.values())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": a.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=0.0,
                            betas=(a.beta1, a.beta2), eps=a.eps, foreach=False)
    records, grads1, nmb = [], {}, a.gbs // a.mbs
    for k in range(1, iters + 1):
        opt.zero_grad(set_to_none=True)
        sums, counts = [], []
        for j in range(nmb):
            sl = slice(j * a.mbs, (j + 1) * a.mbs)
            s_, n, _ = microbatch_loss(model, tokens[k - 1][sl], mask[k - 1][sl])
            (s_ / torch.clamp(n, min=1) / nmb).backward()
            sums.append(s_.detach()); counts.append(n.detach())
        if k == 1:
            grads1 = {n: t.grad.detach().clone() for n, t in adapters.items()}
        sums, counts = torch.stack(sums), torch.stack(counts)
        rec = {"loss": (sums.sum() / torch.clamp(counts.sum(), min=1)).item(), "num_tokens": int(counts.sum().item())}
        rec["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, a.clip_grad, norm_type=2.0, foreach=False).item()
        lr = get_lr(a, (k - 1) * a.gbs)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        records.append({"iteration": k, "lr": lr, **rec})
        if tag:
            print(f"  {tag} iter {k:3d}  lr {lr:.6e}  loss {rec['loss']:.9f}  grad_norm {rec['grad_norm']:.6e}")
    return records, grads1


def train_lora(a, tokens, mask, iters, r=8, alpha=16.0, log=True, dora=False):
    """The same loop under Megatron-Bridge's LoRA on the fused layers, restated on HF's modules:
    one A shared by q, k and v (B's rows in Megatron's per-group q/k/v order) and one by gate and
    up (B = [gate; up]), one adapter each on o_proj and down_proj; the model frozen; A xavier-
    normal, B N(0, 0.02) (not zero, so A has gradients from the first step); scale alpha/r.
    With `dora`, Bridge's DoRA on top: a magnitude m per fused row (‖W0 + s·B0·A0‖_row at
    the start, trainable), each projection's output scaled by m / ‖W + s·B·A‖_row (detached).
    Returns (records, adapters by Megatron name, initial adapters, merged HF state dict)."""
    import torch.nn.functional as F

    model = load_model(a.model, a.attn)
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = model.config
    H, nq, nkv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or H // nq
    hpg, ffn = nq // nkv, cfg.intermediate_size
    # Megatron's fused qkv rows: per group g, its q heads, then k_g, then v_g.
    q_idx, k_idx, v_idx, at = [], [], [], 0
    for g in range(nkv):
        q_idx += range(at, at + hpg * d); at += hpg * d
        k_idx += range(at, at + d); at += d
        v_idx += range(at, at + d); at += d
    q_idx, k_idx, v_idx = (torch.tensor(x) for x in (q_idx, k_idx, v_idx))
    torch.manual_seed(0)
    scale = alpha / r
    adapters = {}

    def adapter(name, out_f, in_f):
        A = torch.empty(r, in_f)
        torch.nn.init.xavier_normal_(A)
        B = torch.randn(out_f, r) * 0.02
        A.requires_grad_(True); B.requires_grad_(True)
        adapters[f"{name}.adapter.linear_in.weight"] = A
        adapters[f"{name}.adapter.linear_out.weight"] = B
        return A, B

    def patch(mod, A, B, rows=None, m=None):
        W = mod.weight
        def fwd(x, W=W, A=A, B=B, rows=rows, m=m):
            Bp = B if rows is None else B.index_select(0, rows)
            y = F.linear(x, W) + scale * F.linear(F.linear(x, A), Bp)
            if m is None:
                return y
            mp = m if rows is None else m.index_select(0, rows)
            n = torch.linalg.norm(W + scale * (Bp.detach() @ A.detach()), dim=1).detach()
            return y * (mp / n)
        mod.forward = fwd

    def add_m(name, pieces, A, B):
        """DoRA's m for a fused module: pieces = [(W_part, rows of B)]."""
        out_f = B.shape[0]
        m = torch.empty(out_f)
        with torch.no_grad():
            for W, rows in pieces:
                Bp = B if rows is None else B.index_select(0, rows)
                nrm = torch.linalg.norm(W + scale * Bp @ A, dim=1)
                if rows is None:
                    m[:] = nrm
                else:
                    m[rows] = nrm
        m.requires_grad_(True)
        adapters[f"{name}.adapter.weight_magnitude"] = m
        return m

    gate_rows, up_rows = torch.arange(0, ffn), torch.arange(ffn, 2 * ffn)
    for l, layer in enumerate(model.model.layers):
        at_, mlp = layer.self_attn, layer.mlp
        pre = f"decoder.layers.{l}."
        groups = [
            ("self_attention.linear_qkv", (nq + 2 * nkv) * d, H,
             [(at_.q_proj, q_idx), (at_.k_proj, k_idx), (at_.v_proj, v_idx)]),
            ("self_attention.linear_proj", H, nq * d, [(at_.o_proj, None)]),
            ("mlp.linear_fc1", 2 * ffn, H, [(mlp.gate_proj, gate_rows), (mlp.up_proj, up_rows)]),
            ("mlp.linear_fc2", H, ffn, [(mlp.down_proj, None)]),
        ]
        for module, out_f, in_f, parts in groups:
            A, B = adapter(pre + module, out_f, in_f)
            m = add_m(pre + module, [(p.weight, rows) for p, rows in parts], A, B) if dora else None
            for p, rows in parts:
                patch(p, A, B, rows, m)
    initial = {n: t.detach().clone() for n, t in adapters.items()}
    records, grads1 = train_adapters(a, model, adapters, tokens, mask, iters, "lora" if log else None)
    # Merged HF weights: W0 + scale * B_part @ A (DoRA: rows rescaled to m / their norm).
    merged = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        if dora:
            for l, layer in enumerate(model.model.layers):
                pre = f"decoder.layers.{l}."
                at_, mlp = layer.self_attn, layer.mlp
                for module, parts in (
                    ("self_attention.linear_qkv", [("self_attn.q_proj", q_idx), ("self_attn.k_proj", k_idx), ("self_attn.v_proj", v_idx)]),
                    ("self_attention.linear_proj", [("self_attn.o_proj", None)]),
                    ("mlp.linear_fc1", [("mlp.gate_proj", gate_rows), ("mlp.up_proj", up_rows)]),
                    ("mlp.linear_fc2", [("mlp.down_proj", None)]),
                ):
                    A = adapters[pre + module + ".adapter.linear_in.weight"]
                    B = adapters[pre + module + ".adapter.linear_out.weight"]
                    m = adapters[pre + module + ".adapter.weight_magnitude"]
                    for hf, rows in parts:
                        key = f"model.layers.{l}.{hf}.weight"
                        Bp = B if rows is None else B.index_select(0, rows)
                        mp = m if rows is None else m.index_select(0, rows)
                        Wn = merged[key] + scale * Bp @ A
                        merged[key] = (mp / torch.linalg.norm(Wn, dim=1))[:, None] * Wn
            return records, grads1, initial, merged
        for l in range(cfg.num_hidden_layers):
            pre = f"decoder.layers.{l}."
            A = adapters[pre + "self_attention.linear_qkv.adapter.linear_in.weight"]
            B = adapters[pre + "self_attention.linear_qkv.adapter.linear_out.weight"]
            for proj, rows in (("q_proj", q_idx), ("k_proj", k_idx), ("v_proj", v_idx)):
                merged[f"model.layers.{l}.self_attn.{proj}.weight"] += scale * B.index_select(0, rows) @ A
            A = adapters[pre + "self_attention.linear_proj.adapter.linear_in.weight"]
            B = adapters[pre + "self_attention.linear_proj.adapter.linear_out.weight"]
            merged[f"model.layers.{l}.self_attn.o_proj.weight"] += scale * B @ A
            A = adapters[pre + "mlp.linear_fc1.adapter.linear_in.weight"]
            B = adapters[pre + "mlp.linear_fc1.adapter.linear_out.weight"]
            merged[f"model.layers.{l}.mlp.gate_proj.weight"] += scale * B[:ffn] @ A
            merged[f"model.layers.{l}.mlp.up_proj.weight"] += scale * B[ffn:] @ A
            A = adapters[pre + "mlp.linear_fc2.adapter.linear_in.weight"]
            B = adapters[pre + "mlp.linear_fc2.adapter.linear_out.weight"]
            merged[f"model.layers.{l}.mlp.down_proj.weight"] += scale * B @ A
    return records, grads1, initial, merged


# ----------------------------------------------------------------------------- self-checks
def check_lr_against_mcore(a, iters):
    """The test vector of the spec (GBS 4, warmup 2, decay 6, 1e-4 -> 1e-5) and, when
    megatron-core is importable, its OptimizerParamScheduler on our settings."""
    from types import SimpleNamespace

    spec = SimpleNamespace(lr_warmup_iters=2, lr_decay_iters=6, gbs=4, lr_warmup_init=0.0,
                           max_lr=1e-4, min_lr=1e-5, lr_decay_style="cosine")
    got = [get_lr(spec, (k - 1) * 4) for k in range(1, 9)]
    want = [0, 5e-5, 1e-4, 8.682e-5, 5.5e-5, 2.318e-5, 1e-5, 1e-5]
    assert all(abs(x - y) < 1e-9 for x, y in zip(got, want)), got
    out = {"spec_test_vector": "ok"}
    import warnings

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    warnings.filterwarnings("ignore", message=".*Could not determine rank.*")
    try:
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    except Exception as e:  # noqa: BLE001
        out["megatron_core"] = f"not importable ({type(e).__name__})"
        return out
    dummy = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2, 2))], lr=0.0, weight_decay=0.1)
    sch = OptimizerParamScheduler(
        dummy, init_lr=a.lr_warmup_init, max_lr=a.max_lr, min_lr=a.min_lr,
        lr_warmup_steps=a.lr_warmup_iters * a.gbs, lr_decay_steps=a.lr_decay_iters * a.gbs,
        lr_decay_style=a.lr_decay_style, start_wd=a.weight_decay, end_wd=a.weight_decay,
        wd_incr_steps=iters * a.gbs, wd_incr_style="constant")
    worst = 0.0
    for k in range(1, iters + 1):
        g = dummy.param_groups[0]
        worst = max(worst, abs(g["lr"] - get_lr(a, (k - 1) * a.gbs)))
        assert abs(g["weight_decay"] - a.weight_decay) < 1e-15
        sch.step(increment=a.gbs)
    out["megatron_core_max_abs_lr_diff"] = worst
    assert worst < 1e-15, worst
    return out


def self_checks(a, tokens, mask):
    results = {}
    # (a) per-token mode: one micro-batch of GBS == MBS-sized accumulation
    model = load_model(a.model, a.attn)
    recs, grads = {}, {}
    for mbs in (a.gbs, a.mbs):
        model.zero_grad(set_to_none=True)
        recs[mbs] = forward_backward(model, tokens[0], mask[0], mbs, per_token=True)
        grads[mbs] = {n: p.grad.clone() for n, p in model.named_parameters()}
    gdiff = max((grads[a.gbs][n] - grads[a.mbs][n]).abs().max().item() for n in grads[a.gbs])
    ldiff = abs(recs[a.gbs]["loss"] - recs[a.mbs]["loss"])
    results["a_per_token_1x%d_vs_%dx%d" % (a.gbs, a.gbs // a.mbs, a.mbs)] = {
        "loss_abs_diff": ldiff, "grad_max_abs_diff": gdiff,
        "pass": bool(ldiff <= 1e-6 and gdiff <= 1e-6)}
    # the default mode is *not* invariant to the micro-batch split on this data (by design)
    dm = {}
    for mbs in (a.gbs, a.mbs):
        model.zero_grad(set_to_none=True)
        dm[mbs] = forward_backward(model, tokens[0], mask[0], mbs, per_token=False)["loss"]
    results["default_mode_iter1_loss_1x%d_vs_%dx%d" % (a.gbs, a.gbs // a.mbs, a.mbs)] = [dm[a.gbs], dm[a.mbs]]
    # (b) sdpa vs eager: initial logits/loss, and the whole default run
    other = "sdpa" if a.attn == "eager" else "eager"
    m2 = load_model(a.model, other)
    with torch.no_grad():
        s1, n1, l1 = microbatch_loss(model, tokens[0, :a.mbs], mask[0, :a.mbs])
        s2, n2, l2 = microbatch_loss(m2, tokens[0, :a.mbs], mask[0, :a.mbs])
    results[f"b_{a.attn}_vs_{other}_initial"] = {
        "logits_max_abs_diff": (l1 - l2).abs().max().item(),
        "loss_abs_diff": abs((s1 / n1).item() - (s2 / n2).item()),
        "pass": bool(abs((s1 / n1).item() - (s2 / n2).item()) <= 1e-6 and (l1 - l2).abs().max().item() <= 1e-5)}
    return results, other


def train_canonical_peft(a, tokens, mask, iters, r=8, alpha=16.0, log=True, bf16_base=False):
    """The same loop under canonical LoRA, run by peft itself: `get_peft_model` with separate
    adapters on q, k, v, o, gate, up and down (Bridge's CanonicalLoRA is this layout), A
    xavier-normal and B N(0, 0.02) written into peft's modules, scale alpha/r; only the adapters
    trained. With `bf16_base` the model is cast to bf16 first and peft's adapters stay fp32
    (`autocast_adapter_dtype`, its default): each adapter reads its input cast to fp32 and its
    output is added in fp32, then cast back to bf16. Returns (records, first gradients and
    initial adapters by Megatron name, peft's merge_and_unload state dict)."""
    from peft import LoraConfig, get_peft_model

    model = load_model(a.model, a.attn)
    if bf16_base:
        model = model.to(torch.bfloat16)
    projections = {  # HF projection -> Megatron adapter prefix (after decoder.layers.L.)
        "self_attn.q_proj": "self_attention.linear_qkv.adapter.adapter_q",
        "self_attn.k_proj": "self_attention.linear_qkv.adapter.adapter_k",
        "self_attn.v_proj": "self_attention.linear_qkv.adapter.adapter_v",
        "self_attn.o_proj": "self_attention.linear_proj.adapter",
        "mlp.gate_proj": "mlp.linear_fc1.adapter.adapter_gate",
        "mlp.up_proj": "mlp.linear_fc1.adapter.adapter_up",
        "mlp.down_proj": "mlp.linear_fc2.adapter",
    }
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                     target_modules=[p.split(".")[1] for p in projections])
    pm = get_peft_model(model, cfg)
    torch.manual_seed(0)
    megatron = {}  # Megatron name -> peft's parameter
    for l, layer in enumerate(pm.base_model.model.model.layers):
        for hf, prefix in projections.items():
            mod = layer.get_submodule(hf)
            A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            with torch.no_grad():
                torch.nn.init.xavier_normal_(A)
                B.copy_(torch.randn(B.shape) * 0.02)
            megatron[f"decoder.layers.{l}.{prefix}.linear_in.weight"] = A
            megatron[f"decoder.layers.{l}.{prefix}.linear_out.weight"] = B
    initial = {n: p.detach().clone() for n, p in megatron.items()}
    assert len([p for p in pm.parameters() if p.requires_grad]) == len(megatron)
    assert all(p.dtype == torch.float32 for p in megatron.values()), "peft keeps fp32 adapters"
    records, grads1 = train_adapters(a, pm, megatron, tokens, mask, iters, "canonical" if log else None)
    merged = {n: p.detach().clone() for n, p in pm.merge_and_unload().state_dict().items()}
    return records, grads1, initial, merged


# ----------------------------------------------------------------------------- main
def versions():
    import safetensors
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__}


def get_batches(a, vocab, iters):
    if a.batches:
        from safetensors.torch import load_file

        b = load_file(a.batches)
        return b["tokens"], b["loss_mask"]
    return make_batches(a, vocab, iters)


def main(argv=None):
    a = parse_args(argv)
    setup_torch(a.threads)
    cfg = json.loads((Path(a.model) / "config.json").read_text())
    vocab = cfg["vocab_size"]

    if a.write_lora:
        from safetensors.torch import save_file

        out = Path(a.write_lora)
        tag = "canonical" if a.canonical else "dora" if a.dora else "lora"
        tag += "_bf16base" if a.bf16_base else ""
        tokens, mask = get_batches(a, vocab, a.train_iters)
        if a.canonical:
            recs, grads1, initial, merged = train_canonical_peft(a, tokens, mask, a.train_iters,
                                                                 bf16_base=a.bf16_base)
        else:
            recs, grads1, initial, merged = train_lora(a, tokens, mask, a.train_iters, dora=a.dora)
        save_file({n: t.contiguous() for n, t in initial.items()}, str(out / f"{tag}_init.safetensors"))
        save_file({n: t.contiguous() for n, t in grads1.items()}, str(out / f"{tag}_grads_iter1.safetensors"))
        save_file({n: t.contiguous() for n, t in merged.items()}, str(out / f"final_{tag}_merged.safetensors"))
        argv_used = sys.argv[1:] if argv is None else argv
        (out / f"expected_{tag}.json").write_text(json.dumps({
            "generated_by": "scripts/train_replay.py " + " ".join(argv_used),
            "versions": versions(),
            "settings": {**settings_dict(a, "default", a.train_iters), "lora": {"dim": 8, "alpha": 16.0, "dora": a.dora,
                         **({"base": "bf16", "adapters": "fp32"} if a.bf16_base else {}),
                         **({"canonical": True, "trained_by": "peft " + __import__("peft").__version__,
                             "targets": ["linear_q", "linear_k", "linear_v", "linear_proj", "linear_fc1_gate",
                                         "linear_fc1_up", "linear_fc2"]} if a.canonical else
                            {"targets": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]})}},
            "loss": "sum(ce*mask)/sum(mask) over the global batch (what Megatron-Bridge logs)",
            "iterations": recs}, indent=1) + "\n")
        return 0

    if a.write_bf16 or a.write_fp16:
        from safetensors.torch import save_file

        fp16 = bool(a.write_fp16)
        out = Path(a.write_fp16 or a.write_bf16)
        tag = "fp16" if fp16 else "bf16"
        tokens, mask = get_batches(a, vocab, a.train_iters)
        recs, master = train_bf16(a, tokens, mask, a.train_iters, dtype=torch.float16 if fp16 else torch.bfloat16)
        save_file({n: p.detach().clone().contiguous() for n, p in master.named_parameters()},
                  str(out / f"final_{tag}.safetensors"))
        argv_used = sys.argv[1:] if argv is None else argv
        (out / f"expected_{tag}.json").write_text(json.dumps({
            "generated_by": "scripts/train_replay.py " + " ".join(argv_used),
            "versions": versions(),
            "settings": settings_dict(a, "default", a.train_iters),
            "loss": "sum(ce*mask)/sum(mask) over the global batch (what Megatron-Bridge logs)",
            "iterations": recs}, indent=1) + "\n")
        return 0

    if not a.write_fixtures:
        tokens, mask = get_batches(a, vocab, a.train_iters)
        mode = "per_token" if a.per_token_loss else "default"
        print(f"{mode} run, {a.train_iters} iterations")
        recs, _ = train(a, tokens, mask, a.per_token_loss, a.train_iters)
        if a.json:
            Path(a.json).write_text(json.dumps({"settings": settings_dict(a, mode, a.train_iters),
                                                "iterations": recs}, indent=1) + "\n")
        return 0

    from safetensors.torch import save_file

    out = Path(a.write_fixtures)
    out.mkdir(parents=True, exist_ok=True)
    n_iters = max(a.train_iters, a.per_token_iters)
    tokens, mask = get_batches(a, vocab, n_iters)
    save_file({"tokens": tokens.contiguous(), "loss_mask": mask.contiguous()}, str(out / "batches.safetensors"),
              # one key only: safetensors writes its metadata map in no fixed order
              metadata={"layout": f"seed {a.seed}; tokens [iters, GBS, seq+1]; loss_mask [iters, GBS, seq] "
                        "aligned with labels = tokens[..., 1:]"})

    # initial logits on iteration 0's first micro-batch
    m0 = load_model(a.model, a.attn)
    with torch.no_grad():
        _, _, logits = microbatch_loss(m0, tokens[0, :a.mbs], mask[0, :a.mbs])
    save_file({"input_ids": tokens[0, :a.mbs, :-1].contiguous(), "logits": logits.contiguous()},
              str(out / "initial_logits.safetensors"))
    del m0

    print(f"default run, {a.train_iters} iterations")
    grads = {}
    recs_d, model_d = train(a, tokens, mask, False, a.train_iters, grads_at_iter1=grads)
    save_file(grads, str(out / "grads_iter1.safetensors"))
    save_file({n: p.detach().clone().contiguous() for n, p in model_d.named_parameters()},
              str(out / "final.safetensors"))

    print(f"per-token run, {a.per_token_iters} iterations")
    recs_t, model_t = train(a, tokens, mask, True, a.per_token_iters)
    save_file({n: p.detach().clone().contiguous() for n, p in model_t.named_parameters()},
              str(out / "final_per_token.safetensors"))

    print("self-checks")
    checks, other = self_checks(a, tokens, mask)
    recs_o, model_o = train(a, tokens, mask, False, a.train_iters, attn=other, log=False)
    checks[f"b_{a.attn}_vs_{other}_default_run"] = {
        "loss_max_abs_diff": max(abs(x["loss"] - y["loss"]) for x, y in zip(recs_d, recs_o)),
        "grad_norm_max_rel_diff": max(abs(x["grad_norm"] - y["grad_norm"]) / y["grad_norm"]
                                      for x, y in zip(recs_d, recs_o)),
        "final_param_max_abs_diff": max((p - q).abs().max().item() for p, q in
                                        zip(model_d.parameters(), model_o.parameters()))}
    checks["lr_schedule"] = check_lr_against_mcore(a, a.train_iters)
    for k, v in checks.items():
        print(f"  {k}: {v}")

    argv_used = sys.argv[1:] if argv is None else argv
    expected = {
        "generated_by": "scripts/train_replay.py " + " ".join(argv_used),
        "versions": versions(),
        "micro_batch_layout": "micro-batch j of an iteration = samples [j*MBS, (j+1)*MBS) of its global batch",
        "loss_definitions": {
            "loss": "default: mean over micro-batches of sum(ce*mask)/max(sum(mask),1); "
                    "per_token: sum over micro-batches of sum(ce*mask) / max(total tokens,1)",
            "loss_token_mean": "sum(ce*mask)/sum(mask) over the whole global batch (what Megatron-Bridge logs)",
            "grad_norm": "global L2 norm of the gradients before clipping (per-token mode: after the 1/num_tokens scaling)",
            "param_norm": "global L2 norm of the parameters after the optimizer step",
            "lr": "the lr the step of this iteration used",
        },
        "default": {"settings": settings_dict(a, "default", a.train_iters), "iterations": recs_d},
        "per_token": {"settings": settings_dict(a, "per_token", a.per_token_iters), "iterations": recs_t},
        "self_checks": checks,
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    ok = all(v.get("pass", True) for v in checks.values() if isinstance(v, dict))
    print("self-checks", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
