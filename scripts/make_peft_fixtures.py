"""PEFT adapters made by peft itself on the Llama fixture, with peft's logits: the judge for
importing PEFT adapters (`lora.init_from = ADAPTER_DIR`). Oracle venv (torch, transformers,
peft 0.21.2).

    python scripts/make_peft_fixtures.py tests/fixtures/peft

Writes, each an adapter folder (adapter_model.safetensors + adapter_config.json, as
`save_pretrained` writes them) plus logits.safetensors (`input_ids` [2, 16], peft's `logits`)
and merged.safetensors (peft's `merge_and_unload()` state dict):
  lora/               r 4, alpha 8, q k v o gate up down; A and B random
                      (init_lora_weights=False): a canonical-LoRA adapter
  dora/               r 4, alpha 8, use_dora; the same A shared by q, k, v and by gate, up
                      (the shape a fused Megatron adapter exports to), magnitudes moved off
                      their initial norms: a fused DoRA adapter
  dora_no_magnitude/  dora/ without its lora_magnitude_vector tensors (what Megatron-Bridge
                      0.6.2 writes): peft would re-initialise them; the import must refuse it
"""
import shutil
import sys
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "tests" / "fixtures" / "shared" / "hf" / "llama"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base():
    m = LlamaForCausalLM.from_pretrained(str(BASE), dtype=torch.float32)
    m.eval()
    return m


def make(out, dora):
    torch.manual_seed(7 if dora else 5)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                     init_lora_weights=False, use_dora=dora)
    pm = get_peft_model(base(), cfg)
    if dora:
        with torch.no_grad():
            for layer in pm.base_model.model.model.layers:
                at, mlp = layer.self_attn, layer.mlp
                for group in ((at.q_proj, at.k_proj, at.v_proj), (mlp.gate_proj, mlp.up_proj)):
                    a = group[0].lora_A["default"].weight
                    for mod in group[1:]:
                        mod.lora_A["default"].weight.copy_(a)
                for mod in (at.q_proj, at.k_proj, at.v_proj, at.o_proj, mlp.gate_proj, mlp.up_proj,
                            mlp.down_proj):
                    mag = mod.lora_magnitude_vector["default"].weight
                    mag.mul_(1.0 + 0.1 * torch.randn(mag.shape))
    pm.save_pretrained(str(out))
    ids = (torch.arange(32).reshape(2, 16) * 37 + 11) % 256
    with torch.no_grad():
        logits = PeftModel.from_pretrained(base(), str(out))(input_ids=ids).logits
    save_file({"input_ids": ids.contiguous(), "logits": logits.contiguous()}, str(out / "logits.safetensors"))
    merged = PeftModel.from_pretrained(base(), str(out)).merge_and_unload().state_dict()
    save_file({n: t.contiguous() for n, t in merged.items()}, str(out / "merged.safetensors"))


def main():
    root = Path(sys.argv[1])
    make(root / "lora", dora=False)
    make(root / "dora", dora=True)
    bad = root / "dora_no_magnitude"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(root / "dora", bad)
    t = load_file(str(bad / "adapter_model.safetensors"))
    save_file({k: v for k, v in t.items() if "lora_magnitude_vector" not in k},
              str(bad / "adapter_model.safetensors"))
    (bad / "merged.safetensors").unlink()
    for d in ("lora", "dora", "dora_no_magnitude"):
        (root / d / "README.md").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
