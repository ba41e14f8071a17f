#!/usr/bin/env bash
# One machine behind a slow link: how many chunk frames it is written for what it needs, and
# how long its download takes against the link's own time for the bytes.
#
#   scripts/slowlink.sh [RATE_BYTES_PER_S] [SIZE_BYTES]     # default 30000 and 1048576
#   SLOWLINK_KEEP_ALIVE=120 scripts/slowlink.sh 3000 262144  # the machine's keep_alive_secs
#   SLOWLINK_CHUNK=16384 scripts/slowlink.sh 2000 262144     # the artifact's chunk size
#
# Starts `fleetcast serve` (embedded broker) on a free loopback port, one real agent
# (`fleetcast-device run`) connected through scripts/slowlink_proxy.py, releases a SIZE-byte
# file to it, waits for `installed`, and prints the platform's counters. Release binaries from
# target/release (built if missing). Stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-30000}
SIZE=${2:-1048576}
. scripts/slowlink_common.sh
fc machine provision vm-1 --groups g --data-dir "$DIR/vm-1" >"$DIR/vm-1.toml"
chmod 600 "$DIR/vm-1.toml"
# SLOWLINK_KEEP_ALIVE=S: the machine's keep_alive_secs (docs/device.md, "Slow links").
[ -n "${SLOWLINK_KEEP_ALIVE:-}" ] && sed -i "1i keep_alive_secs = $SLOWLINK_KEEP_ALIVE" "$DIR/vm-1.toml"
sed -i "s#127.0.0.1:$PORT#127.0.0.1:$LINK#" "$DIR/vm-1.toml"
"$BIN/fleetcast-device" run --config "$DIR/vm-1.toml" >"$DIR/agent.log" 2>&1 &
PIDS+=($!)
sleep 2
head -c "$SIZE" /dev/urandom >"$DIR/a.bin"
CHUNK=${SLOWLINK_CHUNK:-65536}
fc artifact upload "$DIR/a.bin" --kind app --version 1.0 --chunk-size "$CHUNK" >/dev/null
R=$(fc release create --kind app --version 1.0 --policy immediate 2>/dev/null | grep -o 'r-[0-9]*' | head -1)
start=$(date +%s.%N)
fc release publish "$R" --machines vm-1 --yes >/dev/null
phase=pending
for _ in $(seq $((SIZE / RATE * 4 + 120))); do
    phase=$(fc release status "$R" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["targets"][0]["phase"])')
    case $phase in installed | download_failed | install_failed) break ;; esac
    sleep 1
done
end=$(date +%s.%N)
fc stats --json >"$DIR/stats.json"
python3 - "$DIR/stats.json" "$SIZE" "$RATE" "$start" "$end" "$phase" "$DIR/agent.log" "$CHUNK" <<'PY'
import json, math, sys
stats, size, rate, start, end, phase, log, chunk = sys.argv[1:]
s = json.load(open(stats))
size, rate, took = int(size), float(rate), float(end) - float(start)
chunks = math.ceil(size / int(chunk))
parts = math.ceil(chunks * 32 / int(chunk)) if chunks > 1 else 0  # manifest parts, a chunk each
needed = chunks + parts
written = s["gateway"]["chunk_frames_delivered"]
lost = sum("connection lost" in line for line in open(log))
print(f"link {rate / 1000:.0f} KB/s, file {size} bytes: {phase} after {took:.1f} s "
      f"({took / (size / rate):.2f}x the link's own time for the file, {size / rate:.1f} s)")
print(f"chunk frames written to the machine: {written} for {needed} needed ({written / needed:.2f}x); "
      f"asked again and not sent (on their way): {s['chunk_frames_unneeded']}; connections lost: {lost}")
PY
