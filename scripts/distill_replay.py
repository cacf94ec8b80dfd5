"""Knowledge distillation as Megatron-Bridge runs it with ModelOpt, replayed in torch on HF
Llama modules with ModelOpt's own loss classes (nvidia-modelopt, the oracle venv): the judge for
the trainer's distillation tests.

    python scripts/distill_replay.py --write tests/fixtures/train

Teacher: the Llama fixture (2 layers). Student: a smaller Llama (1 layer, ffn 64), its weights
drawn here with a fixed seed and written to DIR/distill_student/ (config.json +
model.safetensors) so that both sides start from them. Data: the golden batches
(tests/fixtures/train/batches.safetensors).

Per micro-batch, as `loss_func_kd` (megatron/bridge/training/post_training/distillation.py):
  lm      = sum(ce * mask)                               (the student's masked CE)
  losses  = ModelOpt LogitsKLLoss / TopKLogitsKLLoss (logits [s, b, v]) and
            HiddenStateCosineLoss / MSELoss (hidden [s, b, h]) between the hooked modules,
            each reduced as Bridge's _mask_loss: sum(loss.view(-1) * mask.view(-1))
  total   = LogitsAndIntermediatesLossBalancer(kd_loss_scale, skip_lm_loss)({...})["kd_loss"]
  backward(total / max(num_tokens, 1) / num_microbatches)
then megatron-core's clip and AdamW (scripts/train_replay.py's helpers).

Cases (each: the first global batch's student gradients in Megatron names, and the reported
losses; "t1" and "inter" also 5 iterations of training):
  t1     T=1, skip_lm_loss       (ModelOpt's defaults)
  t2_lm  T=2, lm + 0.5 * kd
  top8   T=1, top-8 logits
  inter  T=1, lm + kd with [final_layernorm, final_layernorm, cosine], [layers.0, layers.1, mse]
  proj   as inter, with a narrower student (hidden 32: DIR/distill_student_narrow/), so that
         the student's hidden states go through ModelOpt's shared projection (nn.Linear(32, 64),
         weight normal(0, 0.02), bias 0 as ProjectionLayer._init_weights, drawn here with a
         fixed seed and written to DIR/distill_projection.safetensors), trained with the
         student: its gradients are in distill_grads_proj.safetensors as
         distill.projection.weight / .bias
"""
import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_replay as tr  # noqa: E402

CASES = {
    "t1": dict(temperature=1.0, topk=None, skip_lm_loss=True, kd_loss_scale=1.0, pairs=[]),
    "t2_lm": dict(temperature=2.0, topk=None, skip_lm_loss=False, kd_loss_scale=0.5, pairs=[]),
    "top8": dict(temperature=1.0, topk=8, skip_lm_loss=True, kd_loss_scale=1.0, pairs=[]),
    "inter": dict(temperature=1.0, topk=None, skip_lm_loss=False, kd_loss_scale=1.0,
                  pairs=[["decoder.final_layernorm", "decoder.final_layernorm", "cosine"],
                         ["decoder.layers.0", "decoder.layers.1", "mse"]]),
}
CASES["proj"] = dict(CASES["inter"], student="narrow")
STUDENT = dict(num_hidden_layers=1, intermediate_size=64)
NARROW = dict(STUDENT, hidden_size=32)
PROJECTION_SEED = 2468


def make_student(teacher_dir, out_dir, overrides=STUDENT, seed=4321):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((Path(teacher_dir) / "config.json").read_text())
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    return out_dir


def module_at(model, name):
    if name == "decoder.final_layernorm":
        return model.model.norm
    return model.model.layers[int(name.removeprefix("decoder.layers."))]


class Hooks:
    """The hidden state out of each named module, [b, s, h] -> [s, b, h] as Megatron's."""

    def __init__(self, model, names):
        self.out = {}
        for n in names:
            def keep(_m, _i, o, n=n):
                o = o[0] if isinstance(o, tuple) else o
                self.out[n] = o.transpose(0, 1).contiguous()
            module_at(model, n).register_forward_hook(keep)


