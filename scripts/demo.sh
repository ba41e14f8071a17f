#!/usr/bin/env bash
# The fleetcast demo: embedded broker + platform + 20 simulated machines, a real rollout over
# MQTT with visible progress, a rollback, and the final status. Stops everything it started.
#
#   scripts/demo.sh            # build (release) and run
#   MACHINES=1000 scripts/demo.sh   # a bigger fleet (DEMO_MACHINES works too)
set -euo pipefail
cd "$(dirname "$0")/.."

MACHINES=${MACHINES:-${DEMO_MACHINES:-20}}
# Big fleets get a smaller file by default: every machine downloads it.
if [ "$MACHINES" -le 100 ]; then SIZE_MB=${DEMO_ARTIFACT_MB:-32}
elif [ "$MACHINES" -le 2000 ]; then SIZE_MB=${DEMO_ARTIFACT_MB:-2}
else SIZE_MB=${DEMO_ARTIFACT_MB:-1}; fi
free_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % 40000))
        (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
    done
}
# `fleetcast serve` holds a socket per machine, and so does the simulator, whose agents also
# open files of their own, up to about a third as many again when thousands install at once
# (`simulate::open_files_needed`: 15,000 machines under a limit of 20,000 still failed to open
# one). Say so now rather than after a long wait.
NOFILE=$(ulimit -Hn)
NEED=$((MACHINES + MACHINES / 3 + 500))
if [ "$NOFILE" != unlimited ] && [ "$NEED" -gt "$NOFILE" ]; then
    echo "MACHINES=$MACHINES needs about $NEED open files in the simulator; this host allows $NOFILE" >&2
    echo "(ulimit -Hn; raise it, e.g. LimitNOFILE= in a systemd unit or nofile in limits.conf, or use fewer machines)" >&2
    exit 1
fi
PORT=${DEMO_PORT:-$(free_port)}
BROKER="mqtt://127.0.0.1:$PORT"
DIR=$(mktemp -d -t fleetcast-demo.XXXXXX)
# Where the simulated machines keep their data. A real fleet has a disk per machine; thousands
# of simulated ones on one disk queue their fsyncs behind each other's artifact writes, which
# slowed a 10,000-machine demo (2 min against 1 in tmpfs). Above 1,000 machines they use tmpfs
# (/dev/shm) when it, and the memory it takes from, have room for a copy of the file per
# machine (half of them download it; slots are hard links) and for the simulator's own memory
# (about 0.4 MB per machine at its peak); DEMO_SIM_DIR overrides.
SIM_PARENT=${DEMO_SIM_DIR:-}
if [ -z "$SIM_PARENT" ] && [ "$MACHINES" -gt 1000 ] && [ -d /dev/shm ]; then
    shm_free_mb=$(($(df -Pk /dev/shm | awk 'NR == 2 { print $4 }') / 1024))
    mem_free_mb=$(($(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo) / 1024))
    need_mb=$((MACHINES * SIZE_MB))
    if [ "$shm_free_mb" -gt "$need_mb" ] && [ "$mem_free_mb" -gt $((need_mb + MACHINES / 2)) ]; then
        SIM_PARENT=/dev/shm
    fi
fi
SIM_DIR=$(mktemp -d -p "${SIM_PARENT:-$DIR}" fleetcast-machines.XXXXXX)
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$SIM_DIR" "$DIR"
}
trap cleanup EXIT INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Building fleetcast (release; the first build takes several minutes, later ones seconds)"
cargo build --release --locked --bins -q
BIN=target/release
export FLEETCAST_BROKER="$BROKER"
fc() { "$BIN/fleetcast" "$@" --admin-secret-file "$DIR/platform/admin.secret"; }

step "Starting the platform with its embedded broker on $BROKER"
"$BIN/fleetcast" serve --data "$DIR/platform" --listen "127.0.0.1:$PORT" >"$DIR/platform.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do [ -s "$DIR/platform/admin.secret" ] && break; sleep 0.1; done
sleep 0.5
head -5 "$DIR/platform.log" | sed 's/^/  platform: /'

