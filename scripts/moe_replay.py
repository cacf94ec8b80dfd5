"""Replay megatron-core's training loop in plain torch on an HF MoE model (Mixtral, Qwen3-MoE),
as the judge for the trainer's MoE tests (goldens in tests/fixtures/train/moe_*).

    python scripts/moe_replay.py --model tests/fixtures/hf/mixtral --tag mixtral \
        --write tests/fixtures/train --batches tests/fixtures/train/batches.safetensors

The loop is train_replay.py's (AdamW, cosine schedule in samples, global-norm clip, micro-batch
averaging; fp32). What the MoE adds, taken from megatron-core 0.19.2 itself:
  * the forward pass is transformers' (router softmax, top-k, renormalized when norm_topk_prob;
    that is megatron-core's moe_router_pre_softmax = False; without norm_topk_prob, True);
  * each layer's load-balancing loss is megatron-core's own functions on the router logits
    transformers returns (output_router_logits=True):
        routing_map, scores = compute_routing_scores_for_aux_loss(logits, topk, "softmax")
        aux = switch_load_balancing_loss_func(scores, routing_map.sum(0), T, topk, E, coeff)
  * its gradient is scaled as MoEAuxLossAutoScaler scales it: 1/num_microbatches in the default
    mode; with calculate_per_token_loss the aux loss times the micro-batch's T tokens, then every
    gradient divided by the global batch's loss tokens (finalize_model_grads).
The logged load_balancing_loss is megatron's: aux / coeff, the mean over layers and micro-batches.

Writes (TAG = --tag):
  moe_TAG_grads_iter1.safetensors  iteration 1's accumulated gradients (before clipping), in the
                                   checkpoint's HF names and layout (save_pretrained's)
  moe_TAG_final.safetensors        the weights after --train-iters iterations (default mode)
  expected_moe_TAG.json            per-iteration records of both loss modes
  expected_moe_TAG_bf16.json       with --bf16 (instead of the above): the mixed-precision run's records
Needs the oracle venv (torch, transformers, megatron-core). Not used by the build or CI.

A trained MoE checkpoint in megatron-core (Megatron-Bridge 0.6.2 has a Qwen3-MoE bridge, none for
Mixtral), as checked for the trainer's MoE work:
    bridgeflow train pipelines/pretrain.toml --set model=tests/fixtures/shared/hf/qwen3_moe --set output=CK
    bridgeflow convert --from megatron:CK --to hf:HF
    # HF/reference/logits.safetensors: transformers' logits of HF on the fixture's input_ids
    python ../shared/oracle/check_megatron.py --hf HF --megatron CK
gave PASS: 33 tensors, none differing from Bridge's conversion of HF, logits within 2.0e-6.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_replay as tr  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF MixtralForCausalLM / Qwen3MoeForCausalLM directory")
    p.add_argument("--tag", required=True)
    p.add_argument("--write", required=True, metavar="DIR")
    p.add_argument("--batches", required=True, help="tokens/loss_mask safetensors (train_replay.py's)")
    p.add_argument("--train-iters", type=int, default=20)
    p.add_argument("--per-token-iters", type=int, default=3)
    p.add_argument("--aux-loss-coeff", type=float, default=None,
                   help="default: the config's router_aux_loss_coef (what the models mapper maps)")
    p.add_argument("--bf16", action="store_true",
                   help="mixed precision as train_replay.py --write-bf16 (fp32 masters, a bf16 copy computing, "
                        "fp32 gradient accumulation): writes expected_moe_TAG_bf16.json only")
    p.add_argument("--no-norm-topk-prob", action="store_true",
                   help="load with norm_topk_prob=False (megatron-core's moe_router_pre_softmax)")
    # The loop's settings, as train_replay.py's defaults.
    a = p.parse_args(argv)
    base = tr.parse_args([])
    for k, v in vars(base).items():
        if not hasattr(a, k):
            setattr(a, k, v)
    return a


def load_model(a):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg = AutoConfig.from_pretrained(a.model)
    if a.no_norm_topk_prob:
        cfg.norm_topk_prob = False
    model = AutoModelForCausalLM.from_pretrained(a.model, config=cfg, attn_implementation="eager",
                                                 dtype=torch.float32)
    model.train()
    model.model.embed_tokens.padding_idx = None  # megatron's embedding has no padding row
    return model


def moe_shape(cfg):
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts")
    return experts, cfg.num_experts_per_tok


def aux_losses(router_logits, experts, topk, coeff):
    from megatron.core.transformer.moe.moe_utils import (
        compute_routing_scores_for_aux_loss, switch_load_balancing_loss_func)

    out = []
    for logits in router_logits:
        routing_map, scores = compute_routing_scores_for_aux_loss(logits, topk, "softmax")
        out.append(switch_load_balancing_loss_func(
            probs=scores, tokens_per_expert=routing_map.sum(dim=0), total_num_tokens=logits.shape[0],
            topk=topk, num_experts=experts, moe_aux_loss_coeff=coeff))
    return out


def forward_backward(a, model, tokens, mask, per_token, coeff, masters=None):
    """One iteration's micro-batches on `model`, gradients accumulated. With `masters`
    ((fp32 parameter, model parameter) pairs: mixed precision), each micro-batch's gradients
    are added into the fp32 ones after its backward (megatron-core's main_grad)."""
    experts, topk = moe_shape(model.config)
    nmb = tokens.shape[0] // a.mbs
    sums, counts, balance = [], [], []
    for j in range(nmb):
        if masters:
            model.zero_grad(set_to_none=True)
        tok, m = tokens[j * a.mbs:(j + 1) * a.mbs], mask[j * a.mbs:(j + 1) * a.mbs]
        inputs, labels = tok[:, :-1], tok[:, 1:]
        out = model(input_ids=inputs, output_router_logits=True)
        logits = out.logits.float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        s, n = torch.sum(ce * m.reshape(-1)), torch.sum(m)
        aux = aux_losses(out.router_logits, experts, topk, coeff)
        aux_sum = torch.stack(aux).sum()
        if per_token:
            (s + aux_sum * inputs.numel()).backward()
        else:
            (s / torch.clamp(n, min=1) / nmb + aux_sum / nmb).backward()
        with torch.no_grad():
            for p, c in masters or []:
                if c.grad is not None:
                    p.grad += c.grad.float()
        sums.append(s.detach())
        counts.append(n.detach())
        balance.extend(x.item() / coeff for x in aux)
    total = torch.stack(counts).sum()
    if per_token:
        scale = 1.0 / torch.clamp(total.to(torch.int64), min=1)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    return {
        "loss_token_mean": (torch.stack(sums).sum() / torch.clamp(total, min=1)).item(),
        "num_tokens": int(total.item()),
        "load_balancing_loss": sum(balance) / len(balance),
    }


def hf_layout(model, tensors):
    """`tensors` (by parameter name) in the checkpoint's names and layout, as save_pretrained
    writes the model's own weights."""
    from safetensors.torch import load_file

    with torch.no_grad():
        saved = {n: p.detach().clone() for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.copy_(tensors[n])
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d, safe_serialization=True)
            out = {}
            for f in sorted(Path(d).glob("*.safetensors")):
                out.update(load_file(str(f)))
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    return {n: t.contiguous() for n, t in out.items()}


def train(a, tokens, mask, per_token, iters, coeff, grads_at_iter1=None, bf16=False):
    """`iters` iterations from the fixture's weights; returns (records, the trained fp32 model).
    With `bf16`, megatron-core's mixed precision: each iteration the fp32 masters rounded into a
    bf16 copy that computes, every micro-batch's bf16 gradients added into the fp32 ones
    (forward_backward's `masters`), clip and AdamW on the masters."""
    import copy

    master = load_model(a)
    compute = copy.deepcopy(master).to(torch.bfloat16) if bf16 else master
    pairs = list(zip(master.parameters(), compute.parameters())) if bf16 else None
    opt = torch.optim.AdamW(tr.param_groups(master, a.weight_decay), lr=0.0, betas=(a.beta1, a.beta2),
                            eps=a.eps, foreach=False)
    records = []
    for k in range(1, iters + 1):
        if bf16:
            with torch.no_grad():
                for m, c in pairs:
                    c.copy_(m)
            for m, _ in pairs:
                m.grad = torch.zeros_like(m)
        else:
            opt.zero_grad(set_to_none=True)
        rec = forward_backward(a, compute, tokens[k - 1], mask[k - 1], per_token, coeff, masters=pairs)
        if k == 1 and grads_at_iter1 is not None:
            grads_at_iter1.update(hf_layout(master, {n: p.grad for n, p in master.named_parameters()}))
        rec["grad_norm"], rec["clipped"] = tr.grad_norm_and_clip(master, a.clip_grad)
        lr = tr.get_lr(a, (k - 1) * a.gbs)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        records.append({"iteration": k, "lr": lr, **rec})
        print(f"  {'bf16 ' if bf16 else ''}iter {k:3d}  lr {lr:.6e}  loss {rec['loss_token_mean']:.9f}  "
              f"lb {rec['load_balancing_loss']:.6f}  grad_norm {rec['grad_norm']:.6e}")
    return records, master


def main(argv=None):
    from safetensors.torch import load_file, save_file

    a = parse_args(argv)
    tr.setup_torch(a.threads)
    cfg = json.loads((Path(a.model) / "config.json").read_text())
    coeff = a.aux_loss_coeff if a.aux_loss_coeff is not None else cfg["router_aux_loss_coef"]
    b = load_file(a.batches)
    tokens, mask = b["tokens"], b["loss_mask"]
    out = Path(a.write)
    argv_used = sys.argv[1:] if argv is None else argv
    if a.bf16:
        print(f"{a.tag}: bf16, {a.train_iters} iterations (aux loss coeff {coeff})")
        recs, _ = train(a, tokens, mask, False, a.train_iters, coeff, bf16=True)
        (out / f"expected_moe_{a.tag}_bf16.json").write_text(json.dumps({
            "generated_by": "scripts/moe_replay.py " + " ".join(argv_used),
            "versions": {**tr.versions(), "megatron_core": __import__("megatron.core").core.__version__},
            "settings": {**tr.settings_dict(a, "default", a.train_iters), "model": a.model, "dtype": "bfloat16",
                         "moe_aux_loss_coeff": coeff},
            "loss": "sum(ce*mask)/sum(mask) over the global batch (what Megatron-Bridge logs)",
            "bf16": recs,
        }, indent=1) + "\n")
        return 0
    print(f"{a.tag}: default mode, {a.train_iters} iterations (aux loss coeff {coeff})")
    grads = {}
    recs, model = train(a, tokens, mask, False, a.train_iters, coeff, grads_at_iter1=grads)
    save_file(grads, str(out / f"moe_{a.tag}_grads_iter1.safetensors"))
    final = hf_layout(model, {n: p.detach() for n, p in model.named_parameters()})
    save_file(final, str(out / f"moe_{a.tag}_final.safetensors"))
    print(f"{a.tag}: per-token mode, {a.per_token_iters} iterations")
    recs_t, _ = train(a, tokens, mask, True, a.per_token_iters, coeff)
    (out / f"expected_moe_{a.tag}.json").write_text(json.dumps({
        "generated_by": "scripts/moe_replay.py " + " ".join(argv_used),
        "versions": {**tr.versions(), "megatron_core": __import__("megatron.core").core.__version__},
        "settings": {**tr.settings_dict(a, "default", a.train_iters), "model": a.model,
                     "moe_aux_loss_coeff": coeff, "norm_topk_prob": not a.no_norm_topk_prob
                     and bool(cfg.get("norm_topk_prob", True))},
        "loss": "sum(ce*mask)/sum(mask) over the global batch (what Megatron-Bridge logs)",
        "default": recs,
        "per_token": recs_t,
    }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