def make_projection(student_dir, teacher_dir):
    """ModelOpt's ProjectionLayer for the two hidden sizes: nn.Linear, init_method on the weight
    (normal(0, init_method_std = 0.02)), bias zero."""
    h = lambda d: json.loads((Path(d) / "config.json").read_text())["hidden_size"]  # noqa: E731
    torch.manual_seed(PROJECTION_SEED)
    proj = torch.nn.Linear(h(student_dir), h(teacher_dir))
    with torch.no_grad():
        torch.nn.init.normal_(proj.weight, 0.0, 0.02)
        proj.bias.zero_()
    return proj


def losses_for(case, model_config, projection=None):
    from modelopt.torch.distill.plugins.megatron import (
        HiddenStateCosineLoss, LogitsKLLoss, MSELoss, TopKLogitsKLLoss)

    if case["topk"]:
        logits = TopKLogitsKLLoss(model_config, temperature=case["temperature"], top_k=case["topk"])
    else:
        logits = LogitsKLLoss(model_config, temperature=case["temperature"])
    inter = [(s, t, (HiddenStateCosineLoss if f == "cosine" else MSELoss)(
        model_config, projection_layer=projection)) for s, t, f in case["pairs"]]
    return logits, inter


def mask_loss(out, mask):
    """Bridge's _mask_loss at TP 1."""
    if isinstance(out, tuple):
        out = out[0]
    return torch.sum(out.reshape(-1).float() * mask.reshape(-1).float())


def microbatch(student, teacher, case, crit, tokens, mask):
    from modelopt.torch.distill.loss_balancers import STUDENT_LOSS_KEY
    from modelopt.torch.distill.plugins.megatron import LogitsAndIntermediatesLossBalancer

    logits_fn, inter = crit
    sh, th = Hooks.current
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        t_logits = teacher(input_ids=inputs).logits
    s_logits = student(input_ids=inputs).logits
    v = s_logits.shape[-1]
    ce = F.cross_entropy(s_logits.float().reshape(-1, v), labels.reshape(-1), reduction="none")
    lm = torch.sum(ce * mask.reshape(-1))
    d = {STUDENT_LOSS_KEY: lm}
    d[f"{type(logits_fn).__name__}_0"] = mask_loss(
        logits_fn(s_logits.transpose(0, 1), t_logits.transpose(0, 1)), mask)
    for i, (s, t, fn) in enumerate(inter, start=1):
        d[f"{type(fn).__name__}_{i}"] = mask_loss(fn(sh.out[s], th.out[t]), mask)
    bal = LogitsAndIntermediatesLossBalancer(kd_loss_scale=case["kd_loss_scale"],
                                             skip_original_loss=case["skip_lm_loss"])
    out = bal(d)
    return lm, out, torch.sum(mask)


