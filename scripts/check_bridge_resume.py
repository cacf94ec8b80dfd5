"""Judge bridgeflow's training checkpoints with Megatron-Bridge itself: Bridge must resume from
ours — weights, distributed-optimizer state (fully_reshardable), scheduler, data position — and
continuing from our iteration-2 checkpoint with Bridge's own optimizer must land where our run
did at iteration 4.

    python scripts/check_bridge_resume.py [WORK_DIR] [HF_FIXTURE] [--bf16] [--from-bridge [--save-fixture DIR]]

HF_FIXTURE: the tiny Llama by default; `tests/fixtures/shared/hf/qwen3_moe` checks an MoE
checkpoint (experts in their own expert-parallel parameter groups, the load-balancing loss).
`--bf16`: both sides in bf16 mixed precision (Bridge's `bf16_mixed`: bf16 model parameters,
fp32 master weights, gradients and Adam moments); bf16 arithmetic differs between the two, so
the tolerances are bf16's.

1. Writes the golden batches (tests/fixtures/train/batches.safetensors) as Parquet and runs
   bridgeflow (target/debug/bridgeflow, built first) on the tiny Llama fixture: 4 iterations of
   the replays' settings, a checkpoint every 2 (tests/support/train.rs `replay_pipeline`'s run).
2. Builds the same run in Megatron-Bridge 0.6.2 on CPU (DDP, distributed optimizer, torch AdamW;
   scripts/bridge_optim_spike.py's setup and patches) and calls Bridge's `load_checkpoint` on
   our iteration 2: every parameter must change from a scrambled start, the scheduler and
   train state must say 8 samples / iteration 2.
3. Trains iterations 3 and 4 in Bridge on the samples from its loaded `consumed_train_samples`
   (megatron-core's loss: each micro-batch's masked token mean over the micro-batches).
4. Loads our iteration-4 checkpoint into a second Bridge model and optimizer and compares:
   weights, fp32 master weights and both Adam moments, per tensor.

`--from-bridge`, the other direction: Bridge trains iterations 1-2 from the HF weights and saves
with its own `save_checkpoint` (WORK_DIR/bridge_ckpt), then trains 3-4 itself; bridgeflow resumes
from Bridge's iteration 2 (`train.load`), trains 3-4 and saves; Bridge loads bridgeflow's
iteration 4 and compares it with its own, as in step 4. `--save-fixture DIR` (with
`--from-bridge`) then keeps what CI needs to replay that resume without Bridge: Bridge's
iteration-2 checkpoint as written (DIR/iter_0000002) and Bridge's own iteration-4 weights
(DIR/bridge_iter4_weights.safetensors, fp32, Bridge's parameter names).

Needs the oracle venv (../shared/oracle/README.md). Not needed by the build or CI. Exit 0 pass.
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
import bridge_optim_spike as spike  # noqa: E402  (the CPU shim and patches, before megatron)
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

REPO = HERE.parents[1]
BF16 = "--bf16" in sys.argv
FROM_BRIDGE = "--from-bridge" in sys.argv
FIXTURE = None
if "--save-fixture" in sys.argv:
    _i = sys.argv.index("--save-fixture")
    FIXTURE = Path(sys.argv[_i + 1]).resolve()
    del sys.argv[_i:_i + 2]
ARGS = [a for a in sys.argv[1:] if a not in ("--bf16", "--from-bridge")]
WORK = Path(ARGS[0]) if ARGS else Path(tempfile.mkdtemp())
if len(ARGS) > 1:
    spike.HF = Path(ARGS[1]).resolve()
CKPT = WORK / "ckpt"
BRIDGE_CKPT = WORK / "bridge_ckpt"
RUN = dict(lr=1e-3, min_lr=1e-4, warmup_iters=2, decay_iters=20, train_iters=4, gbs=4, mbs=2,
           seq=32, bf16=BF16)
PIPELINE = """
[stages.read]
plugin = "safetensors"
kind = "reader"
config = {{ path = "{hf}" }}

[stages.map]
plugin = "models"
kind = "mapper"
inputs = ["read"]
config = {{ direction = "to-megatron" }}

[stages.data]
plugin = "parquet"
kind = "reader"
config = {{ path = "{data}", columns = ["tokens", "loss_mask"] }}

[stages.train]
plugin = "trainer"
kind = "trainer"
inputs = ["map", "data"]
config = {{ seq_length = {seq}, global_batch_size = {gbs}, micro_batch_size = {mbs}, train_iters = {train_iters}, lr = {lr}, min_lr = {min_lr}, lr_warmup_iters = {warmup_iters}, lr_decay_iters = {decay_iters}, lr_decay_style = "cosine", weight_decay = 0.033, adam_beta1 = 0.9, adam_beta2 = 0.95, adam_eps = 1e-8, clip_grad = 1.0, save = "{ckpt}", save_interval = 2, bf16 = {bf16_toml}{load} }}

