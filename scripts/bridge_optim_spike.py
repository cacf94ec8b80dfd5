"""Spike: what does a Megatron-Bridge 0.6.2 torch_dist training checkpoint look like WITH the
distributed optimizer state saved as `fully_reshardable`, and does Bridge's own resume
(`load_checkpoint`) work on CPU?

    python scripts/bridge_optim_spike.py save [OUT_ROOT]   # train 2 iters, Bridge save_checkpoint
    python scripts/bridge_optim_spike.py load [OUT_ROOT]   # fresh process: Bridge load_checkpoint + compare
    python scripts/bridge_optim_spike.py all  [OUT_ROOT]   # save, then load in a subprocess

OUT_ROOT defaults to /work/bridge-optim-spike; the checkpoint goes to OUT_ROOT/ckpt and the
reference optimizer/scheduler/train state dumped after training to OUT_ROOT/reference.pt.

Single process, gloo, CPU, fp32, TP=PP=1. Needs the oracle venv (/work/venv-oracle) and the CPU
shim (/work/shared/oracle/mb_cpu_shim.py). Not needed by the build or CI.

Every runtime patch applied on top of mb_cpu_shim is recorded in PATCHES and printed.
"""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2] / "shared" / "oracle"))
warnings.filterwarnings("ignore")
import mb_cpu_shim  # noqa: E402,F401  (must precede megatron.bridge)
import torch  # noqa: E402

HF = HERE.parents[1] / "tests" / "fixtures" / "shared" / "hf" / "llama"
ROOT = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("/work/bridge-optim-spike")
CKPT = ROOT / "ckpt"
REF = ROOT / "reference.pt"

GBS, MBS, SEQ, TRAIN_ITERS = 2, 2, 16, 10
PATCHES = []
_CUDA_TO_CPU_MODE = None