step "Starting $MACHINES simulated vending machines in groups shanghai and beijing (app 2.4.0)"
[ -n "$SIM_PARENT" ] && echo "  their data: $SIM_DIR (each real machine has a disk of its own)"
"$BIN/fleetcast-device" simulate --count "$MACHINES" --groups shanghai,beijing --prefix vm- \
    --data "$SIM_DIR" --broker "$BROKER" --admin-secret-file "$DIR/platform/admin.secret" \
    --initial app=2.4.0 >"$DIR/machines.log" 2>&1 &
PIDS+=($!)
started=$SECONDS
while :; do
    n=$(fc machines --json 2>/dev/null | grep -o '"online": *true' | wc -l || true)
    printf '\r  %d of %d machines online (%d s)' "$n" "$MACHINES" $((SECONDS - started))
    [ "$n" -ge "$MACHINES" ] && break
    if [ $((SECONDS - started)) -gt $((60 + MACHINES / 50)) ]; then
        echo; echo "machines did not come online; see $DIR/machines.log" >&2; exit 1
    fi
    sleep $((MACHINES > 500 ? 1 : 0)).2
done
echo
# Through a file, not a pipe: `head` closing the pipe early ends fc, and pipefail the demo.
fc machines >"$DIR/machines.txt"
head -8 "$DIR/machines.txt"; echo "  ..."

step "Uploading version files: app 2.4.0 (stable) and app 2.4.1 ($SIZE_MB MB)"
head -c $((SIZE_MB * 1024 * 1024 - 11)) /dev/urandom >"$DIR/app-2.4.1.bin"
head -c $((SIZE_MB * 1024 * 1024 / 2)) /dev/urandom >"$DIR/app-2.4.0.bin"
fc artifact upload "$DIR/app-2.4.0.bin" --kind app --version 2.4.0 --notes "stable"
fc artifact upload "$DIR/app-2.4.1.bin" --kind app --version 2.4.1 --notes "new payment module"
fc artifact list

step "Creating release app 2.4.1 and publishing it to group shanghai plus vm-002 and vm-004"
R=$(fc release create --kind app --version 2.4.1 --policy immediate)
echo "release: $R"
fc release publish "$R" --groups shanghai --machines vm-002,vm-004 --yes

step "Rollout progress"
fc release watch "$R" --timeout $((300 + MACHINES / 10))

step "Rolling vm-001 back to the stable app 2.4.0"
RB=$(fc rollback --machine vm-001 --kind app --to 2.4.0 --yes --quiet)
fc release watch "$RB" --timeout 120

step "Final status of release $R"
if [ "$MACHINES" -le 100 ]; then
    fc release status "$R"
else
    # A line per target would be thousands of lines: the counts, then where versions stand.
    fc release status "$R" --summary
fi
step "Rollback $RB"
fc release status "$RB"
step "Fleet"
if [ "$MACHINES" -le 100 ]; then
    fc machines
else
    fc versions --kind app --release "$R"
fi

step "Freeing the platform's disk: a version a machine still runs is kept, and the reason given"
echo "  (the refusal below is what this step shows)"
if fc artifact remove --kind app --version 2.4.0 --yes 2>&1; then
    echo "app 2.4.0 was removed while vm-001 runs it" >&2
    exit 1
fi

step "Who did what (audit log, last entries)"
fc audit >"$DIR/audit.txt"
head -1 "$DIR/audit.txt"
tail -5 "$DIR/audit.txt"

step "An integrator catches up on every signed event (read-only credentials)"
fc integrator add demo-erp >"$DIR/erp.toml"
if python3 -c "import paho.mqtt.client, cryptography" 2>/dev/null; then
    caught=$SECONDS
    python3 scripts/integrator.py "$DIR/erp.toml" --state "$DIR/erp.state" --once | tail -3
    echo "  ... $(cat "$DIR/erp.state") events in $((SECONDS - caught)) s, each signature verified (scripts/integrator.py)"
else
    echo "  (pip install paho-mqtt cryptography to run scripts/integrator.py here)"
fi

echo
echo "Integrators follow all of this live with their own read-only credentials: see docs/integrators.md."
echo "Demo done; stopping the platform and the simulated machines."