def to_megatron(named, cfg):
    """HF parameter tensors -> Megatron names and fused layouts."""
    nq, nkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    hpg = nq // nkv
    out = {"embedding.word_embeddings.weight": named["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": named["model.norm.weight"],
           "output_layer.weight": named["lm_head.weight"]}
    for l in range(cfg["num_hidden_layers"]):
        p = lambda s: named[f"model.layers.{l}.{s}"]  # noqa: E731
        m = f"decoder.layers.{l}."
        q, k, vv = p("self_attn.q_proj.weight"), p("self_attn.k_proj.weight"), p("self_attn.v_proj.weight")
        rows = []
        for g in range(nkv):
            rows += [q[g * hpg * d:(g + 1) * hpg * d], k[g * d:(g + 1) * d], vv[g * d:(g + 1) * d]]
        out[m + "self_attention.linear_qkv.weight"] = torch.cat(rows, 0)
        out[m + "self_attention.linear_qkv.layer_norm_weight"] = p("input_layernorm.weight")
        out[m + "self_attention.linear_proj.weight"] = p("self_attn.o_proj.weight")
        out[m + "mlp.linear_fc1.layer_norm_weight"] = p("post_attention_layernorm.weight")
        out[m + "mlp.linear_fc1.weight"] = torch.cat([p("mlp.gate_proj.weight"), p("mlp.up_proj.weight")], 0)
        out[m + "mlp.linear_fc2.weight"] = p("mlp.down_proj.weight")
    return {n: t.detach().clone().contiguous() for n, t in out.items()}


def run(a, case, student_dir, tokens, mask, iters, projection=None):
    """`iters` iterations of case; returns (records, gradients of iteration 1 in Megatron names).
    A projection trains with the student (in its optimizer and its gradient norm, as the
    distillation model's parameters in megatron-core)."""
    student = tr.load_model(str(student_dir), a.attn)
    trained = torch.nn.ModuleDict({"student": student})
    if projection is not None:
        trained["projection"] = projection
    teacher = tr.load_model(a.model, a.attn)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    Hooks.current = (Hooks(student, [s for s, _, _ in case["pairs"]]),
                     Hooks(teacher, [t for _, t, _ in case["pairs"]]))
    crit = losses_for(case, SimpleNamespace(tensor_model_parallel_size=1, sequence_parallel=False),
                      projection)
    opt = torch.optim.AdamW(tr.param_groups(trained, a.weight_decay), lr=0.0, betas=(a.beta1, a.beta2),
                            eps=a.eps, foreach=False)
    nmb = a.gbs // a.mbs
    scfg = json.loads((student_dir / "config.json").read_text())
    records, grads1 = [], None
    for k in range(1, iters + 1):
        opt.zero_grad(set_to_none=True)
        sums = {"lm": 0.0, "kd_loss": 0.0, "logits_loss": 0.0, "intermediate_loss": 0.0, "n": 0.0}
        for j in range(nmb):
            sl = slice(j * a.mbs, (j + 1) * a.mbs)
            lm, out, n = microbatch(student, teacher, case, crit, tokens[k - 1][sl], mask[k - 1][sl])
            (out["kd_loss"] / torch.clamp(n, min=1) / nmb).backward()
            sums["lm"] += lm.item()
            for key in ("kd_loss", "logits_loss", "intermediate_loss"):
                sums[key] += float(out[key])
            sums["n"] += n.item()
        if k == 1:
            grads1 = to_megatron({n: p.grad for n, p in student.named_parameters()}, scfg)
            if projection is not None:
                grads1["distill.projection.weight"] = projection.weight.grad.detach().clone()
                grads1["distill.projection.bias"] = projection.bias.grad.detach().clone()
        norm, _ = tr.grad_norm_and_clip(trained, a.clip_grad)
        lr = tr.get_lr(a, (k - 1) * a.gbs)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        n = max(sums["n"], 1.0)
        rec = {"iteration": k, "lr": lr, "loss": sums["lm"] / n, "grad_norm": norm,
               **{key: sums[key] / n for key in ("kd_loss", "logits_loss", "intermediate_loss")}}
        records.append(rec)
        print(f"  {k:2d} lm {rec['loss']:.7f} kd {rec['kd_loss']:.7f} logits {rec['logits_loss']:.7f} "
              f"inter {rec['intermediate_loss']:.7f} grad_norm {norm:.6e}")
    return records, grads1


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", required=True, metavar="DIR")
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    out = Path(args.write)
    a = tr.parse_args(["--batches", str(out / "batches.safetensors")])
    tr.setup_torch(a.threads)
    from safetensors.torch import save_file

    students = {None: make_student(a.model, out / "distill_student"),
                "narrow": make_student(a.model, out / "distill_student_narrow", NARROW)}
    tokens, mask = tr.get_batches(a, 256, args.iters)
    expected = {"generated_by": "scripts/distill_replay.py " + " ".join(sys.argv[1:]),
                "versions": {**tr.versions(), "modelopt": __import__("modelopt").__version__},
                "settings": {**tr.settings_dict(a, "default", args.iters), "student": STUDENT,
                             "narrow_student": NARROW, "projection_seed": PROJECTION_SEED},
                "cases": {}}
    for name, case in CASES.items():
        print(f"case {name}: {case}")
        iters = args.iters if name in ("t1", "inter", "proj") else 1
        student_dir = students[case.get("student")]
        projection = None
        if case.get("student"):
            projection = make_projection(student_dir, a.model)
            save_file({"distill.projection.weight": projection.weight.detach().clone(),
                       "distill.projection.bias": projection.bias.detach().clone()},
                      str(out / "distill_projection.safetensors"))
        recs, grads = run(a, case, student_dir, tokens, mask, iters, projection)
        save_file(grads, str(out / f"distill_grads_{name}.safetensors"))
        expected["cases"][name] = {"config": case, "iterations": recs}
    (out / "expected_distill.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
