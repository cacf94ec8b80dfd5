#!/usr/bin/env python3
"""Check that real vLLM serves a bridgeflow-exported PEFT LoRA adapter like the merged model it was merged into.

    python scripts/check_vllm_lora.py BASE_DIR ADAPTER_DIR MERGED_DIR [--prompt-ids 1,17,...] [--atol 1e-3]
                                     [--max-lora-rank N] [--dtype float32] [--json OUT.json] [--verbose]

Run it with the vLLM venv's interpreter, e.g.

    /work/venv-vllm/bin/python scripts/check_vllm_lora.py tests/fixtures/shared/hf/llama \\
        /tmp/vllm-lora-check/lora-adapter /tmp/vllm-lora-check/lora-merged

BASE_DIR is the HF base model the adapter was trained on, ADAPTER_DIR a PEFT adapter folder (adapter_config.json +
adapter_model.safetensors), MERGED_DIR the full HF model folder with the adapter merged into the base weights.

What it does (each engine runs in its own child process, so two vLLM engines never share one process):
  1. vLLM LLM(BASE_DIR, enable_lora=True, max_lora_rank >= the adapter's r) runs the fixed prompt of token ids
     once without a LoRA request (the plain base model), then once through LoRARequest(ADAPTER_DIR) (last: after a
     refused adapter vLLM 0.32's in-process engine hangs on any further request; --timeout guards each engine);
  2. vLLM LLM(MERGED_DIR) without LoRA runs the same prompt.
Logprobs are taken the same way as shared/oracle/vllm/check_vllm.py: prompt_logprobs=V for prompt positions 1..S-1
plus logprobs=V for the one generated token (greedy, max_tokens=1, enforce_eager), i.e. S full rows of
log_softmax(logits). The engines use check_vllm.py's CPU settings (VLLM_CPU_KVCACHE_SPACE=1,
VLLM_ENABLE_V1_MULTIPROCESSING=0, VLLM_LOGGING_LEVEL=WARNING; exported values win).

Checks, one line each:
  * adapter-load : vLLM accepted the adapter and ran the prompt with it;
  * lora-vs-merged: max |logprob_lora - logprob_merged| over all S*V entries <= atol (default 1e-3, as for float32
    in check_vllm.py) and every top-1 disagreement is a near-tie (merged logprob of vLLM-LoRA's pick within atol of
    the merged maximum);
  * adapter-effect: max |logprob_base - logprob_merged| > atol, otherwise the comparison above proves nothing
    (reported as a warning, not a failure).

head_dim: vLLM 0.32's CPU attention has no head size 16 (the shared tiny fixtures; see shared/specs/vllm.md), so
`--pad-head-dim 32` first rewrites base, adapter and merged model into exactly equivalent head_dim-32 copies (in a
temp dir, or --work-dir): each q/k head dim d goes to 2*(d % (hd/2)) + 16*(d // (hd/2)) so RoPE pairs and frequencies
are unchanged, the new dims are zero, q rows (and q lora_B rows) are scaled by sqrt(32/hd) so the attention scale is
unchanged, v rows / o columns (and v lora_B rows / o lora_A columns) are zero-padded. lora_A of q/k/v, the MLP and all
other tensors are copied unchanged. The check `pad-exact` then confirms the transform: HF transformers on the
ORIGINAL merged model vs vLLM on the padded merged model must agree within atol. (Llama-style attention with
rope_type default only; DoRA magnitude vectors are padded with zeros, which is only meaningful because vLLM refuses
DoRA anyway.)

Exit status: 0 = pass; 0 also when the adapter is DoRA (use_dora: true) and vLLM refuses it -- that is reported as
UNSUPPORTED with vLLM's exact error, a finding about vLLM, not a failure (pass --dora-refusal-fails to make it exit
1); 1 = fail (any other load/run error, or a mismatch); 2 = bad arguments.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

DEFAULT_PROMPT = [1, 17, 200, 33, 5, 129, 64, 250, 3, 77, 12, 190, 45, 8, 231, 99]
ALLOWED_RANKS = [1, 8, 16, 32, 64, 128, 256, 320, 512]  # vLLM 0.32 MaxLoRARanks


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="See the module docstring (top of this file) for details.")
    p.add_argument("base_dir", help="HF base model folder")
    p.add_argument("adapter_dir", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("merged_dir", help="HF folder of base + adapter merged")
    p.add_argument("--prompt-ids", default=",".join(map(str, DEFAULT_PROMPT)),
                   help="comma-separated prompt token ids (default: a fixed 16-id prompt)")
    p.add_argument("--atol", type=float, default=1e-3, help="logprob tolerance (default 1e-3)")
    p.add_argument("--max-lora-rank", type=int, default=None,
                   help="vLLM max_lora_rank (default: smallest allowed value >= the adapter's r)")
    p.add_argument("--dtype", default="float32", help="vLLM dtype (default float32)")
    p.add_argument("--dora-refusal-fails", action="store_true",
                   help="exit 1 (instead of 0) when vLLM refuses a DoRA adapter")
    p.add_argument("--pad-head-dim", type=int, default=None,
                   help="rewrite base/adapter/merged into equivalent copies with this head_dim first (e.g. 32; "
                        "vLLM's CPU attention has no head_dim 16)")
    p.add_argument("--work-dir", default=None, help="where --pad-head-dim writes its copies (default: a temp dir)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per vLLM engine child process (default 600)")
    p.add_argument("--json", default=None, help="write the numbers to this file")
    p.add_argument("--verbose", action="store_true", help="keep vLLM's INFO logging")
    # internal: child-process mode
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def set_env(verbose):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if verbose else "WARNING")


def worker(spec_path):
    """Child process: one engine; writes {"runs": {name: S x V logprobs | {"error": ...}}, "load_s", ...}."""
    with open(spec_path) as f:
        spec = json.load(f)
    set_env(spec["verbose"])
    out = {"runs": {}}
    t0 = time.time()
    from vllm import LLM, SamplingParams, __version__
    from vllm.inputs import TokensPrompt

    out["vllm_version"] = __version__
    ids, V = spec["ids"], spec["vocab"]
    kw = dict(model=spec["model"], dtype=spec["dtype"], enforce_eager=True, max_model_len=len(ids) + 16,
              max_logprobs=V, seed=0, enable_prefix_caching=False)
    if spec.get("adapter"):
        kw.update(enable_lora=True, max_lora_rank=spec["max_lora_rank"], max_loras=1)
    try:
        llm = LLM(**kw)
    except Exception as e:  # noqa: BLE001
        out["load_error"] = f"{type(e).__name__}: {e}"
        with open(spec["out"], "w") as f:
            json.dump(out, f)
        return 0
    out["load_s"] = round(time.time() - t0, 2)
    out["dtype"] = str(llm.llm_engine.model_config.dtype).replace("torch.", "")
    sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=V, logprobs=V, detokenize=False)
    runs = [("plain", None)]
    if spec.get("adapter"):
        from vllm.lora.request import LoRARequest
        # plain first: after a refused adapter (e.g. DoRA) the failed request stays in vLLM 0.32's in-process
        # scheduler and any later generate() on this engine spins forever
        runs = [("plain", None), ("lora", LoRARequest("adapter", 1, spec["adapter"]))]
    for name, lreq in runs:
        t1 = time.time()
        try:
            r = llm.generate(TokensPrompt(prompt_token_ids=ids), sp, use_tqdm=False, lora_request=lreq)[0]
        except Exception as e:  # noqa: BLE001
            out["runs"][name] = {"error": f"{type(e).__name__}: {e}", "s": round(time.time() - t1, 2)}
            break
        rows = list(r.prompt_logprobs[1:]) + [r.outputs[0].logprobs[0]]
        lp = [[float("nan")] * V for _ in rows]
        for i, row in enumerate(rows):
            for tok, l in row.items():
                if tok < V:
                    lp[i][tok] = l.logprob
        out["runs"][name] = {"logprobs": lp, "generated": r.outputs[0].token_ids[0], "s": round(time.time() - t1, 2)}
    with open(spec["out"], "w") as f:
        json.dump(out, f)
    return 0


def run_child(spec, verbose, timeout):
    with tempfile.TemporaryDirectory(prefix="check_vllm_lora.") as td:
        spec = dict(spec, out=os.path.join(td, "out.json"), verbose=verbose)
        sp = os.path.join(td, "spec.json")
        with open(sp, "w") as f:
            json.dump(spec, f)
        t0 = time.time()
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "x", "x", "x", "--_worker", sp],
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            tail = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
            tail = tail.strip().splitlines()[-10:]
            return {"load_error": f"child timed out after {timeout}s:\n    " + "\n    ".join(tail),
                    "wall_s": round(time.time() - t0, 2)}
        wall = time.time() - t0
        if not os.path.exists(spec["out"]):
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
            return {"load_error": f"child exited {proc.returncode} without a result:\n    " + "\n    ".join(tail),
                    "wall_s": round(wall, 2)}
        with open(spec["out"]) as f:
            res = json.load(f)
        res["wall_s"] = round(wall, 2)
        if verbose:
            sys.stderr.write(proc.stderr)
        return res


def _head_maps(hd, hd2):
    """Row index maps for one head: q/k (RoPE-pair-preserving interleave) and v (plain zero-pad)."""
    k, half = hd2 // hd, hd // 2
    qk = [k * (d % half) + (hd2 // 2) * (d // half) for d in range(hd)]
    return qk, list(range(hd))


def _pad_rows(t, nheads, hd, hd2, dmap, scale=1.0):
    import torch

    out = torch.zeros((nheads * hd2,) + tuple(t.shape[1:]), dtype=t.dtype)
    for h in range(nheads):
        for d in range(hd):
            out[h * hd2 + dmap[d]] = t[h * hd + d] * scale
    return out


def pad_model_dir(src, dst, cfg, hd2, kind):
    """Write an exactly equivalent copy of an HF Llama-style model (kind='model') or PEFT adapter (kind='adapter')
    with head_dim hd2 (see the module docstring)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    c = cfg.get("text_config", cfg)
    nh, nkv, hidden = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"], c["hidden_size"]
    hd = c.get("head_dim") or hidden // nh
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default" or c.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"--pad-head-dim handles only default full RoPE, got {rope}")
    if hd2 % hd or hd % 2:
        raise ValueError(f"--pad-head-dim {hd2} must be a multiple of head_dim {hd}")
    qk, vm = _head_maps(hd, hd2)
    qs = math.sqrt(hd2 / hd)
    os.makedirs(dst, exist_ok=True)
    for fn in os.listdir(src):
        if not fn.endswith(".safetensors") and os.path.isfile(os.path.join(src, fn)):
            shutil.copy(os.path.join(src, fn), os.path.join(dst, fn))
    if kind == "model":
        with open(os.path.join(src, "config.json")) as f:
            mc = json.load(f)
        (mc.get("text_config") or mc)["head_dim"] = hd2
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(mc, f, indent=2)
    for fn in os.listdir(src):
        if not fn.endswith(".safetensors"):
            continue
        sd = load_file(os.path.join(src, fn))
        out = {}
        for name, t in sd.items():
            t = t.contiguous()
            rowwise = name.endswith(("proj.weight", "lora_B.weight", "lora_magnitude_vector")) and not name.endswith(
                "lora_A.weight")
            if ".q_proj." in name and rowwise:
                t = _pad_rows(t, nh, hd, hd2, qk, qs)
            elif ".k_proj." in name and rowwise:
                t = _pad_rows(t, nkv, hd, hd2, qk)
            elif ".v_proj." in name and rowwise:
                t = _pad_rows(t, nkv, hd, hd2, vm)
            elif ".o_proj." in name and (name.endswith("o_proj.weight") or name.endswith("lora_A.weight")):
                t = _pad_rows(t.t().contiguous(), nh, hd, hd2, vm).t().contiguous()
            elif ".self_attn." in name and name.endswith(".bias"):
                raise ValueError(f"--pad-head-dim does not handle attention biases ({name})")
            out[name] = t
        save_file(out, os.path.join(dst, fn), metadata={"format": "pt"})
    return dst