def apply_patches():
    """Patches on top of mb_cpu_shim needed for DDP + DistributedOptimizer + Bridge save/load on CPU."""
    import contextlib

    import torch.distributed as dist

    # megatron.training.models.dist_utils._ddp_wrap: `ddp_stream = torch.cuda.Stream()` +
    # `with torch.cuda.stream(ddp_stream)`; param_and_grad_buffer: torch.cuda.current_stream().
    if not getattr(torch.cuda, "_spike_streams", False):
        class _Stream:
            def __init__(self, *a, **k):
                pass

            def wait_stream(self, *a, **k):
                pass

            def wait_event(self, *a, **k):
                pass

            def synchronize(self):
                pass

            def record_event(self, *a, **k):
                return _Event()

        class _Event:
            def __init__(self, *a, **k):
                pass

            def record(self, *a, **k):
                pass

            def wait(self, *a, **k):
                pass

            def synchronize(self):
                pass

            def query(self):
                return True

        torch.cuda.Stream = _Stream
        torch.cuda.Event = _Event
        torch.cuda.current_stream = lambda *a, **k: _Stream()
        torch.cuda.default_stream = lambda *a, **k: _Stream()
        torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
        torch.cuda._spike_streams = True
        PATCHES.append("torch.cuda.Stream/Event/current_stream/default_stream/stream -> dummies/nullcontext")

    # megatron-core optimizer / clip_grads / param buffers create tensors with a hard-coded
    # device='cuda' (optimizer.py: _dummy_overflow_buf, found_inf, _scale_one; clip_grads.py:
    # total_norm, dummy_overflow_buf; ...) and call .cuda(). A global TorchFunctionMode maps
    # every device='cuda' factory kwarg and Tensor.cuda()/.to('cuda') to CPU.
    global _CUDA_TO_CPU_MODE
    if _CUDA_TO_CPU_MODE is None:
        from torch.overrides import TorchFunctionMode

        def _is_cuda(d):
            return (isinstance(d, str) and d.startswith("cuda")) or (
                isinstance(d, torch.device) and d.type == "cuda") or (isinstance(d, int) and not isinstance(d, bool))

        class CudaToCpu(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = dict(kwargs or {})
                if func is torch.Tensor.cuda:
                    return args[0]
                if "device" in kwargs and _is_cuda(kwargs["device"]):
                    kwargs["device"] = "cpu"
                if func in (torch.Tensor.to,) and len(args) > 1 and (
                        (isinstance(args[1], str) and args[1].startswith("cuda"))
                        or (isinstance(args[1], torch.device) and args[1].type == "cuda")):
                    args = (args[0], "cpu", *args[2:])
                return func(*args, **kwargs)

        _CUDA_TO_CPU_MODE = CudaToCpu()
        _CUDA_TO_CPU_MODE.__enter__()
        PATCHES.append("global TorchFunctionMode: device='cuda' factory kwargs / Tensor.cuda() / .to('cuda') -> cpu")

    # distrib_optimizer._build_model_and_main_param_groups and optimizer.py classify params with
    # `model_param.type() == 'torch.cuda.FloatTensor'` (CPU params give 'torch.FloatTensor' ->
    # TypeError "Wrapped parameters must be one of torch.cuda.FloatTensor ...").
    if not getattr(torch.Tensor.type, "_cpu_patched", False):
        orig_type = torch.Tensor.type

        def _type(self, dtype=None, non_blocking=False, **kw):
            if dtype is None and not kw:
                s = orig_type(self)
                return s.replace("torch.", "torch.cuda.", 1) if not s.startswith("torch.cuda.") else s
            return orig_type(self, dtype, non_blocking, **kw)

        _type._cpu_patched = True
        torch.Tensor.type = _type
        PATCHES.append("torch.Tensor.type(): CPU tensors report 'torch.cuda.<X>Tensor' (mcore param classification)")

    # Without Apex/TE, mcore uses torch.optim.AdamW and DistributedOptimizer.state_dict() takes
    # `step` from the inner optimizer's per-param state: `steps = {s["step"].item() ...};
    # assert len(steps) == 1`. A freshly built optimizer (resume!) has no state yet, so
    # Bridge load_checkpoint -> generate_state_dict -> optimizer.sharded_state_dict(is_loading=True)
    # -> self.state_dict() raises a bare AssertionError. Allocate zero state (+ step=0) first,
    # as the optimizer's own init_state_fn does, when the state is empty.
    from megatron.core.optimizer import distrib_optimizer as do

    if not do.HAVE_APEX_OR_TE and not getattr(do.DistributedOptimizer.state_dict, "_cpu_patched", False):
        orig_sd = do.DistributedOptimizer.state_dict

        def state_dict(self):
            if len(self.optimizer.state) == 0:
                for group in self.optimizer.param_groups:
                    for p in group["params"]:
                        self.optimizer.state[p]["exp_avg"] = torch.zeros_like(p.data)
                        self.optimizer.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)
                        self.optimizer.state[p]["step"] = torch.tensor(0.0)
            return orig_sd(self)

        state_dict._cpu_patched = True
        do.DistributedOptimizer.state_dict = state_dict
        PATCHES.append("DistributedOptimizer.state_dict: allocate zero exp_avg/exp_avg_sq/step for an empty "
                       "(fresh) torch AdamW state (no-Apex/TE path asserts len(steps)==1)")

    # Same no-Apex/TE path, on load: _set_main_param_and_optimizer_states copies every *tensor*
    # of the inner state, which for torch AdamW includes the scalar tensor "step", but
    # load_parameter_state_from_fully_reshardable drops "step" from the source dict ->
    # KeyError: 'step'. Skip destination keys the source lacks (step comes from param_groups).
    if not do.HAVE_APEX_OR_TE and not getattr(do.DistributedOptimizer._set_main_param_and_optimizer_states,
                                              "_cpu_patched", False):
        orig_set = do.DistributedOptimizer._set_main_param_and_optimizer_states

        def _set_main_param_and_optimizer_states(self, model_param, tensors):
            if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
                return orig_set(self, model_param, tensors)
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            dst = {"param": main_param, **{k: v for k, v in self.optimizer.state[main_param].items()
                                           if isinstance(v, torch.Tensor)}}
            for key, d in dst.items():
                if key in tensors and isinstance(tensors[key], torch.Tensor):
                    d.copy_(tensors[key])

        _set_main_param_and_optimizer_states._cpu_patched = True
        do.DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
        PATCHES.append("DistributedOptimizer._set_main_param_and_optimizer_states: skip inner-state keys absent "
                       "from the loaded tensors (torch AdamW's tensor 'step' -> KeyError: 'step')")

    # Same no-Apex/TE path, on load: DistributedOptimizer.load_state_dict builds ONE tensor
    # `step = torch.tensor(param_groups[*]["step"])` and puts that same object into every param's
    # state; torch's Optimizer.load_state_dict keeps "step" uncopied (non-capturable), and AdamW
    # then does `step_t += 1` per param -> the shared counter advances once per param per
    # iteration (bias correction wrong for all but the first param). Silent: loss/grad-norm of the
    # next step still match, the updated weights do not. Give every param its own step tensor.
    if not do.HAVE_APEX_OR_TE and not getattr(do.DistributedOptimizer.load_state_dict, "_cpu_patched", False):
        orig_load = do.DistributedOptimizer.load_state_dict

        def load_state_dict(self, state_dict):
            out = orig_load(self, state_dict)
            for st in self.optimizer.state.values():
                if torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].detach().clone()
            return out

        load_state_dict._cpu_patched = True
        do.DistributedOptimizer.load_state_dict = load_state_dict
        PATCHES.append("DistributedOptimizer.load_state_dict: un-share the single 'step' tensor it puts into "
                       "every torch AdamW param state (else each param's `step += 1` advances it N times)")

    # gloo has no reduce_scatter_tensor / _reduce_scatter_base; DDP's distributed-optimizer grad
    # sync uses dist.reduce_scatter_tensor (via torch.distributed._coalescing_manager too).
    # With world size 1 reduce-scatter == copy.
    if not getattr(dist.reduce_scatter_tensor, "_cpu_patched", False):
        orig_rs = dist.reduce_scatter_tensor

        def reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
            if dist.get_world_size(group) == 1:
                output.copy_(input.view(-1)[: output.numel()].view_as(output))
                return _Done() if async_op else None
            return orig_rs(output, input, op=op, group=group, async_op=async_op)

        reduce_scatter_tensor._cpu_patched = True
        dist.reduce_scatter_tensor = reduce_scatter_tensor
        PATCHES.append("torch.distributed.reduce_scatter_tensor: world-size-1 copy (gloo lacks it)")

    if not getattr(dist.all_gather_into_tensor, "_cpu_patched", False):
        orig_ag = dist.all_gather_into_tensor

        def all_gather_into_tensor(output, input, group=None, async_op=False):
            if dist.get_world_size(group) == 1:
                if output.data_ptr() != input.data_ptr():
                    output.view(-1)[: input.numel()].copy_(input.view(-1))
                return _Done() if async_op else None
            return orig_ag(output, input, group=group, async_op=async_op)

        all_gather_into_tensor._cpu_patched = True
        dist.all_gather_into_tensor = all_gather_into_tensor
        PATCHES.append("torch.distributed.all_gather_into_tensor: world-size-1 copy (gloo lacks it)")


