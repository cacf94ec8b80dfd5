#!/usr/bin/env bash
# Benchmark: JSONL -> Megatron indexed dataset on the fixture corpus repeated 15x (76 MB, 45,915
# documents, bpe8k, --append-eod), as tests/fixtures/shared/data/bench measured Megatron-LM's
# preprocess_data.py. Prints docs/s, MB/s and peak RSS for 1 and 2 workers and checks that the
# output .bin is the golden .bin repeated 15 times.
#
#   bash bench/data.sh [WORKDIR]        (default /tmp/bridgeflow-bench-data)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/bridgeflow-bench-data}
F=tests/fixtures/shared/data
mkdir -p "$work"
cargo build --release --quiet --workspace
rel=$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/release
export BRIDGEFLOW_PLUGIN_PATH=$rel
big=$work/corpus_x15.jsonl
[ -f "$big" ] || for i in $(seq 15); do cat "$F/corpus/corpus.jsonl"; done > "$big"
cat "$big" > /dev/null
printf '%-8s %9s %10s %9s %12s %s\n' workers seconds docs/s MB/s "peak RSS MB" "output == golden x15"
for w in 1 2; do
  rm -f "$work"/x15_w${w}_*
  log=$(mktemp)
  /usr/bin/time -v "$rel/bridgeflow" preprocess --input "$big" --tokenizer "$F/tokenizer/bpe8k" \
    --output-prefix "$work/x15_w$w" --append-eod --workers "$w" --no-progress > /dev/null 2> "$log"
  secs=$(grep "Elapsed (wall clock)" "$log" | awk '{print $NF}' | awk -F: '{print $(NF-1)*60+$NF}')
  rss=$(grep "Maximum resident set size" "$log" | awk '{print $6}')
  ok=$(python3 -c "import sys; g=open(sys.argv[1],'rb').read(); b=open(sys.argv[2],'rb').read(); print(b == g*15)" \
      "$F/indexed/corpus_bpe8k_text_document.bin" "$work/x15_w${w}_text_document.bin")
  python3 -c "import sys; s=float(sys.argv[1]); print(f'{sys.argv[2]:<8} {s:9.2f} {45915/s:10.0f} {76040910/1e6/s:9.1f} {int(sys.argv[3])/1024:12.0f} {sys.argv[4]}')" \
    "$secs" "$w" "$rss" "$ok"
  rm -f "$log"
done
echo "peer (tests/fixtures/shared/data/bench): preprocess_data.py 832-872 docs/s (w1), 1,108-1,206 (w2); gigatoken path 9.8-14.5 s"
