#!/usr/bin/env python3
"""Judge a PEFT adapter written by bridgeflow with peft itself (oracle venv: torch, transformers,
peft 0.21.2).

  python scripts/check_peft.py --base HF_DIR --adapter ADAPTER_DIR --merged MERGED_DIR

Checks, in order:
  1. `PeftModel.from_pretrained(base, adapter)` loads every tensor of the adapter with no missing
     adapter key and no unexpected key (a DoRA adapter without `lora_magnitude_vector` fails
     here: peft would re-initialise the magnitude silently);
  2. its logits on a fixed prompt equal those of the merged model bridgeflow wrote (fp32, 1e-5);
  3. `merge_and_unload()` equals the merged model's weights (1e-6).
Prints one line per check and exits 1 on the first failure.
"""
import argparse
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def fail(msg):
    print(f"FAIL {msg}")
    sys.exit(1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--merged", required=True)
    p.add_argument("--logits-tol", type=float, default=1e-5)
    p.add_argument("--weights-tol", type=float, default=1e-6)
    a = p.parse_args()

    base = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, a.adapter)
    # The adapter's keys as peft names them in a file (no adapter name; DoRA's magnitude without
    # the ".weight" of its module, as `get_peft_model_state_dict` saves it) against the file's.
    wanted = {k.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
              for k in model.state_dict() if "lora_" in k}
    written = set(load_file(f"{a.adapter}/adapter_model.safetensors"))
    if wanted - written:
        fail(f"missing adapter keys: {sorted(wanted - written)[:5]} ({len(wanted - written)})")
    if written - wanted:
        fail(f"unexpected keys: {sorted(written - wanted)[:5]} ({len(written - wanted)})")
    n = len(written)
    dora = bool(model.peft_config["default"].use_dora)
    print(f"ok   loaded {n} adapter tensors, no missing or unexpected keys (use_dora={dora})")

    merged = AutoModelForCausalLM.from_pretrained(a.merged, dtype=torch.float32)
    ids = torch.arange(1, 17, dtype=torch.long)[None, :] % base.config.vocab_size
    with torch.no_grad():
        ours = merged(ids).logits
        theirs = model(ids).logits
    diff = (ours - theirs).abs().max().item()
    if diff > a.logits_tol:
        fail(f"logits {diff:.3e} from the merged model's (tolerance {a.logits_tol})")
    print(f"ok   logits through peft within {diff:.3e} of the merged model's")

    unloaded = model.merge_and_unload().state_dict()
    want = merged.state_dict()
    worst = max((unloaded[k] - want[k]).abs().max().item() for k in want)
    if worst > a.weights_tol:
        fail(f"merge_and_unload {worst:.3e} from the merged weights (tolerance {a.weights_tol})")
    print(f"ok   merge_and_unload within {worst:.3e} of the merged weights")


if __name__ == "__main__":
    main()
