"""Judge a torch_dist checkpoint we wrote with Megatron-Bridge itself: its `load_megatron_model`
must build the model from our `run_config.yaml` alone and load our weights, and its
`AutoBridge.export_ckpt` must turn our checkpoint into the original HF tensors, bit for bit.

    python scripts/check_bridge_load.py CKPT_ROOT HF_FIXTURE_DIR [OUT_DIR]

Needs the oracle venv (../shared/oracle/README.md; Megatron-Bridge 0.6.2 on CPU through its
mb_cpu_shim). Not needed by the build or CI. Exit 0 pass, 1 fail.
"""
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared" / "oracle"))
# A hybrid (Mamba) model: megatron-core's stack with torch classes for TE's and a
# construction-only mamba_ssm (before megatron is imported), as its golden was made
# (tests/fixtures/bridge/make.py).
HYBRID = any("HybridModelProvider" in p.read_text() for p in Path(sys.argv[1]).glob("iter_*/run_config.yaml"))
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "bridge"
sys.path[:0] = [str(FIXTURES / "cpu_stubs")] * HYBRID + [str(FIXTURES)]
import make as fixture_make  # noqa: E402  (the CPU stand-ins the goldens were made with)
import mb_cpu_shim  # noqa: E402,F401  (must come before megatron.bridge)
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

ckpt, hf = Path(sys.argv[1]), Path(sys.argv[2])
out = Path(sys.argv[3]) if len(sys.argv) > 3 else Path(tempfile.mkdtemp()) / "export"

from megatron.bridge import AutoBridge  # noqa: E402
from megatron.bridge.training import model_load_save  # noqa: E402

mb_cpu_shim.enable_cpu_mode()
mb_cpu_shim.patch_autobridge_for_cpu()

# On this CPU-only machine the provider built from run_config.yaml needs the shim's CPU layer
# spec instead of Transformer Engine's default (a GPU machine would not).
_load = model_load_save.load_model_config


def load_model_config(path):
    cfg, args = _load(path)
    spec = getattr(cfg, "transformer_layer_spec", None)
    if getattr(spec, "keywords", {}).get("use_transformer_engine"):
        # megatron-core's block spec with TE, as a GPU run wants it; without TE here.
        import functools

        cfg.transformer_layer_spec = functools.partial(spec.func, use_transformer_engine=False)
    mb_cpu_shim.make_provider_cpu_friendly(cfg)
    return cfg, args


model_load_save.load_model_config = load_model_config
iter_dir = max(ckpt.glob("iter_*"))
if HYBRID:
    fixture_make.cpu_hybrid_stack()
fixture_make.cpu_mtp_spec()  # multi-token-prediction layers, if the model has them
cfg, _ = load_model_config(str(iter_dir))
print("run_config.yaml model:", type(cfg).__name__,
      json.dumps({k: getattr(cfg, k) for k in ["num_layers", "hidden_size", "ffn_hidden_size",
                                                "num_attention_heads", "num_query_groups",
                                                "kv_channels", "vocab_size", "rotary_base",
                                                "share_embeddings_and_output_weights"]}))

dtype = json.loads((hf / "config.json").read_text()).get("dtype") or "float32"
bridge = AutoBridge.from_hf_pretrained(str(hf), torch_dtype=getattr(torch, dtype))
bridge.export_ckpt(str(ckpt), str(out), show_progress=False)


def tensors(d):
    sd = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


a, b = tensors(hf), tensors(out)
bad = sorted(k for k in set(a) | set(b) if k not in a or k not in b or not torch.equal(a[k], b[k]))
print(f"export_ckpt of our checkpoint: {len(b)} tensors, {len(a) - len(bad)} of {len(a)} equal to the original")
for k in bad[:10]:
    print("  differs or missing:", k)
sys.exit(1 if bad else 0)
