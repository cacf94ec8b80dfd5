#!/usr/bin/env bash
# The trainer on a GPU (run where an NVIDIA GPU, a Rust toolchain and the CUDA toolkit are;
# nothing here runs in CI): builds the workspace with the trainer's `cuda` feature (candle's
# CUDA backend, cudarc underneath), checks that a CUDA run follows the CPU run of the same
# recipe (loss per iteration within 1e-4 relative over 5 fp32 iterations of the tiny fixture),
# then times the bench model (scripts/train_bench_setup.py's 32M Llama, seq 512, batch 4) on
# cuda:0, and, when torch with CUDA is importable, PyTorch eager on the same GPU, side by side.
#
#   bash scripts/device-check.sh [OUT_DIR]      (default /tmp/device-check; results in OUT_DIR/*.txt)
#   CARGO_TARGET_DIR=DIR  ITERS=13  PYTHON=python3
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/device-check}
mkdir -p "$out"
py=${PYTHON:-python3}
iters=${ITERS:-13}
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
command -v cargo > /dev/null || { echo "device-check: no cargo here" | tee "$out/result.txt"; exit 2; }
command -v nvcc > /dev/null || echo "device-check: no nvcc on PATH; candle's CUDA kernels need it to build" | tee -a "$out/result.txt"
tdir=${CARGO_TARGET_DIR:-target-cuda}
CARGO_TARGET_DIR=$tdir cargo build --release --workspace --features bridgeflow-plugin-train/cuda 2>&1 | tail -3
bin=$tdir/release/bridgeflow
export BRIDGEFLOW_PLUGIN_PATH=$tdir/release

# train DEVICE MODEL DATA SEQ METRICS: the bundled recipe, batch 4.
train() {
  "$bin" train pipelines/pretrain.toml --no-progress --set model="$2" --set data="$3" \
    --set output="$out/ckpt-$1" --set seq_length="$4" --set global_batch_size=4 \
    --set micro_batch_size=4 --set iters="$6" --set samples=$(($6 * 4)) \
    --set train.device="$1" --set train.metrics_file="$5" --set train.lr_warmup_iters=0 > /dev/null
}
steady() {
  "$py" -c "
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
a, b = rows[min(2, len(rows) - 2)], rows[-1]
print(f'{(b[\"tokens\"] - a[\"tokens\"]) / (b[\"elapsed_s\"] - a[\"elapsed_s\"]):.0f}')" "$1"
}

# 1. CUDA follows CPU on the tiny fixture.
tiny=tests/fixtures/shared/hf/llama
data=tests/fixtures/train/corpus_llama_text_document
train cpu "$tiny" "$data" 64 "$out/tiny-cpu.jsonl" 5
train cuda:0 "$tiny" "$data" 64 "$out/tiny-cuda.jsonl" 5
"$py" - "$out/tiny-cpu.jsonl" "$out/tiny-cuda.jsonl" << 'PY' | tee -a "$out/result.txt"
import json, sys
a = [json.loads(l)["loss"] for l in open(sys.argv[1])]
b = [json.loads(l)["loss"] for l in open(sys.argv[2])]
worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
print(f"tiny fixture, 5 iterations: CUDA vs CPU loss within {worst:.2e} relative -> {'PASS' if worst <= 1e-4 else 'FAIL'}")
PY

# 2. Throughput on the bench model, beside PyTorch on the same GPU when it is there.
if "$py" -c "import torch, transformers" 2> /dev/null; then
  [ -f "$out/bench/llama25m/model.safetensors" ] || "$py" scripts/train_bench_setup.py "$out/bench" > /dev/null
  train cuda:0 "$out/bench/llama25m" "$out/bench/tokens_text_document" 512 "$out/bench-cuda.jsonl" "$iters"
  echo "bridgeflow cuda:0, 32M Llama b4 s512 fp32: $(steady "$out/bench-cuda.jsonl") tokens/s" | tee -a "$out/result.txt"
  "$py" - "$out/bench/llama25m" << 'PY' | tee -a "$out/result.txt"
import sys, time, torch
from transformers import LlamaForCausalLM
if not torch.cuda.is_available():
    print("torch: no CUDA here"); sys.exit(0)
m = LlamaForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, attn_implementation="sdpa").cuda().train()
opt = torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
g = torch.Generator().manual_seed(1234)
tok = torch.randint(3, 8192, (4, 513), generator=g).cuda()
def step():
    loss = m(input_ids=tok[:, :-1], labels=tok[:, 1:]).loss
    loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); opt.zero_grad()
for _ in range(3): step()
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): step()
torch.cuda.synchronize()
print(f"torch eager cuda, same model b4 s512 fp32: {4 * 512 * 10 / (time.perf_counter() - t):.0f} tokens/s")
PY
else
  echo "no torch + transformers here: throughput check skipped" | tee -a "$out/result.txt"
fi
