# Shared by the benchmark scripts (source it). Times a command REPS times (default 3) on a warm
# page cache, each run into a fresh output after `sync`, and prints one row: best and median
# wall seconds, GB/s of the given byte count at the median, the peak RSS over the runs, and the
# median as a ratio of a reference row's ($ref, when set).

# setup [WORKDIR] [BUDGET]: sets $work, $budget, $bin (the CLI) and $mk (make-checkpoint),
# builds the release binaries (into $CARGO_TARGET_DIR when set, else target/) and points the
# plugin search at them.
setup() {
  work=${1:-/tmp/bridgeflow-bench}
  budget=${2:-256MiB}
  mkdir -p "$work"
  cargo build --release --quiet --workspace
  local tdir=${CARGO_TARGET_DIR:-target}
  tdir=$(cd "$tdir" && pwd)
  bin=$tdir/release/bridgeflow
  mk=$tdir/release/make-checkpoint
  export BRIDGEFLOW_PLUGIN_PATH=$tdir/release
}

header() {
  printf '%-44s %8s %9s %7s %12s %8s\n' run "best s" "median s" "GB/s" "peak RSS MB" "x ref"
}

# Drops the page cache of the files under each path (POSIX_FADV_DONTNEED), so that a large
# benchmark's other inputs leave room for this one's input and output.
uncache() {
  python3 - "$@" << 'EOF'
import os, sys
for root in sys.argv[1:]:
    for dp, _, fn in os.walk(root):
        for f in fn:
            try:
                fd = os.open(os.path.join(dp, f), os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
            except OSError:
                pass
EOF
}

# bench_row LABEL BYTES OUTPUT CMD...   (OUTPUT is removed before each run). Sets $median and
# $peak_mb; the last column is $median / $ref when $ref is set.
bench_row() {
  local label=$1 bytes=$2 out=$3
  shift 3
  local times=() peak=0 log t0 t1 rss best ratio=""
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
  peak_mb=$((peak / 1024))
  [ -n "${ref:-}" ] && ratio=$(python3 -c "print(f'{$median/$ref:.2f}')")
  printf '%-44s %8s %9s %7s %12s %8s\n' "$label" "$best" "$median" \
    "$(python3 -c "print(f'{$bytes/1e9/$median:.2f}')")" "$peak_mb" "$ratio"
}
