#!/usr/bin/env bash
# Benchmark: one machine downloads a 50 MB artifact through the embedded broker, beside raw
# rumqttc publish/subscribe of the same bytes through the same broker in the same run.
# Results (a ratio to the baseline) are printed and recorded in docs/benchmarks.md.
#   BENCH_MB=200 scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT
if ! cargo bench --locked -q -p fleetcast-platform --bench download >"$OUT"; then
    cat "$OUT"
    echo "benchmark failed" >&2
    exit 1
fi
cat "$OUT"
ROWS=$(grep '^| ' "$OUT" || true)
[ -n "$ROWS" ] || { echo "benchmark printed no results" >&2; exit 1; }
{
    echo
    echo "### $(date -u '+%Y-%m-%d %H:%M UTC') — $(nproc) cores, $(uname -m), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo
    echo "| what | size | time | throughput | ratio to raw |"
    echo "|---|---|---|---|---|"
    echo "$ROWS"
} >>docs/benchmarks.md
echo "recorded in docs/benchmarks.md"
