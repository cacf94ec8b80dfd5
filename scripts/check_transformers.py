"""Judge our HF outputs with the real tool: transformers must load them with no missing or
unexpected keys, and their logits on the fixture's reference input must match the reference.

    python scripts/check_transformers.py OUT_DIR FIXTURE_DIR [--tolerance T]

Needs torch and transformers (not needed by the build or CI). Exit 0 pass, 1 fail.
"""
import argparse
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("fixture")
p.add_argument("--tolerance", type=float, default=0.0)
a = p.parse_args()

ref = load_file(f"{a.fixture}/reference/logits.safetensors")
model, info = AutoModelForCausalLM.from_pretrained(
    a.out, output_loading_info=True, attn_implementation="eager"
)
problems = {k: v for k, v in info.items() if v}
print("loading info:", problems or "clean")
model.eval()
with torch.no_grad():
    logits = model(ref["input_ids"]).logits.float()
diff = (logits - ref["logits"]).abs().max().item()
agree = (logits.argmax(-1) == ref["logits"].argmax(-1)).float().mean().item()
print(f"dtype {model.dtype}, max |logits - reference| = {diff:.3g}, top-1 agreement {agree:.3f}")
ok = not problems and diff <= a.tolerance
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