class _Done:
    def wait(self):
        return None

    def is_completed(self):
        return True


# The spike's run; `build(tag, RUN | {...})` for another (scripts/check_bridge_resume.py).
RUN = dict(lr=3e-4, min_lr=3e-5, warmup_iters=2, decay_iters=None, train_iters=TRAIN_ITERS,
           gbs=GBS, mbs=MBS, seq=SEQ, ckpt=None, bf16=False)


def build(tag, run=None):
    """Model (DDP-wrapped, HF weights), optimizer, scheduler and the ConfigContainer/GlobalState."""
    run = dict(RUN, **(run or {}))
    ckpt = str(run["ckpt"] or CKPT)
    from megatron.bridge import AutoBridge
    from megatron.bridge.training.config import (
        CheckpointConfig,
        ConfigContainer,
        DistributedDataParallelConfig,
        LoggerConfig,
        OptimizerConfig,
        SchedulerConfig,
        TrainingConfig,
        MockGPTDatasetConfig,
    )
    from megatron.bridge.training.optim import setup_optimizer
    from megatron.bridge.training.state import GlobalState
    from megatron.bridge.training.tokenizers.config import TokenizerConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    mb_cpu_shim.init_single_process_gloo()
    mb_cpu_shim.patch_autobridge_for_cpu()
    apply_patches()
    # Bridge initialize._set_random_seed(seed): random/np/torch seeds + (only if a CUDA device is
    # visible) tensor_parallel.model_parallel_cuda_manual_seed, which fills the RNG tracker with
    # data-/model-/expert-parallel states. On a CUDA-less box Bridge skips that call and the tracker
    # stays empty, and Bridge's resume then refuses the checkpoint ("Unable to load rng state",
    # sys.exit) because rng_tracker_states is empty. We call it anyway (regular tracker, not the
    # shim's inference tracker): torch.cuda.manual_seed / set_rng_state are lazy (queued, never run)
    # and torch.cuda.get_rng_state is the shim's empty-uint8 dummy, so the tracker states are
    # empty uint8 tensors here (on a GPU: the CUDA Philox generator state bytes).
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    random.seed(1234)
    np.random.seed(1234)
    torch.manual_seed(1234)
    tensor_parallel.model_parallel_cuda_manual_seed(1234, force_reset_rng=True)
    import contextlib

    # ...but forking would read the real CUDA generator (torch.cuda.random.get_rng_state): make
    # fork() a no-op on this instance (all dropouts are 0 anyway), as the shim's inference tracker does.
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    if "model_parallel_cuda_manual_seed with the regular CudaRNGStatesTracker (CPU: lazy), its fork() -> nullcontext" not in PATCHES:
        PATCHES.append("model_parallel_cuda_manual_seed with the regular CudaRNGStatesTracker (CPU: lazy), its fork() -> nullcontext")

    bridge = AutoBridge.from_hf_pretrained(str(HF), torch_dtype=torch.float32)
    provider = bridge.to_megatron_provider(load_weights=False)
    if run["bf16"]:
        # Bridge's bf16_mixed: bf16 parameters and activations (fp32 master weights in the optimizer).
        provider.bf16, provider.params_dtype, provider.pipeline_dtype = True, torch.bfloat16, torch.bfloat16
    provider.finalize()

    ddp = DistributedDataParallelConfig(
        use_distributed_optimizer=True,
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        overlap_param_gather=False,
        check_for_nan_in_grad=True,
        average_in_collective=False,
    )
    ddp.finalize()  # Bridge defers mcore __post_init__ to finalize() (ConfigContainer.validate does it)
    model = provider.provide_distributed_model(
        ddp_config=ddp, wrap_with_ddp=True, use_cpu_initialization=True, fp16=False, bf16=run["bf16"]
    )
    bridge.load_hf_weights(model)
    for m in model:
        # Bridge's setup sets this on the model config; the manual loop below calls it directly.
        m.config.finalize_model_grads_func = finalize_model_grads

    opt_cfg = OptimizerConfig(
        optimizer="adam", lr=run["lr"], min_lr=run["min_lr"], weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
        adam_eps=1e-8, clip_grad=1.0, use_distributed_optimizer=True, bf16=run["bf16"], fp16=False,
        params_dtype=torch.bfloat16 if run["bf16"] else torch.float32,
    )
    opt_cfg.finalize()
    sched_cfg = SchedulerConfig(
        lr_decay_style="cosine", lr_warmup_iters=run["warmup_iters"], lr_warmup_init=0.0,
        lr_decay_iters=run["decay_iters"],
        start_weight_decay=0.033, end_weight_decay=0.033, weight_decay_incr_style="constant",
    )
    train_cfg = TrainingConfig(train_iters=run["train_iters"], global_batch_size=run["gbs"],
                               micro_batch_size=run["mbs"])
    ckpt_cfg = CheckpointConfig(
        save=ckpt, load=ckpt, ckpt_format="torch_dist", save_optim=True, save_rng=True,
        load_optim=True, load_rng=True, finetune=False, dist_ckpt_optim_fully_reshardable=True,
        async_save=False, save_interval=1,
    )
    cfg = ConfigContainer(
        train=train_cfg,
        model=provider,
        optimizer=opt_cfg,
        ddp=ddp,
        scheduler=sched_cfg,
        dataset=MockGPTDatasetConfig(random_seed=1234, seq_length=run["seq"], reset_position_ids=False,
                                     reset_attention_mask=False, eod_mask_loss=False),
        logger=LoggerConfig(),
        tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=256),
        checkpoint=ckpt_cfg,
    )
    cfg.data_parallel_size = 1
    sched_cfg.finalize()
    cfg._calculate_scheduler_steps()  # lr_decay_steps / lr_warmup_steps / wd_incr_steps, as Bridge's validate()

    optimizer, scheduler = setup_optimizer(opt_cfg, sched_cfg, model, use_gloo_process_groups=False)

    # Bridge's initialize_megatron does this (needed by load_checkpoint -> update_num_microbatches).
    from megatron.core.num_microbatches_calculator import (
        init_num_microbatches_calculator, unset_num_microbatches_calculator)

    unset_num_microbatches_calculator()
    init_num_microbatches_calculator(0, None, run["gbs"], run["mbs"], 1)
    state = GlobalState()
    state.cfg = cfg
    print(f"[{tag}] built: optimizer={type(optimizer).__name__} inner={type(optimizer.optimizer).__name__} "
          f"scheduler lr_warmup_steps={scheduler.lr_warmup_steps} lr_decay_steps={scheduler.lr_decay_steps} "
          f"wd_incr_steps={scheduler.wd_incr_steps}")
    return model, optimizer, scheduler, state, cfg


