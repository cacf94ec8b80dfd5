#!/usr/bin/env bash
# Benchmark: safetensors -> safetensors re-shard through the runtime, next to `cp`, on a ~1 GB
# and a ~4 GB bf16 Llama-shaped checkpoint. Prints GB/s and peak RSS. Warm page cache: every
# input is read once before timing (the machine's RAM holds both sizes).
#
#   bash bench/run.sh [WORKDIR] [BUDGET]      (default: /tmp/bridgeflow-bench, 256MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
setup "$@"

[ -f "$work/llama-1g/model.safetensors" ] || "$mk" "$work/llama-1g" 2048 8 5632 32000
[ -f "$work/llama-4g/model.safetensors" ] || "$mk" "$work/llama-4g" 4096 8 11008 32000

header
for size in 1g 4g; do
  in="$work/llama-$size"
  out="$work/out-$size"
  bytes=$(stat -c %s "$in/model.safetensors")
  cat "$in/model.safetensors" > /dev/null
  reshard=($bin run pipelines/reshard.toml --memory-budget "$budget" --no-progress
    --set input="$in" --set output="$out" --set max_shard_size=1GB)
  bench_row "$size cp -r" "$bytes" "$out" cp -r "$in" "$out"
  bench_row "$size bridgeflow" "$bytes" "$out" "${reshard[@]}" --set write.fsync=false --set write.manifest=false
  bench_row "$size bridgeflow+fsync+manifest" "$bytes" "$out" "${reshard[@]}"
  rm -rf "$out"
done
echo "GB/s from the median of ${REPS:-3} runs; budget $budget of tensor data in flight; warm page cache"
