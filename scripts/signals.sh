#!/usr/bin/env bash
# Black-box fault check: kill -9, SIGTERM and SIGINT at random moments of a conversion, then
# two writers of one output at once. For every trial:
#   - exit 0 must mean a complete output (it passes `bridgeflow verify --manifest`);
#   - a non-zero exit must leave no output, unless kill -9 landed after the commit rename
#     (then the output must be complete: it verifies);
#   - the next run on the same output must succeed and leave no staging or lock behind.
# Prints one line a trial and a summary; exits 1 on any violation.
#
#   bash scripts/signals.sh MODEL_DIR [TRIALS] [BIN]   (default 30 trials, target/release/bridgeflow)
set -uo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: signals.sh MODEL_DIR [TRIALS] [BIN]}
trials=${2:-30}
bin=${3:-target/release/bridgeflow}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
out="$work/out"
convert() { "$bin" convert --from "hf:$model" --to "megatron:$out" --no-progress "$@"; }

# How long one conversion takes: signals land anywhere in [0, 1.2 x that].
convert > /dev/null 2>&1 || { echo "the plain conversion fails"; exit 1; }
rm -rf "$out"
start=$(date +%s%N)  # timed warm
convert > /dev/null 2>&1 || { echo "the plain conversion fails"; exit 1; }
span_ms=$(( ($(date +%s%N) - start) / 1000000 * 12 / 10 ))
rm -rf "$out"
echo "one conversion: $((span_ms * 10 / 12)) ms; signals within ${span_ms} ms"

leftovers() { find "$work" -maxdepth 1 -name '.out*' | wc -l; }
complete() { "$bin" verify --manifest "$out" > /dev/null 2>&1; }
bad=0
declare -A seen
for t in $(seq 1 "$trials"); do
  sig=$(shuf -n1 -e KILL TERM INT)
  delay=$(( RANDOM % span_ms ))
  # The binary itself in the background (not a subshell), with SIGINT not ignored (a
  # non-interactive shell ignores it in background jobs).
  env --default-signal=INT "$bin" convert --from "hf:$model" --to "megatron:$out" \
    --no-progress > "$work/log" 2>&1 &
  pid=$!
  sleep "$(printf '%d.%03d' $((delay / 1000)) $((delay % 1000)))"
  kill -s "$sig" "$pid" 2> /dev/null
  wait "$pid"
  rc=$?
  verdict=ok
  if [ "$rc" -eq 0 ]; then
    complete || verdict="exit 0 but the output does not verify"
    outcome=committed
  elif [ -e "$out" ]; then
    if [ "$sig" = KILL ] && complete; then outcome=killed-after-commit; else
      verdict="failed (rc $rc) but left an output"; outcome=failed; fi
  else
    outcome=cancelled
  fi
  # The next run: succeeds, and nothing is left beside the output.
  rm -rf "$out"
  if ! convert > "$work/rerun" 2>&1; then verdict="the rerun failed: $(tail -1 "$work/rerun")"; fi
  [ "$(leftovers)" -eq 0 ] || verdict="staging left after the rerun: $(ls -a "$work" | tr '\n' ' ')"
  rm -rf "$out"
  [ "$verdict" = ok ] || bad=$((bad + 1))
  seen["$sig $outcome"]=$(( ${seen["$sig $outcome"]:-0} + 1 ))
  printf '%3d  SIG%-4s at %5d ms  rc %3d  %-20s %s\n' "$t" "$sig" "$delay" "$rc" "$outcome" "$verdict"
done

# Two writers of one output: the second is refused at once, the first commits.
convert > "$work/first" 2>&1 &
first=$!
sleep 0.3
if convert > "$work/second" 2>&1; then
  echo "concurrent: the second writer was not refused"; bad=$((bad + 1))
elif ! grep -q "output busy" "$work/second"; then
  echo "concurrent: refused, but not as busy: $(tail -1 "$work/second")"; bad=$((bad + 1))
else
  echo "concurrent: second writer refused: $(grep -o 'output busy[^;]*' "$work/second" | head -1)"
fi
wait "$first" || { echo "concurrent: the first writer failed"; bad=$((bad + 1)); }

echo "summary (signal outcome: trials):"
for k in "${!seen[@]}"; do echo "  $k: ${seen[$k]}"; done | sort
echo "$((trials - bad)) passed, $bad failed"
[ "$bad" -eq 0 ]