[stages.write]
plugin = "torch-dist"
kind = "writer"
inputs = ["train.weights"]
config = {{ path = "{out}", iteration = {train_iters} }}
"""


def batches():
    b = load_file(str(REPO / "tests/fixtures/train/batches.safetensors"))
    return b["tokens"], b["loss_mask"]


def run_bridgeflow(load=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tokens, mask = batches()
    n = RUN["train_iters"] * RUN["gbs"]
    flat_t = tokens.reshape(-1, tokens.shape[-1])[:n]
    flat_m = mask.reshape(-1, mask.shape[-1])[:n]
    WORK.mkdir(parents=True, exist_ok=True)
    data = WORK / "samples.parquet"
    pq.write_table(pa.table({"tokens": [r.tolist() for r in flat_t],
                             "loss_mask": [r.tolist() for r in flat_m]}), data)
    recipe = WORK / "recipe.toml"
    recipe.write_text(PIPELINE.format(hf=spike.HF, data=data, ckpt=CKPT, out=WORK / "final",
                                      bf16_toml=str(BF16).lower(),
                                      load=f', load = "{load}"' if load else "", **RUN))
    subprocess.run(["cargo", "build", "--workspace", "-q"], cwd=REPO, check=True)
    subprocess.run([str(REPO / "target/debug/bridgeflow"), "run", str(recipe)], cwd=REPO,
                   check=True)


def bridge_at(iteration, scramble, ckpt=CKPT):
    from megatron.bridge.training.checkpointing import load_checkpoint

    model, optimizer, scheduler, state, cfg = spike.build(f"iter {iteration}",
                                                          RUN | {"ckpt": ckpt})
    cfg.checkpoint.ckpt_step = iteration
    if scramble:
        with torch.no_grad():
            for p in model[0].parameters():
                p.add_(1.0)
    before = {k: v.clone() for k, v in model[0].module.state_dict().items() if torch.is_tensor(v)}
    it, _ = load_checkpoint(state, model, optimizer, scheduler, strict=True,
                            checkpointing_context={})
    assert it == iteration, f"Bridge resumed at iteration {it}, not {iteration}"
    after = model[0].module.state_dict()
    unchanged = [k for k, v in before.items() if torch.equal(v, after[k]) and "_extra_state" not in k]
    return model, optimizer, scheduler, state, unchanged


def train(model, optimizer, scheduler, state, iters):
    """megatron-core's step: per micro-batch masked token-mean loss / num_microbatches."""
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    tokens, mask = batches()
    flat_t = tokens.reshape(-1, tokens.shape[-1])
    flat_m = mask.reshape(-1, mask.shape[-1])
    m, gbs, mbs, seq = model[0], RUN["gbs"], RUN["mbs"], RUN["seq"]
    # megatron-core's schedule scales the MoE load-balancing loss's gradient by
    # 1/num_microbatches (MoEAuxLossAutoScaler); no effect on a dense model.
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / (gbs // mbs)))
    history = []
    for _ in range(iters):
        start = int(state.train_state.consumed_train_samples)
        for mc in model:
            mc.zero_grad_buffer()
        optimizer.zero_grad()
        m.train()
        total = 0.0
        for mb in range(gbs // mbs):
            rows = slice(start + mb * mbs, start + (mb + 1) * mbs)
            ids, lm = flat_t[rows], flat_m[rows]
            pos = torch.arange(seq).unsqueeze(0).expand(mbs, -1)
            per_token = m(input_ids=ids[:, :-1], position_ids=pos, attention_mask=None,
                          labels=ids[:, 1:]).float()
            loss = (per_token * lm).sum() / lm.sum()
            (loss / (gbs // mbs)).backward()
            total += loss.item() / (gbs // mbs)
        finalize_model_grads(model)
        ok, grad_norm, _ = optimizer.step()
        assert ok
        scheduler.step(increment=gbs)
        state.train_state.step += 1
        state.train_state.consumed_train_samples += gbs
        history.append((total, float(grad_norm)))
    return history


def optimizer_tensors(optimizer):
    out = {}
    for dopt in spike.sub_optimizers(optimizer):
        for mg, sg in zip(dopt.model_float16_groups + dopt.model_fp32_groups,
                          dopt.shard_fp32_from_float16_groups + dopt.shard_fp32_groups):
            for mp, sp in zip(mg, sg):
                st = dopt.optimizer.state[sp]
                name = dopt._param_name(mp)
                out[f"param.{name}"] = sp.detach().clone()
                out[f"exp_avg.{name}"] = st["exp_avg"].clone()
                out[f"exp_avg_sq.{name}"] = st["exp_avg_sq"].clone()
    return out


def weights_and_optimizer(model, optimizer):
    w = {k: v for k, v in model[0].module.state_dict().items()
         if torch.is_tensor(v) and "_extra_state" not in k}
    return w, optimizer_tensors(optimizer)


def bridge_saves_at_2_and_goes_on():
    """Bridge from the HF weights: iterations 1-2, its own save_checkpoint, then 3-4."""
    from megatron.bridge.training.checkpointing import save_checkpoint

    model, optimizer, scheduler, state, _ = spike.build("bridge", RUN | {"ckpt": BRIDGE_CKPT})
    print("Bridge iterations 1-2 (loss, grad norm):", train(model, optimizer, scheduler, state, 2))
    save_checkpoint(state, model, optimizer, scheduler, num_floating_point_operations_so_far=0.0,
                    checkpointing_context={})
    print("Bridge saved", BRIDGE_CKPT / "iter_0000002")
    print("Bridge iterations 3-4 (loss, grad norm):", train(model, optimizer, scheduler, state, 2))
    return weights_and_optimizer(model, optimizer)


def compare(ours, theirs, failures):
    """Per tensor, the largest difference relative to the tensor's largest value."""
    worst = {}
    # fp32: both sides compute the same; bf16: each rounds its own products (a few bf16 steps).
    tolerances = [("weights", 1e-5), ("optimizer", 1e-4)] if not BF16 else [("weights", 2e-2), ("optimizer", 5e-2)]
    for (label, tol), a, b in zip(tolerances, ours, theirs):
        assert a.keys() == b.keys(), (label, sorted(a.keys() ^ b.keys()))
        for k in a:
            x, y = a[k].float(), b[k].float()
            rel = (x - y).abs().max().item() / (y.abs().max().item() or 1.0)
            worst[f"{label}/{k}"] = rel
            if rel > tol:
                failures.append(f"{label} {k}: {rel:.3g} of its largest value (tolerance {tol})")
    for label in ("weights", "optimizer/param.", "optimizer/exp_avg."):
        print(f"largest {label} difference: {max(v for k, v in worst.items() if k.startswith(label)):.3g}")
    top = sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    print("largest differences (relative to each tensor's largest value):",
          json.dumps({k: f"{v:.3g}" for k, v in top}, indent=1))
    print(f"{len(worst)} tensors compared")


def ours_at_4(failures):
    model4, optimizer4, _, _, unchanged4 = bridge_at(4, scramble=True)
    if unchanged4:
        failures.append(f"iteration 4: load left {unchanged4[:4]} unchanged")
    return weights_and_optimizer(model4, optimizer4)


def save_fixture(theirs):
    """Bridge's iteration-2 checkpoint and its iteration-4 weights, for tests/train_checkpoints.rs."""
    import shutil
    from safetensors.torch import save_file

    shutil.rmtree(FIXTURE, ignore_errors=True)
    FIXTURE.mkdir(parents=True)
    shutil.copytree(BRIDGE_CKPT / "iter_0000002", FIXTURE / "iter_0000002")
    (FIXTURE / "latest_checkpointed_iteration.txt").write_text("2")
    save_file({k: v.detach().float().contiguous() for k, v in theirs[0].items()},
              str(FIXTURE / "bridge_iter4_weights.safetensors"))
    print("fixture saved in", FIXTURE)


def from_bridge():
    failures = []
    theirs = bridge_saves_at_2_and_goes_on()
    if FIXTURE:
        save_fixture(theirs)
    run_bridgeflow(load=BRIDGE_CKPT)
    compare(ours_at_4(failures), theirs, failures)
    return failures


def to_bridge():
    run_bridgeflow()
    failures = []
    model, optimizer, scheduler, state, unchanged = bridge_at(2, scramble=True)
    if unchanged:
        failures.append(f"load left {len(unchanged)} tensors as they were: {unchanged[:4]}")
    got = (int(state.train_state.step), int(state.train_state.consumed_train_samples),
           scheduler.num_steps)
    print("Bridge resumed from ours: (step, consumed_train_samples, scheduler num_steps) =", got)
    if got != (2, 8, 8):
        failures.append(f"position {got}, expected (2, 8, 8)")
    history = train(model, optimizer, scheduler, state, 2)
    print("Bridge iterations 3-4 (loss, grad norm):", history)
    theirs = weights_and_optimizer(model, optimizer)
    compare(ours_at_4(failures), theirs, failures)
    return failures


def main():
    failures = from_bridge() if FROM_BRIDGE else to_bridge()
    for f in failures:
        print("FAIL:", f)
    print("PASS" if not failures else "FAIL")
    return 0 if not failures else 1


if __name__ == "__main__":
    rc = main()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(rc)
