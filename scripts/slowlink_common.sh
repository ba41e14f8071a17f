# Sourced by scripts/slowlink.sh and scripts/slowfleet.sh, from the repository's top, with RATE
# set: builds the release binaries if missing, starts `fleetcast serve` (embedded broker) on a
# free loopback port and scripts/slowlink_proxy.py in front of it (each connection through it
# gets RATE bytes/s of its own), and on exit stops them and whatever the caller added to PIDS.
# Sets BIN (SLOWLINK_BIN, default target/release), DIR (a temp dir, removed on exit), PORT (the
# broker), LINK (the proxy), PIDS; defines fc (the CLI, as admin) and exports FLEETCAST_BROKER.
[ -x target/release/fleetcast ] && [ -x target/release/fleetcast-device ] ||
    cargo build --release --locked -q -p fleetcast-platform -p fleetcast-device
BIN=${SLOWLINK_BIN:-target/release}
DIR=$(mktemp -d -t fleetcast-slowlink.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$DIR"
}
trap cleanup EXIT INT TERM
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
LINK=$(free_port)
"$BIN/fleetcast" serve --data "$DIR/platform" --listen "127.0.0.1:$PORT" >"$DIR/serve.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do [ -s "$DIR/platform/admin.secret" ] && break; sleep 0.1; done
sleep 0.5
export FLEETCAST_BROKER="mqtt://127.0.0.1:$PORT"
fc() { "$BIN/fleetcast" "$@" --admin-secret-file "$DIR/platform/admin.secret"; }
python3 scripts/slowlink_proxy.py "$LINK" "$PORT" "$RATE" &
PIDS+=($!)
sleep 0.3