def hf_logprobs(model_dir, ids):
    """HF transformers (eager attention, fp32) log_softmax of the logits of `ids` on model_dir: S x V list."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        lg = m(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(lg, -1).tolist()


def compare(a, b, atol):
    """a, b: S x V logprob lists. Returns (max_abs, top1_agree, S, hard_mismatches, missing)."""
    import torch

    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    missing = int(torch.isnan(ta).sum() + torch.isnan(tb).sum())
    diff = torch.where(torch.isinf(ta) & torch.isinf(tb) & (ta == tb), 0.0, (ta - tb).abs())
    ma, mb = ta.argmax(-1), tb.argmax(-1)
    agree = ma == mb
    near_tie = tb.gather(1, ma[:, None])[:, 0] >= tb.max(-1).values - atol
    return float(diff.max()), int(agree.sum()), ta.shape[0], int((~agree & ~near_tie).sum()), missing


def main(argv=None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if a._worker:
        return worker(a._worker)
    try:
        ids = [int(x) for x in a.prompt_ids.split(",") if x.strip()]
        with open(os.path.join(a.adapter_dir, "adapter_config.json")) as f:
            acfg = json.load(f)
        with open(os.path.join(a.base_dir, "config.json")) as f:
            bcfg = json.load(f)
    except (OSError, ValueError) as e:
        print(f"error: {e}")
        return 2
    if len(ids) < 2:
        print("error: need at least 2 prompt ids")
        return 2
    V = bcfg.get("text_config", bcfg)["vocab_size"]
    if any(not 0 <= i < V for i in ids):
        print(f"error: prompt ids must be in [0, {V})")
        return 2
    r = int(acfg.get("r", 8))
    r_max = max([r] + [int(v) for v in (acfg.get("rank_pattern") or {}).values()])
    rank = a.max_lora_rank or next((x for x in ALLOWED_RANKS if x >= r_max), r_max)
    dora = bool(acfg.get("use_dora"))
    base_dir, adapter_dir, merged_dir = (os.path.abspath(p) for p in (a.base_dir, a.adapter_dir, a.merged_dir))
    print(f"adapter {adapter_dir}: r={r} alpha={acfg.get('lora_alpha')} use_dora={dora} "
          f"targets={','.join(sorted(acfg.get('target_modules') or []))}; max_lora_rank={rank}; S={len(ids)} V={V}")

    orig_merged = merged_dir
    if a.pad_head_dim:
        wd = a.work_dir or tempfile.mkdtemp(prefix="check_vllm_lora.pad.")
        t0 = time.time()
        try:
            base_dir = pad_model_dir(base_dir, os.path.join(wd, "base"), bcfg, a.pad_head_dim, "model")
            adapter_dir = pad_model_dir(adapter_dir, os.path.join(wd, "adapter"), bcfg, a.pad_head_dim, "adapter")
            merged_dir = pad_model_dir(merged_dir, os.path.join(wd, "merged"), bcfg, a.pad_head_dim, "model")
        except (ValueError, KeyError) as e:
            print(f"error: --pad-head-dim: {e}")
            return 2
        print(f"padded to head_dim {a.pad_head_dim} in {wd} ({time.time() - t0:.1f}s)")

    common = dict(ids=ids, vocab=V, dtype=a.dtype)
    lo = run_child(dict(common, model=base_dir, adapter=adapter_dir, max_lora_rank=rank), a.verbose, a.timeout)
    me = run_child(dict(common, model=merged_dir), a.verbose, a.timeout)
    res = {"base": base_dir, "adapter": adapter_dir, "merged": merged_dir, "use_dora": dora, "r": r,
           "max_lora_rank": rank, "atol": a.atol, "vllm_version": lo.get("vllm_version") or me.get("vllm_version"),
           "lora_engine_wall_s": lo["wall_s"], "merged_engine_wall_s": me["wall_s"]}
    print(f"vLLM {res['vllm_version']}; base+LoRA engine {lo['wall_s']:.1f}s (load {lo.get('load_s', '-')}s), "
          f"merged engine {me['wall_s']:.1f}s (load {me.get('load_s', '-')}s)")
    ok, unsupported = True, False

    merged = me.get("runs", {}).get("plain", {})
    if "load_error" in me or "logprobs" not in merged:
        err = me.get("load_error") or merged.get("error")
        print(f"merged-load    FAIL: vLLM could not load/run {merged_dir}: {err}")
        ok = False
        res["merged_error"] = err
    else:
        print(f"merged-load    PASS: generated token {merged['generated']} ({merged['s']:.2f}s)")
        if a.pad_head_dim:
            mx, ag, S, hard, miss = compare(merged["logprobs"], hf_logprobs(orig_merged, ids), a.atol)
            good = miss == 0 and math.isfinite(mx) and mx <= a.atol and hard == 0
            ok &= good
            res.update(pad_exact_max_abs=mx, pad_exact_top1=ag)
            print(f"pad-exact      {'PASS' if good else 'FAIL'}: vLLM(padded merged) vs HF(original merged) "
                  f"max|dlogprob|={mx:.3g} top1 {ag}/{S} (hard mismatches {hard})")

    lora = lo.get("runs", {}).get("lora", {})
    base = lo.get("runs", {}).get("plain", {})
    if "load_error" in lo:
        print(f"base-load      FAIL: vLLM could not start {base_dir} with enable_lora=True: {lo['load_error']}")
        ok = False
        res["lora_engine_error"] = lo["load_error"]
    elif "logprobs" not in lora:
        err = lora.get("error")
        res["adapter_error"] = err
        if dora and "DoRA" in (err or ""):
            unsupported = True
            print(f"adapter-load   UNSUPPORTED (use_dora=true; a vLLM limitation, not an export defect): {err}")
        else:
            print(f"adapter-load   FAIL: {err}")
            ok = False
    else:
        print(f"adapter-load   PASS: generated token {lora['generated']} ({lora['s']:.2f}s)")
        if "logprobs" in merged:
            mx, ag, S, hard, miss = compare(lora["logprobs"], merged["logprobs"], a.atol)
            good = miss == 0 and math.isfinite(mx) and mx <= a.atol and hard == 0
            ok &= good
            res.update(lora_vs_merged_max_abs=mx, top1_agree=ag, positions=S, top1_hard_mismatches=hard,
                       missing=miss)
            print(f"lora-vs-merged {'PASS' if good else 'FAIL'}: max|dlogprob|={mx:.3g} top1 {ag}/{S} "
                  f"(hard mismatches {hard}, missing {miss}) atol={a.atol:g}")
    if "logprobs" in base and "logprobs" in merged:
        mx, ag, S, _, _ = compare(base["logprobs"], merged["logprobs"], a.atol)
        res["base_vs_merged_max_abs"] = mx
        tag = "OK  " if mx > a.atol else "WARN"
        print(f"adapter-effect {tag}: base vs merged max|dlogprob|={mx:.3g} top1 {ag}/{S}"
              + ("" if mx > a.atol else " (adapter has no visible effect; the comparison proves nothing)"))
    res["verdict"] = "UNSUPPORTED" if (unsupported and ok) else ("PASS" if ok else "FAIL")
    res["pass"] = ok
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    print(f"verdict: {res['verdict']}")
    if not ok:
        return 1
    return 1 if (unsupported and a.dora_refusal_fails) else 0


if __name__ == "__main__":
    sys.exit(main())
