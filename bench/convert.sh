#!/usr/bin/env bash
# Benchmark: HF <-> Megatron-Core torch_dist (the Llama mapper) next to `cp` of the same bytes in
# the same run, with and without durability: `bridgeflow convert` with its defaults (fsync, blake3
# manifest) against `cp -r` + `sync -f`, and with `write.fsync=false` (with and without the
# manifest) against `cp -r` alone. On the ~1 GB bf16 Llama from make-checkpoint (hidden 2048,
# 8 layers, ffn 5632, vocab 32000), then on the 8.2 GB DeepSeek-V3-shaped checkpoint of
# bench/deepseek.sh (real widths, 2 layers, 32 experts). Prints wall time (best and median of
# REPS, default 5), GB/s, peak RSS, and the median as a ratio of the `cp` row it is set against
# ("x ref"); warm page cache (the other checkpoint's pages are dropped first so that the input
# and the output fit in RAM). Megatron-Bridge 0.6.2 takes ~27 s (2.3 GB RSS) to import and ~23 s
# (2.6 GB) to export a 1 GB Llama on a 2-core machine (tests/fixtures/shared/README.md).
#
#   bash bench/convert.sh [WORKDIR] [BUDGET]      (default: /tmp/bridgeflow-bench, 256MiB)
#   REPS=5  DEEPSEEK=0 (skip the 8 GB checkpoint)  DEEPSEEK_BUDGET=512MiB  KEEP=1 (keep it)
#   CARGO_TARGET_DIR=DIR (build and run from there)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
setup "$@"
REPS=${REPS:-5}
out="$work/convert-out"
# The largest peak RSS of a bridgeflow row, and the budget it must stay within (+ 64 MB).
worst_rss=0
worst_slack=""
mb() { python3 -c "import re,sys; m=re.fullmatch(r'(\d+)\s*([KMG]?)(i?)B?',sys.argv[1]); u={'':1,'K':1,'M':2,'G':3}[m[2]]; print(int(m[1])*(1024 if m[3] else 1000)**u//1000000)" "$1"; }
note_rss() {
  local b=$1 slack
  slack=$(($(mb "$b") + 64 - peak_mb))
  if [ -z "$worst_slack" ] || [ "$slack" -lt "$worst_slack" ]; then
    worst_slack=$slack
    worst_rss="$peak_mb MB at budget $b"
  fi
}

# both_ways NAME HF_DIR MEGATRON_DIR BUDGET: cp and bridgeflow rows, HF -> Megatron then back.
both_ways() {
  local name=$1 hf=$2 mg=$3 b=$4 bytes cp_s cps_s
  local opts=(--memory-budget "$b" --no-progress)
  bytes=$(stat -c %s "$hf/model.safetensors")
  uncache "$mg"
  cat "$hf/model.safetensors" > /dev/null
  ref=""
  bench_row "$name cp -r HF folder" "$bytes" "$out" cp -r "$hf" "$out"
  cp_s=$median
  bench_row "$name cp -r HF folder + sync -f" "$bytes" "$out" \
    bash -c 'cp -r "$1" "$2" && sync -f "$2"' _ "$hf" "$out"
  cps_s=$median
  hf_cp=$cp_s
  hf_cps=$cps_s
  ref=$cps_s
  bench_row "$name HF -> Megatron (fsync + manifest)" "$bytes" "$out" \
    "$bin" convert --from "hf:$hf" --to "megatron:$out" "${opts[@]}"
  note_rss "$b"
  ref=$cp_s
  bench_row "$name HF -> Megatron, fsync=false" "$bytes" "$out" \
    "$bin" convert --from "hf:$hf" --to "megatron:$out" "${opts[@]}" --set write.fsync=false
  note_rss "$b"
  bench_row "$name HF -> Megatron, no fsync, no manifest" "$bytes" "$out" \
    "$bin" convert --from "hf:$hf" --to "megatron:$out" "${opts[@]}" \
    --set write.fsync=false --set write.manifest=false
  note_rss "$b"
  uncache "$hf"
  cat "$mg"/iter_*/__*.distcp > /dev/null
  ref=""
  bench_row "$name cp -r Megatron folder" "$bytes" "$out" cp -r "$mg" "$out"
  cp_s=$median
  bench_row "$name cp -r Megatron folder + sync -f" "$bytes" "$out" \
    bash -c 'cp -r "$1" "$2" && sync -f "$2"' _ "$mg" "$out"
  cps_s=$median
  ref=$cps_s
  bench_row "$name Megatron -> HF (fsync + manifest)" "$bytes" "$out" \
    "$bin" convert --from "megatron:$mg" --to "hf:$out" "${opts[@]}"
  note_rss "$b"
  ref=$cp_s
  bench_row "$name Megatron -> HF, fsync=false" "$bytes" "$out" \
    "$bin" convert --from "megatron:$mg" --to "hf:$out" "${opts[@]}" --set write.fsync=false
  note_rss "$b"
  bench_row "$name Megatron -> HF, no fsync, no manifest" "$bytes" "$out" \
    "$bin" convert --from "megatron:$mg" --to "hf:$out" "${opts[@]}" \
    --set write.fsync=false --set write.manifest=false
  note_rss "$b"
  ref=""
}

