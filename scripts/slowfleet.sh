#!/usr/bin/env bash
# A fleet on slow links: N simulated machines, each on a link of its own at RATE bytes/s, and one
# release of SIZE bytes to their group. Prints how long until all are `installed` against the
# link's own time for the file, chunk frames written against needed, and lost connections.
#
#   scripts/slowfleet.sh [RATE_BYTES_PER_S] [SIZE_BYTES] [MACHINES]   # default 10000 262144 50
#   SLOWFLEET_KEEP_ALIVE=120 scripts/slowfleet.sh 3000                # the machines' keep-alive
#
# Starts `fleetcast serve` (embedded broker) on a free loopback port, scripts/slowlink_proxy.py
# in front of it (each connection through it gets RATE on its own), and `fleetcast-device
# simulate` through the proxy. Release binaries from target/release (built if missing). Stops
# everything it started. One machine, with its own log: scripts/slowlink.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-10000}
SIZE=${2:-262144}
N=${3:-50}
. scripts/slowlink_common.sh
"$BIN/fleetcast-device" simulate --count "$N" --groups g --data "$DIR/sim" \
    --broker "mqtt://127.0.0.1:$LINK" --admin-secret-file "$DIR/platform/admin.secret" \
    --initial app=0.9 ${SLOWFLEET_KEEP_ALIVE:+--keep-alive-secs "$SLOWFLEET_KEEP_ALIVE"} \
    >"$DIR/sim.log" 2>&1 &
PIDS+=($!)
online=0
for _ in $(seq $((N / 10 + 60))); do
    online=$(fc machines --json | python3 -c 'import json, sys; print(sum(m["online"] for m in json.load(sys.stdin)))')
    [ "$online" -ge "$N" ] && break
    sleep 1
done
[ "$online" -ge "$N" ] || { echo "only $online of $N machines came online" >&2; exit 1; }
head -c "$SIZE" /dev/urandom >"$DIR/a.bin"
fc artifact upload "$DIR/a.bin" --kind app --version 1.0 >/dev/null
R=$(fc release create --kind app --version 1.0 --policy immediate 2>/dev/null | grep -o 'r-[0-9]*' | head -1)
start=$(date +%s.%N)
fc release publish "$R" --groups g --yes >/dev/null
for _ in $(seq $((SIZE / RATE * 6 + 300))); do
    finished=$(fc release status "$R" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["progress"]["finished"])')
    [ "$finished" -ge "$N" ] && break
    sleep 1
done
end=$(date +%s.%N)
fc release status "$R" --json >"$DIR/status.json"
fc stats --json >"$DIR/stats.json"
python3 - "$DIR/stats.json" "$DIR/status.json" "$SIZE" "$RATE" "$start" "$end" "$N" "$DIR/sim.log" <<'PY'
import json, math, sys
stats, status, size, rate, start, end, n, log = sys.argv[1:]
s, st = json.load(open(stats)), json.load(open(status))
size, rate, n, took = int(size), float(rate), int(n), float(end) - float(start)
chunks = math.ceil(size / 65536)
parts = math.ceil(chunks * 32 / 65536) if chunks > 1 else 0  # manifest parts, as slowlink.sh counts
needed = n * (chunks + parts)  # each machine: the chunks and the manifest parts
written = s["gateway"]["chunk_frames_delivered"]
lost = sum("connection lost" in line for line in open(log))
print(f"{n} machines, each on a {rate / 1000:.0f} KB/s link, file {size} bytes: {st['progress']['phases']} "
      f"after {took:.1f} s ({took / (size / rate):.2f}x the link's own time for the file, {size / rate:.1f} s)")
print(f"chunk frames written to the machines: {written} for {needed} needed ({written / needed:.2f}x); "
      f"the platform sent {s['chunk_frames_sent']} frames; connections lost: {lost}")
PY
