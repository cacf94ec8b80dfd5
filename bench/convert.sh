#!/usr/bin/env bash
# Benchmark: HF -> Megatron-Core torch_dist and back (the Llama mapper) on the ~1 GB bf16
# Llama from make-checkpoint (hidden 2048, 8 layers, ffn 5632, vocab 32000), next to `cp -r` of
# the same input folder. Prints wall time, GB/s and peak RSS; warm page cache. Megatron-Bridge
# 0.6.2 takes ~27 s (2.3 GB RSS) to import and ~23 s (2.6 GB) to export a 1 GB Llama on a 2-core
# machine (tests/fixtures/shared/README.md).
#
#   bash bench/convert.sh [WORKDIR] [BUDGET]      (default: /tmp/bridgeflow-bench, 256MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
setup "$@"

hf="$work/llama-1g"
[ -f "$hf/model.safetensors" ] || target/release/make-checkpoint "$hf" 2048 8 5632 32000
mg="$work/llama-1g-megatron"
[ -f "$mg/latest_checkpointed_iteration.txt" ] ||
  $bin convert --from "hf:$hf" --to "megatron:$mg" --no-progress > /dev/null
bytes=$(stat -c %s "$hf/model.safetensors")
cat "$hf/model.safetensors" "$mg"/iter_*/__*.distcp > /dev/null

out="$work/convert-out"
nosync=(--set write.fsync=false --set write.manifest=false)
header
bench_row "cp -r HF folder" "$bytes" "$out" cp -r "$hf" "$out"
bench_row "HF -> Megatron" "$bytes" "$out" $bin run pipelines/hf-to-megatron.toml \
  --memory-budget "$budget" --no-progress --set input="$hf" --set output="$out" "${nosync[@]}"
bench_row "HF -> Megatron (convert: fsync+b3)" "$bytes" "$out" $bin convert --from "hf:$hf" \
  --to "megatron:$out" --memory-budget "$budget" --no-progress
bench_row "cp -r Megatron folder" "$bytes" "$out" cp -r "$mg" "$out"
bench_row "Megatron -> HF" "$bytes" "$out" $bin run pipelines/megatron-to-hf.toml \
  --memory-budget "$budget" --no-progress --set input="$mg" --set output="$out" "${nosync[@]}"
bench_row "Megatron -> HF (convert: fsync+b3)" "$bytes" "$out" $bin convert --from "megatron:$mg" \
  --to "hf:$out" --memory-budget "$budget" --no-progress
ml="$work/llama-1g-megatron-lm"
[ -f "$ml/latest_checkpointed_iteration.txt" ] ||
  $bin convert --from "hf:$hf" --to "megatron-lm:$ml" --tp 2 --pp 2 --no-progress > /dev/null
cat "$ml"/iter_*/mp_rank_*/model_optim_rng.pt > /dev/null
bench_row "cp -r Megatron-LM TP2xPP2 folder" "$bytes" "$out" cp -r "$ml" "$out"
bench_row "Megatron-LM TP2xPP2 -> HF" "$bytes" "$out" $bin run pipelines/megatron-lm-to-hf.toml \
  --memory-budget "$budget" --no-progress --set input="$ml" --set output="$out" \
  --set hf_config="$hf/config.json" "${nosync[@]}"
rm -rf "$out"
echo "GB/s of the HF tensor bytes at the median of ${REPS:-3} runs; budget $budget; warm page cache"
