# Shared by the benchmark scripts (source it). Times a command REPS times (default 3) on a warm
# page cache, each run into a fresh output after `sync`, and prints one row: best and median
# wall seconds, GB/s of the given byte count at the median, and the peak RSS over the runs.

# setup [WORKDIR] [BUDGET]: sets $work, $budget and $bin, builds the release binaries and points
# the plugin search at them.
setup() {
  work=${1:-/tmp/bridgeflow-bench}
  budget=${2:-256MiB}
  mkdir -p "$work"
  cargo build --release --quiet --workspace
  bin=target/release/bridgeflow
  export BRIDGEFLOW_PLUGIN_PATH=$PWD/target/release
}

header() { printf '%-34s %8s %9s %7s %12s\n' run "best s" "median s" "GB/s" "peak RSS MB"; }

# bench_row LABEL BYTES OUTPUT CMD...   (OUTPUT is removed before each run)
bench_row() {
  local label=$1 bytes=$2 out=$3
  shift 3
  local times=() peak=0 log t0 t1 rss best median
  for ((r = 0; r < ${REPS:-3}; r++)); do
    rm -rf "$out"
    sync
    sleep 0.5
    log=$(mktemp)
    t0=$(date +%s.%N)
    /usr/bin/time -v "$@" > /dev/null 2> "$log" || { cat "$log" >&2; return 1; }
    t1=$(date +%s.%N)
    times+=("$(python3 -c "import sys; print(f'{float(sys.argv[2])-float(sys.argv[1]):.3f}')" "$t0" "$t1")")
    rss=$(grep "Maximum resident set size" "$log" | awk '{print $6}')
    [ "$rss" -gt "$peak" ] && peak=$rss
    rm -f "$log"
  done
  read -r best median < <(printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {print a[1], a[int((NR+1)/2)]}')
  printf '%-34s %8s %9s %7s %12s\n' "$label" "$best" "$median" \
    "$(python3 -c "print(f'{$bytes/1e9/$median:.2f}')")" "$((peak / 1024))"
}