def train(model, optimizer, scheduler, state, n_iters=2, start=0):
    """Returns [(loss, grad_norm)] per iteration; batch of iteration i is seeded with 42 + i."""
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    m = model[0]
    hist = []
    for it in range(start, start + n_iters):
        g = torch.Generator().manual_seed(42 + it)
        for mc in model:
            mc.zero_grad_buffer()
        optimizer.zero_grad()
        m.train()
        ids = torch.randint(0, 256, (MBS, SEQ + 1), generator=g)
        tokens, labels = ids[:, :-1], ids[:, 1:]
        pos = torch.arange(SEQ).unsqueeze(0).expand(MBS, -1)
        out = m(input_ids=tokens, position_ids=pos, attention_mask=None, labels=labels)
        loss = out.float().mean()
        loss.backward()
        finalize_model_grads(model)
        ok, grad_norm, nz = optimizer.step()
        assert ok, "optimizer.step() reported failure"
        scheduler.step(increment=GBS)
        state.train_state.step += 1
        state.train_state.consumed_train_samples += GBS
        state.train_state.floating_point_operations_so_far += 1000.0
        print(f"  iter {it + 1}: loss={loss.item():.6f} grad_norm={float(grad_norm):.6f} "
              f"lr={optimizer.param_groups[0]['lr']:.6g} wd={optimizer.param_groups[0]['weight_decay']:.6g} "
              f"scheduler.num_steps={scheduler.num_steps}")
        hist.append((loss.item(), float(grad_norm)))
    return hist


