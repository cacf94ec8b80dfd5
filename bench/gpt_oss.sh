#!/usr/bin/env bash
# Benchmark: GPT-OSS checkpoints with the real widths (hidden 2880, expert ffn 2880, vocab
# 201088) and the experts in MXFP4 as OpenAI releases them, at 20B's (32) and 120B's (128)
# expert counts, a few layers: HF MXFP4 -> Megatron-Core torch_dist in bf16 (`mxfp4-dequant`,
# experts in blocks of whole experts), wall time and peak RSS next to `cp -r` of the input.
# The output is ~3.8x the input (FP4 -> bf16). Peak RSS must stay within budget + 64 MB
# whatever the expert count.
#
#   bash bench/gpt_oss.sh [WORKDIR] [BUDGET] [LAYERS] [EXPERTS...]   (default /tmp/bridgeflow-bench, 512MiB, 2, 32 128)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
setup "${1:-}" "${2:-512MiB}"
layers=${3:-2}
shift 3 2> /dev/null || shift $#
counts=("${@:-32 128}")
counts=(${counts[@]})
REPS=${REPS:-1}
header
for e in "${counts[@]}"; do
  in="$work/gpt-oss-$e"
  [ -f "$in/model.safetensors" ] || "$mk" "$in" gpt-oss "$layers" "$e" > /dev/null
  bytes=$(stat -c %s "$in/model.safetensors")
  out="$work/gpt-oss-out"
  bench_row "$e experts MXFP4: cp -r" "$bytes" "$out" cp -r "$in" "$out"
  bench_row "$e experts MXFP4 -> Megatron bf16" "$bytes" "$out" $bin run \
    pipelines/hf-mxfp4-to-megatron.toml --memory-budget "$budget" --no-progress \
    --set input="$in" --set output="$out" --set write.fsync=false --set write.manifest=false
  rm -rf "$out" "$in"
done
echo "GB/s of the input bytes; budget $budget; ${REPS} run(s) each; warm page cache as far as RAM allows"