hf="$work/llama-1g"
[ -f "$hf/model.safetensors" ] || "$mk" "$hf" 2048 8 5632 32000
mg="$work/llama-1g-megatron"
[ -f "$mg/latest_checkpointed_iteration.txt" ] ||
  "$bin" convert --from "hf:$hf" --to "megatron:$mg" --no-progress > /dev/null
header
both_ways "1 GB:" "$hf" "$mg" "$budget"

# The Megatron-LM writer (4 rank files): against the HF folder's cp rows above.
bytes=$(stat -c %s "$hf/model.safetensors")
uncache "$mg"
cat "$hf/model.safetensors" > /dev/null
ref=$hf_cps
bench_row "1 GB: HF -> Megatron-LM TP2xPP2 (fsync)" "$bytes" "$out" "$bin" convert --from "hf:$hf" \
  --to "megatron-lm:$out" --tp 2 --pp 2 --memory-budget "$budget" --no-progress
note_rss "$budget"
ref=$hf_cp
bench_row "1 GB: HF -> Megatron-LM TP2xPP2, fsync=false" "$bytes" "$out" "$bin" convert \
  --from "hf:$hf" --to "megatron-lm:$out" --tp 2 --pp 2 --memory-budget "$budget" --no-progress \
  --set write.fsync=false
note_rss "$budget"
ml="$work/llama-1g-megatron-lm"
[ -f "$ml/latest_checkpointed_iteration.txt" ] ||
  "$bin" convert --from "hf:$hf" --to "megatron-lm:$ml" --tp 2 --pp 2 --no-progress > /dev/null
cat "$ml"/iter_*/mp_rank_*/model_optim_rng.pt > /dev/null
ref=""
bench_row "1 GB: cp -r Megatron-LM TP2xPP2 folder" "$bytes" "$out" cp -r "$ml" "$out"
ref=$median
bench_row "1 GB: Megatron-LM TP2xPP2 -> HF, no fsync" "$bytes" "$out" "$bin" run \
  pipelines/megatron-lm-to-hf.toml --memory-budget "$budget" --no-progress --set input="$ml" \
  --set output="$out" --set hf_config="$hf/config.json" --set write.fsync=false \
  --set write.manifest=false
note_rss "$budget"
ref=""

if [ "${DEEPSEEK:-1}" = 1 ]; then
  ds="$work/deepseek-32-bf16"
  dsm="$work/deepseek-32-bf16-megatron"
  need=$((8200000000 * (1 + ($([ -f "$ds/model.safetensors" ] && echo 0 || echo 1)) + \
    ($([ -f "$dsm/latest_checkpointed_iteration.txt" ] && echo 0 || echo 1)))))
  free=$(df -B1 --output=avail "$work" | tail -1)
  if [ "$free" -lt "$need" ]; then
    echo "8 GB: skipped: needs ~$((need / 1000000000)) GB free, $((free / 1000000000)) GB here"
  else
    [ -f "$ds/model.safetensors" ] || "$mk" "$ds" deepseek 2 32 > /dev/null
    [ -f "$dsm/latest_checkpointed_iteration.txt" ] ||
      "$bin" convert --from "hf:$ds" --to "megatron:$dsm" --no-progress \
        --memory-budget "${DEEPSEEK_BUDGET:-512MiB}" > /dev/null
    uncache "$hf" "$mg" "$ml"
    both_ways "8 GB:" "$ds" "$dsm" "${DEEPSEEK_BUDGET:-512MiB}"
    [ "${KEEP:-0}" = 1 ] || rm -rf "$ds" "$dsm"
  fi
fi
rm -rf "$out"
echo "median of $REPS runs; GB/s of the HF tensor bytes at the median; x ref: the median over the"
echo "cp row above it (cp + sync -f for the defaults, plain cp for fsync=false); warm page cache."
echo "peak RSS: at most $worst_rss (budget + 64 MB: $worst_slack MB to spare)"