def sub_optimizers(optimizer):
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def snapshot(optimizer, scheduler, state, model):
    """Everything we want to round-trip, keyed by parameter name."""
    snap = {"param_state": {}, "scheduler": scheduler.state_dict(), "train_state": state.train_state.state_dict(),
            "param_groups": [], "model": {k: v.detach().clone() for k, v in model[0].module.state_dict().items()
                                          if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}}
    for oi, dopt in enumerate(sub_optimizers(optimizer)):
        snap["param_groups"] += [{"_sub_optimizer": oi, **{k: v for k, v in g.items() if k != "params"},
                                  "_n_params": len(g["params"])} for g in dopt.optimizer.param_groups]
        # main (fp32) shard params -> model params -> names
        for model_group, shard_group in zip(dopt.model_float16_groups + dopt.model_fp32_groups,
                                            dopt.shard_fp32_from_float16_groups + dopt.shard_fp32_groups):
            for mp, sp in zip(model_group, shard_group):
                name = dopt._param_name(mp)
                st = dopt.optimizer.state.get(sp, {})
                snap["param_state"][name] = {"param": sp.detach().clone(),
                                             **{k: (v.detach().clone() if torch.is_tensor(v) else v)
                                                for k, v in st.items()}}
    return snap


def describe(obj):
    """JSON-able structure of a (sharded) state dict: ShardedTensor/ShardedObject/tensor metadata."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    if isinstance(obj, dict):
        return {f"{k!r}" if not isinstance(k, str) else k: describe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [describe(v) for v in obj] if len(obj) < 50 else f"{type(obj).__name__}[{len(obj)}]"
    if isinstance(obj, ShardedTensor):
        return {"ShardedTensor": obj.key, "global_shape": list(obj.global_shape), "global_offset": list(obj.global_offset),
                "local_shape": list(obj.local_shape), "dtype": str(obj.dtype), "replica_id": str(obj.replica_id),
                "axis_fragmentations": str(obj.axis_fragmentations), "flattened_range": str(obj.flattened_range),
                "allow_shape_mismatch": obj.allow_shape_mismatch}
    if isinstance(obj, ShardedObject):
        return {"ShardedObject": obj.key, "global_shape": list(obj.global_shape), "global_offset": list(obj.global_offset),
                "replica_id": str(obj.replica_id), "unique_key": obj.unique_key,
                "data_type": type(obj.data).__name__}
    if isinstance(obj, ShardedTensorFactory):
        return {"ShardedTensorFactory": obj.key}
    if torch.is_tensor(obj):
        return {"tensor": list(obj.shape), "dtype": str(obj.dtype),
                **({"value": obj.tolist()} if obj.numel() <= 8 else {})}
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return f"<{type(obj).__module__}.{type(obj).__name__}>"


def do_save():
    from megatron.bridge.training.checkpointing import save_checkpoint

    model, optimizer, scheduler, state, cfg = build("save")
    print("patches (mb_cpu_shim):", mb_cpu_shim.CPU_PATCHES)
    print("patches (spike):", PATCHES)
    train(model, optimizer, scheduler, state, 2)
    snap = snapshot(optimizer, scheduler, state, model)
    ROOT.mkdir(parents=True, exist_ok=True)
    torch.save(snap, REF)
    # Record what Bridge hands to dist_checkpointing.save (structure only) by wrapping its
    # generate_state_dict; and the param-group membership by name (not on disk).
    from megatron.bridge.training import checkpointing as bc

    captured = {}
    orig_gen = bc.generate_state_dict

    def gen(*a, **k):
        sd = orig_gen(*a, **k)
        captured["sd"] = sd
        return sd

    bc.generate_state_dict = gen
    import random

    import numpy as np
    rng_before = {"torch": torch.get_rng_state().clone(), "random": random.getstate(),
                  "np": np.random.get_state()}
    save_checkpoint(state, model, optimizer, scheduler, num_floating_point_operations_so_far=2000.0,
                    checkpointing_context={})
    bc.generate_state_dict = orig_gen
    groups = []
    for oi, dopt in enumerate(sub_optimizers(optimizer)):
        inv = {}
        for mp, (gi, go) in dopt.model_param_group_index_map.items():
            inv.setdefault(gi, []).append((go, dopt._param_name(mp)))
        for gi in sorted(inv):
            groups.append({"sub_optimizer": oi, "group": gi, "params_in_order": [n for _, n in sorted(inv[gi])]})
    # fully_reshardable param_idx order = DDP buffer param_index_map order
    idx_order = []
    for dopt in sub_optimizers(optimizer):
        for buf in dopt.buffers:
            for mp in buf.param_index_map:
                idx_order.append(dopt._param_name(mp))
    extra = {"saved_state_dict_structure": describe(captured.get("sd")), "param_groups_by_name": groups,
             "param_idx_order": idx_order, "rng_before_save": rng_before, "patches": mb_cpu_shim.CPU_PATCHES + PATCHES}
    # continue one more iteration in the saving process: the resumed process must reproduce it
    extra["iter3"] = train(model, optimizer, scheduler, state, 1, start=2)[0]
    extra["iter3_model"] = {k: v.detach().clone() for k, v in model[0].module.state_dict().items()
                            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    torch.save({**snap, **extra}, REF)
    (ROOT / "saved_state_dict_structure.json").write_text(json.dumps(extra["saved_state_dict_structure"], indent=1))
    print("param groups by name:", json.dumps(groups, indent=1))
    print("fully_reshardable param_idx order:", json.dumps(dict(enumerate(idx_order)), indent=1))
    print("SAVE OK ->", CKPT)
    for p in sorted(CKPT.rglob("*")):
        if p.is_file():
            print(f"  {p.relative_to(CKPT)}  {p.stat().st_size}")


def do_load():
    from megatron.bridge.training.checkpointing import load_checkpoint

    model, optimizer, scheduler, state, cfg = build("load")
    print("patches (spike):", PATCHES)
    # Scramble everything so a non-load would be visible.
    with torch.no_grad():
        for p in model[0].parameters():
            p.add_(1.0)
    before = snapshot(optimizer, scheduler, state, model)
    it, flops = load_checkpoint(state, model, optimizer, scheduler, strict=True, checkpointing_context={})
    print(f"load_checkpoint returned iteration={it} flops={flops}")
    after = snapshot(optimizer, scheduler, state, model)
    ref = torch.load(REF, weights_only=False)
    res = {"ok": True, "mismatch": []}

    def cmp(path, a, b):
        if torch.is_tensor(a):
            same = torch.is_tensor(b) and a.shape == b.shape and torch.equal(a.float(), b.float())
        else:
            same = a == b
        if not same:
            res["ok"] = False
            res["mismatch"].append(path)

    for name, st in ref["param_state"].items():
        for k, v in st.items():
            cmp(f"param_state/{name}/{k}", v, after["param_state"].get(name, {}).get(k))
    for k, v in ref["model"].items():
        cmp(f"model/{k}", v, after["model"][k])
    for k, v in ref["scheduler"].items():
        cmp(f"scheduler/{k}", v, after["scheduler"].get(k))
    for k, v in ref["train_state"].items():
        cmp(f"train_state/{k}", v, after["train_state"][k])
    for i, (a, b) in enumerate(zip(ref["param_groups"], after["param_groups"])):
        for k in a:
            cmp(f"param_groups[{i}]/{k}", a[k], b.get(k))
    if len(ref["param_groups"]) != len(after["param_groups"]):
        cmp("len(param_groups)", len(ref["param_groups"]), len(after["param_groups"]))
    # the load must have changed what we scrambled
    n_changed = sum(not torch.equal(before["model"][k], after["model"][k]) for k in ref["model"])
    print(f"model tensors changed by load: {n_changed} of {len(ref['model'])}")
    import random

    import numpy as np
    rb = ref["rng_before_save"]
    cmp("rng/torch", rb["torch"], torch.get_rng_state())
    if random.getstate() != rb["random"]:
        cmp("rng/random", 0, 1)
    npa, npb = rb["np"], np.random.get_state()
    if not (npa[0] == npb[0] and (npa[1] == npb[1]).all() and tuple(npa[2:]) == tuple(npb[2:])):
        cmp("rng/np", 0, 1)
    print("rng (python/numpy/torch) restored to the state at save time:",
          not any(m.startswith("rng/") for m in res["mismatch"]))
    print("scheduler after load:", after["scheduler"])
    print("train_state after load:", {k: v.item() for k, v in after["train_state"].items()})
    print("param_groups after load:", after["param_groups"])
    print("n param_state entries compared:", len(ref["param_state"]),
          "state keys:", sorted(next(iter(ref["param_state"].values())).keys()))
    print("step value types after load:",
          {k: type(v).__name__ for k, v in next(iter(after["param_state"].values())).items()})
    # one more step after resume must reproduce iteration 3 of the uninterrupted run bit for bit
    h = train(model, optimizer, scheduler, state, 1, start=2)[0]
    cmp("iter3/(loss, grad_norm)", tuple(ref["iter3"]), tuple(h))
    for k, v in ref["iter3_model"].items():
        cmp(f"iter3_model/{k}", v, model[0].module.state_dict()[k])
    print(f"iteration 3 after resume: {h} vs uninterrupted: {tuple(ref['iter3'])}")
    print("ROUNDTRIP", "PASS" if res["ok"] else "FAIL", json.dumps(res["mismatch"][:20]))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "all"
    if mode == "save":
        do_save()
        rc = 0
    elif mode == "load":
        rc = do_load()
    else:
        rc = subprocess.call([sys.executable, __file__, "save", str(ROOT)])
        if rc == 0:
            rc = subprocess.call([sys.executable, __file__, "load", str(ROOT)])
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(rc)
