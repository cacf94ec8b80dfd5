#!/usr/bin/env bash
# Benchmark: safetensors -> safetensors re-shard through the runtime, next to `cp`, on a ~1 GB
# and a ~4 GB bf16 Llama-shaped checkpoint. Prints GB/s and peak RSS. Warm page cache: every
# input is read once before timing (the machine's RAM holds both sizes).
#
#   bash bench/run.sh [WORKDIR] [BUDGET]      (default: /tmp/bridgeflow-bench, 256MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/bridgeflow-bench}
budget=${2:-256MiB}
mkdir -p "$work"
cargo build --release --quiet --workspace
bin=target/release/bridgeflow
export BRIDGEFLOW_PLUGIN_PATH=$PWD/target/release

[ -f "$work/llama-1g/model.safetensors" ] || target/release/make-checkpoint "$work/llama-1g" 2048 8 5632 32000
[ -f "$work/llama-4g/model.safetensors" ] || target/release/make-checkpoint "$work/llama-4g" 4096 8 11008 32000

rss_of() { grep "Maximum resident set size" "$1" | awk '{print $6}'; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2])-float(sys.argv[1]):.3f}')" "$1" "$2"; }
now() { date +%s.%N; }

reps=${REPS:-3}
printf '%-5s %-27s %9s %9s %9s %12s\n' size run "best s" "median s" "GB/s" "peak RSS MB"
for size in 1g 4g; do
  in="$work/llama-$size"
  bytes=$(stat -c %s "$in/model.safetensors")
  cat "$in/model.safetensors" > /dev/null
  for run in cp bridgeflow bridgeflow+fsync+manifest; do
    times=(); peak=0
    for ((r = 0; r < reps; r++)); do
      out="$work/out-$size"
      rm -rf "$out"
      sync
      log=$(mktemp)
      t0=$(now)
      case $run in
        cp) /usr/bin/time -v cp -r "$in" "$out" 2> "$log" ;;
        bridgeflow) /usr/bin/time -v $bin run pipelines/reshard.toml --memory-budget "$budget" --no-progress \
              --set input="$in" --set output="$out" --set max_shard_size=1GB \
              --set write.fsync=false --set write.manifest=false > /dev/null 2> "$log" ;;
        bridgeflow+fsync+manifest) /usr/bin/time -v $bin run pipelines/reshard.toml --memory-budget "$budget" --no-progress \
              --set input="$in" --set output="$out" --set max_shard_size=1GB > /dev/null 2> "$log" ;;
      esac
      t1=$(now)
      times+=("$(secs "$t0" "$t1")")
      rss=$(rss_of "$log"); [ "$rss" -gt "$peak" ] && peak=$rss
      rm -f "$log"
    done
    read -r best median < <(printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {print a[1], a[int((NR+1)/2)]}')
    gbs=$(python3 -c "print(f'{$bytes/1e9/$median:.2f}')")
    printf '%-5s %-27s %9s %9s %9s %12s\n' "$size" "$run" "$best" "$median" "$gbs" "$((peak / 1024))"
  done
  rm -rf "$work/out-$size"
done
echo "GB/s from the median of $reps runs; budget $budget of tensor data in flight; warm page cache"
