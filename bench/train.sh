#!/usr/bin/env bash
# Benchmark: bridgeflow's trainer beside PyTorch eager (torch 2.15 + transformers 5.12.1, 2
# threads) on the same model, same machine, same run — the baseline's 32M-parameter Llama
# (hidden 512, 8 layers, seq 512, batch 4, fp32, AdamW, clip 1.0) from the same initial weights
# (scripts/train_bench_setup.py makes them as the baseline does), then the tiny fixture (seq
# 128, batch 4), then a Mixtral of the Llama's shape (8 experts of ffn 704, top-2: the same
# active FFN width; torch side: scripts/moe_bench_torch.py, the baseline's loop on
# transformers' Mixtral with megatron-core's load-balancing loss, median of 3 runs). Prints steady tokens/s (after 3 warm-up iterations, as the baseline counts)
# and peak RSS of both, and their ratios. The baseline's own protocol (shared/oracle/train/
# torch_baseline.py: quiet-machine waits, least-contended repeats) runs unchanged.
#
#   bash bench/train.sh [WORKDIR]        (default /tmp/bridgeflow-bench)
#   VENV=DIR  (python with torch + transformers; default /work/venv-oracle)
#   BASELINE=PATH  (torch_baseline.py; default ../shared/oracle/train/torch_baseline.py; when it
#                   is not there, scripts/moe_bench_torch.py measures the full-training rows with
#                   the same loop, and the LoRA row has our column only)
#   ITERS=13  REPS=3 (our runs per case)  CARGO_TARGET_DIR=DIR
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
setup "${1:-}"
py=${VENV:-/work/venv-oracle}/bin/python
baseline=${BASELINE:-../shared/oracle/train/torch_baseline.py}
iters=${ITERS:-13}
w="$work/train"
[ -f "$w/mixtral/model.safetensors" ] || "$py" scripts/train_bench_setup.py "$w" > /dev/null

# ours MODEL DATA SEQ [RECIPE SET...]: trains ITERS iterations of batch 4 with RECIPE (default
# pretrain: full training, out to a torch_dist folder; lora: the extra SETs pick its adapters),
# REPS times (default 3, as the baseline repeats its runs); sets ours_tps (the median over the
# runs of iterations 4..ITERS' tokens/s) and ours_rss (the largest peak RSS, MB).
ours() {
  local model=$1 data=$2 seq=$3 recipe=${4:-pretrain} m="$w/metrics.jsonl" log tps=() rss=0 r
  shift $(($# < 4 ? $# : 4))
  local outs=(--set output="$w/out")
  [ "$recipe" = lora ] && outs=(--set adapter="$w/out/adapter" --set merged="$w/out/merged")
  for _ in $(seq "${REPS:-3}"); do
    rm -rf "$m" "$w/out"
    log=$(mktemp)
    /usr/bin/time -v "$bin" train "pipelines/$recipe.toml" --no-progress \
      --set model="$model" --set data="$data" "${outs[@]}" "$@" \
      --set seq_length="$seq" --set global_batch_size=4 --set micro_batch_size=4 \
      --set iters="$iters" --set samples=$((iters * 4)) --set train.metrics_file="$m" \
      --set train.lr=1e-4 --set train.min_lr=1e-4 --set train.lr_warmup_iters=0 \
      --set train.weight_decay=0.1 > /dev/null 2> "$log" || { cat "$log" >&2; return 1; }
    r=$(($(grep "Maximum resident set size" "$log" | awk '{print $6}') / 1024))
    [ "$r" -gt "$rss" ] && rss=$r
    tps+=("$(python3 -c "
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
a, b = rows[2], rows[-1]
print(f'{(b[\"tokens\"] - a[\"tokens\"]) / (b[\"elapsed_s\"] - a[\"elapsed_s\"]):.1f}')" "$m")")
    rm -f "$log"
  done
  ours_rss=$rss
  ours_tps=$(printf '%s\n' "${tps[@]}" | python3 -c "
import statistics, sys
print(f'{statistics.median(float(l) for l in sys.stdin):.1f}')")
}

# theirs CASE [MODEL DATA SEQ]: the baseline's median tokens/s and peak RSS for one case id.
# Without the baseline script (a clone with no ../shared), full training of MODEL on DATA at SEQ
# through scripts/moe_bench_torch.py (the same loop, median of 3); "-" for a case with no MODEL,
# or without the venv: then only our columns are measured.
theirs() {
  if [ ! -x "$py" ] || { [ ! -f "$baseline" ] && [ $# -lt 4 ]; }; then
    torch_tps=- torch_rss=-
    return
  fi
  if [ ! -f "$baseline" ]; then
    theirs_moe "$2" "$3" --seq "$4"
    return
  fi
  "$py" "$baseline" --only "$1" --out "$w/torch.json" --max-wait 120 > /dev/null
  read -r torch_tps torch_rss < <(python3 -c "
import json, sys
r = json.load(open(sys.argv[1]))['results'][0]
print(f\"{r['tokens_per_s_median']:.1f} {r['peak_rss_mib']:.0f}\")" "$w/torch.json")
}

# theirs_moe MODEL DATA [ARGS...]: the median of 3 runs of scripts/moe_bench_torch.py.
theirs_moe() {
  if [ ! -x "$py" ]; then
    torch_tps=- torch_rss=-
    return
  fi
  read -r torch_tps torch_rss < <(for _ in 1 2 3; do
    "$py" scripts/moe_bench_torch.py "$@" 2> /dev/null | tail -1
  done | python3 -c "
import json, statistics, sys
rows = [json.loads(l) for l in sys.stdin]
print(f\"{statistics.median(r['tokens_per_s'] for r in rows):.1f} {max(r['peak_rss_mib'] for r in rows):.0f}\")")
}

printf '%-34s %12s %12s %8s %10s %10s %8s\n' case "ours tok/s" "torch tok/s" ratio "ours MB" "torch MB" "RSS x"
ratio() { [ "$2" = - ] && echo - || python3 -c "print(f'{$1/$2:.2f}')"; }
report() {
  printf '%-34s %12s %12s %8s %10s %10s %8s\n' "$1" "$ours_tps" "$torch_tps" \
    "$(ratio "$ours_tps" "$torch_tps")" "$ours_rss" "$torch_rss" "$(ratio "$ours_rss" "$torch_rss")"
}
ours "$w/llama25m" "$w/tokens_text_document" 512
theirs "llama25m/fp32/train/b4s512" "$w/llama25m" "$w/tokens_text_document" 512
report "llama 32M fp32 train b4 s512"
# LoRA r 16, alpha 32 on q, k, v, o, gate, up, down (canonical LoRA: peft's layout and FLOPs).
ours "$w/llama25m" "$w/tokens_text_document" 512 lora --set train.lora.dim=16 \
  --set train.lora.alpha=32.0 --set train.lora.canonical=true
theirs "llama25m-lora16/fp32/train/b4s512"
report "llama 32M LoRA r16 (peft) b4 s512"
ours tests/fixtures/shared/hf/llama "$w/tiny_text_document" 128
theirs "tiny/fp32/train/b4s128" tests/fixtures/shared/hf/llama "$w/tiny_text_document" 128
report "tiny fixture fp32 train b4 s128"
ours "$w/mixtral" "$w/tokens_text_document" 512
theirs_moe "$w/mixtral" "$w/tokens_text_document"
report "mixtral 8x704 top-2 fp32 b4 s512"
echo "ours: median over ${REPS:-3} runs of iterations 4..$iters (tokens / seconds between them); torch: median of 3 clean"
echo "repeats of 10 steps after 3 warm-up steps (the baseline's protocol); peak RSS of each process."
