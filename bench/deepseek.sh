#!/usr/bin/env bash
# Benchmark: a DeepSeek-V3-shaped checkpoint with the real widths (hidden 7168, MLA, experts of
# ffn 2048, vocab 129280) but two layers (one dense, one MoE), at two expert counts, in bf16 and
# in FP8 with 128x128 block scales: HF -> Megatron-Core torch_dist (bf16), wall time and peak RSS
# (and, in bf16, -> a Megatron-LM checkpoint over 8 expert-parallel ranks) next to `cp -r` of
# the input. Peak RSS must stay within budget + 64 MB whatever the expert
# count. Needs about 3x the largest checkpoint in free disk (input, output, cp copy in turn).
#
#   bash bench/deepseek.sh [WORKDIR] [BUDGET] [EXPERTS...]   (default /tmp/bridgeflow-bench, 512MiB, 32 128)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
setup "${1:-}" "${2:-512MiB}"
shift 2 2> /dev/null || shift $#
counts=("${@:-32 128}")
counts=(${counts[@]})
REPS=${REPS:-1}
header
for e in "${counts[@]}"; do
  for q in bf16 fp8; do
    in="$work/deepseek-$e-$q"
    [ -f "$in/model.safetensors" ] || "$mk" "$in" deepseek 2 "$e" \
      $([ $q = fp8 ] && echo fp8) > /dev/null
    bytes=$(stat -c %s "$in/model.safetensors")
    out="$work/deepseek-out"
    pipeline=pipelines/hf-to-megatron.toml
    [ $q = fp8 ] && pipeline=pipelines/hf-fp8-to-megatron.toml
    bench_row "$e experts $q: cp -r" "$bytes" "$out" cp -r "$in" "$out"
    bench_row "$e experts $q: HF -> Megatron" "$bytes" "$out" $bin run $pipeline \
      --memory-budget "$budget" --no-progress --set input="$in" --set output="$out" \
      --set write.fsync=false --set write.manifest=false
    # Megatron-LM repeats the dense tensors in every EP rank's file: ~5-8x the input on disk.
    free=$(df -B1 --output=avail "$work" | tail -1)
    if [ $q = bf16 ] && [ "${EP8:-1}" = 1 ] && [ "$free" -lt $((bytes * 6)) ]; then
      echo "$e experts $q: HF -> Megatron-LM EP8 skipped: needs ~$((bytes * 6 / 1000000000)) GB free, $((free / 1000000000)) GB here"
    elif [ $q = bf16 ] && [ "${EP8:-1}" = 1 ]; then
      bench_row "$e experts $q: HF -> Megatron-LM EP8" "$bytes" "$out" $bin run \
        pipelines/hf-to-megatron-lm.toml --memory-budget "$budget" --no-progress \
        --set input="$in" --set output="$out" --set write.ep=8 --set write.fsync=false
    fi
    rm -rf "$out" "$in"
  done
done
echo "GB/s of the input bytes; budget $budget; ${REPS} run(s) each; warm page cache as far as RAM allows"
