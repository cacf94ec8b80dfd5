#!/usr/bin/env bash
# Benchmark: the serving exporters on the ~1 GB bf16 Llama from make-checkpoint (hidden 2048,
# 8 layers, ffn 5632, vocab 32000), each beside `cp -r` of the input in the same run: HF ->
# TensorRT-LLM at TP 2 (bf16), HF -> vLLM sharded_state at TP 2, HF -> GGUF in BF16 and Q8_0,
# and Megatron -> each of the three (through the models mapper). Prints wall time (best and median of
# REPS, default 3), GB/s of the input's bytes, peak RSS, and the median over cp's; every peak
# RSS must stay within the memory budget + 64 MB (checked, the script fails otherwise).
#
#   bash bench/export.sh [WORKDIR] [BUDGET]      (default: /tmp/bridgeflow-bench, 256MiB)
#   CARGO_TARGET_DIR=DIR (build and run from there)   DEEPSEEK=1 [EXPERTS=8] [DEEPSEEK_BUDGET=512MiB]
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
setup "$@"
REPS=${REPS:-3}
out="$work/export-out"
hf="$work/llama-1g"
[ -f "$hf/model.safetensors" ] || "$mk" "$hf" 2048 8 5632 32000
# make-checkpoint writes no tokenizer and no context length; the GGUF rows need both (any
# byte-level BPE vocabulary of the model's size does: the bench measures the weights).
[ -f "$hf/tokenizer.json" ] || python3 - "$hf" << 'PY'
import json, sys
d = sys.argv[1]
vocab = {f"<t{i}>": i for i in range(32000)}
json.dump({"model": {"type": "BPE", "vocab": vocab, "merges": []}, "added_tokens": []}, open(f"{d}/tokenizer.json", "w"))
cfg = json.load(open(f"{d}/config.json"))
cfg.setdefault("max_position_embeddings", 4096)
json.dump(cfg, open(f"{d}/config.json", "w"), indent=2)
PY
mg="$work/llama-1g-megatron"
[ -f "$mg/latest_checkpointed_iteration.txt" ] ||
  "$bin" convert --from "hf:$hf" --to "megatron:$mg" --no-progress > /dev/null
bytes=$(stat -c %s "$hf/model.safetensors")
opts=(--memory-budget "$budget" --no-progress)
# A budget in MB, plus the 64 MB of slack allowed.
limit_of() {
  python3 -c "import re,sys; m=re.fullmatch(r'(\d+)\s*([KMG]?)(i?)B?',sys.argv[1]); u={'':1,'K':1,'M':2,'G':3}[m[2]]; print(int(m[1])*(1024 if m[3] else 1000)**u//1000000 + 64)" "$1"
}
limit=$(limit_of "$budget")
worst=0
row() {
  bench_row "$@"
  if [ "$peak_mb" -gt "$worst" ]; then worst=$peak_mb; fi
}
header
cat "$hf/model.safetensors" > /dev/null
ref=""
bench_row "cp -r HF folder" "$bytes" "$out" cp -r "$hf" "$out"
ref=$median
row "HF -> TensorRT-LLM TP2 (bf16)" "$bytes" "$out" \
  "$bin" convert --from "hf:$hf" --to "trtllm:$out" --tp 2 "${opts[@]}"
row "HF -> vLLM sharded_state TP2" "$bytes" "$out" \
  "$bin" convert --from "hf:$hf" --to "vllm:$out" --tp 2 "${opts[@]}"
row "HF -> GGUF BF16" "$bytes" "$out.gguf" \
  "$bin" convert --from "hf:$hf" --to "gguf:$out.gguf" --dtype bf16 "${opts[@]}"
row "HF -> GGUF Q8_0" "$bytes" "$out.gguf" \
  "$bin" convert --from "hf:$hf" --to "gguf:$out.gguf" --dtype q8_0 "${opts[@]}"
row "Megatron -> TensorRT-LLM TP2" "$bytes" "$out" \
  "$bin" convert --from "megatron:$mg" --to "trtllm:$out" --tp 2 --hf-config "$hf/config.json" "${opts[@]}"
row "Megatron -> vLLM sharded_state TP2" "$bytes" "$out" \
  "$bin" convert --from "megatron:$mg" --to "vllm:$out" --tp 2 --hf-config "$hf/config.json" "${opts[@]}"
row "Megatron -> GGUF BF16" "$bytes" "$out.gguf" \
  "$bin" convert --from "megatron:$mg" --to "gguf:$out.gguf" --dtype bf16 --hf-config "$hf/config.json" "${opts[@]}"
rm -rf "$out" "$out.gguf"

# DEEPSEEK=1: Megatron -> vLLM sharded_state (TP 2) on the DeepSeek-V3-shaped checkpoint of
# bench/deepseek.sh (real widths, 2 layers, EXPERTS routed experts, default 8), beside cp -r of
# the Megatron folder. The HF input is removed once converted, so that the Megatron copy and the
# export fit on the disk together.
if [ "${DEEPSEEK:-0}" = 1 ]; then
  ds="$work/deepseek-export-hf"
  dsm="$work/deepseek-export-megatron"
  if [ ! -f "$dsm/latest_checkpointed_iteration.txt" ]; then
    "$mk" "$ds" deepseek 2 "${EXPERTS:-8}" > /dev/null
    python3 - "$ds" << 'PY'
import json, sys
d = sys.argv[1]
cfg = json.load(open(f"{d}/config.json"))
cfg.setdefault("max_position_embeddings", 4096)
json.dump(cfg, open(f"{d}/config.json", "w"), indent=2)
PY
    cp "$ds/config.json" "$work/deepseek-export-config.json"
    "$bin" convert --from "hf:$ds" --to "megatron:$dsm" --no-progress --memory-budget "${DEEPSEEK_BUDGET:-512MiB}" > /dev/null
    rm -rf "$ds"
  fi
  dbytes=$(du -sb "$dsm" | cut -f1)
  uncache "$hf" "$mg"
  cat "$dsm"/iter_*/__*.distcp > /dev/null
  ref=""
  bench_row "DeepSeek: cp -r Megatron folder" "$dbytes" "$out" cp -r "$dsm" "$out"
  ref=$median
  bench_row "DeepSeek: Megatron -> vLLM sharded_state TP2" "$dbytes" "$out" \
    "$bin" convert --from "megatron:$dsm" --to "vllm:$out" --tp 2 \
    --hf-config "$work/deepseek-export-config.json" --memory-budget "${DEEPSEEK_BUDGET:-512MiB}" --no-progress
  ds_limit=$(limit_of "${DEEPSEEK_BUDGET:-512MiB}")
  echo "DeepSeek peak RSS: $peak_mb MB (limit $ds_limit MB)"
  [ "$peak_mb" -le "$ds_limit" ] || { echo "FAIL: DeepSeek peak RSS over the limit"; exit 1; }
  rm -rf "$out"
  [ "${KEEP:-0}" = 1 ] || rm -rf "$dsm"
fi
echo "median of $REPS runs; GB/s of the HF tensor bytes; x ref: the median over cp -r of the HF folder."
echo "peak RSS: at most $worst MB (limit: budget $budget + 64 MB = $limit MB)"
[ "$worst" -le "$limit" ] || { echo "FAIL: peak RSS over the limit"; exit 1; }
