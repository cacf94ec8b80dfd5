"""Judge a Megatron-LM checkpoint we wrote (`iter_*/mp_rank_*/model_optim_rng.pt`) with
Megatron-LM's own loader: `megatron.training.checkpointing._load_base_checkpoint` finds the
iteration from the tracker file, names the rank's file and torch.loads it, exactly as
`load_checkpoint` does before handing `state_dict['model']` to the model. The model is the one
Megatron-Bridge builds for the HF fixture (single process, TP = PP = 1, CPU layer spec); it is
NaN-filled, loaded from our file, compared tensor by tensor with Bridge's own HF conversion, and
its logits with the fixture's HF reference.

    python scripts/check_megatron_lm_load.py CKPT_ROOT HF_FIXTURE_DIR

Needs the oracle venv (../shared/oracle/README.md). Not needed by the build or CI. Exit 0 pass.
"""
import argparse
import math
import sys
from pathlib import Path

ORACLE = Path(__file__).resolve().parents[2] / "shared" / "oracle"
sys.path.insert(0, str(ORACLE))
import mb_cpu_shim  # noqa: E402,F401  (must come before megatron.bridge)
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from check_megatron import megatron_forward, tensor_items, hf_dtype  # noqa: E402

from megatron.bridge import AutoBridge  # noqa: E402
from megatron.training import checkpointing  # noqa: E402

ckpt, hf = Path(sys.argv[1]), Path(sys.argv[2])
mb_cpu_shim.init_single_process_gloo()
mb_cpu_shim.patch_autobridge_for_cpu()
dtype = hf_dtype(hf)
bridge = AutoBridge.from_hf_pretrained(str(hf), torch_dtype=dtype)
provider = bridge.to_megatron_provider(load_weights=False)
provider.finalize()
m = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)[0]
bridge.load_hf_weights([m])
ref = {k: v.detach().clone() for k, v in tensor_items(m).items()}
with torch.no_grad():
    for p in m.parameters():
        if p.is_floating_point():
            p.fill_(float("nan"))

# read_metadata all-reduces the tracker's iteration over the ranks in a CUDA tensor; with one
# process on a CPU machine there is nothing to agree on, so it runs as if alone.
_read_metadata = checkpointing.read_metadata


def read_metadata_alone(tracker):
    initialized = torch.distributed.is_initialized
    torch.distributed.is_initialized = lambda: False
    try:
        return _read_metadata(tracker)
    finally:
        torch.distributed.is_initialized = initialized


checkpointing.read_metadata = read_metadata_alone

# The arguments _load_base_checkpoint reads; a training run's are the same fields.
args = argparse.Namespace(non_persistent_global_ckpt_dir=None, non_persistent_ckpt_type=None,
                          ckpt_step=None, exit_on_missing_checkpoint=True, ckpt_format="torch",
                          auto_detect_ckpt_format=True, use_dist_ckpt=False, use_megatron_fsdp=False,
                          ckpt_fully_parallel_load=False, dist_ckpt_strictness="assume_ok_unexpected")
state_dict, name, release, ckpt_type = checkpointing._load_base_checkpoint(str(ckpt), args, rank0=False)
print("Megatron-LM loaded", name, "type", ckpt_type, "iteration", state_dict.get("iteration"),
      "checkpoint_version", state_dict.get("checkpoint_version"))
print("args in the file:", {k: getattr(state_dict["args"], k, None) for k in
                            ("num_layers", "hidden_size", "tensor_model_parallel_size",
                             "pipeline_model_parallel_size", "padded_vocab_size")})
result = m.load_state_dict(state_dict["model"], strict=False)
missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
print(f"load_state_dict: {len(missing)} missing, {len(unexpected)} unexpected (besides _extra_state)",
      missing[:5], unexpected[:5])

cand = {k: v.detach() for k, v in tensor_items(m).items()}
differ = [k for k in ref if ref[k].shape != cand[k].shape or not torch.equal(ref[k], cand[k])]
print(f"{len(ref) - len(differ)} of {len(ref)} tensors equal to Megatron-Bridge's conversion", differ[:5])

refl = load_file(str(hf / "reference" / "logits.safetensors"))
ref_logits = refl["logits"].float()
logits = megatron_forward(m, refl["input_ids"])[..., : ref_logits.shape[-1]]
d = (logits - ref_logits).abs().max().item()
print(f"logits max |diff| vs HF reference: {d:.3g}")
ok = not missing and not unexpected and not differ and math.isfinite(d) and d <= 1e-4
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
