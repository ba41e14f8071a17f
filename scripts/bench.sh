#!/usr/bin/env bash
# Benchmarks, each a ratio to a baseline measured in the same run (release build). Every mode
# prints its tables and appends them to docs/benchmarks.md under a heading with the date, cores,
# architecture and commit.
#
#   scripts/bench.sh             one machine downloads a 50 MB artifact vs raw pub/sub (BENCH_MB=200):
#                                in process on plain rumqttd, then through `fleetcast serve` at the
#                                default per-machine budget (SCALE_DOWNLOAD_RUNS=3 raw/fleetcast
#                                pairs, each with its own `serve`; the median ratio is reported)
#   scripts/bench.sh scale       fleets of SCALE_SIZES machines (default 100,1000; 10,000 is opt-in:
#                                SCALE_SIZES=100,1000,10000): onboarding, 1 MiB rollout vs raw
#                                fan-out (and vs a fan-out whose subscribers hash and store what
#                                they receive), notice latency, egress, memory, CPU of the server
#                                side and of the receivers, ten rollouts at 1,000; writes
#                                docs/scale.svg. From 10,000 machines on the simulated machines
#                                keep their data on the platform's disk, which then measures that
#                                disk as much as the server (10,000: 91 s against 34 s in tmpfs,
#                                same hour); SCALE_SIM_DIR=/dev/shm when it has room for N x 1 MiB
#                                and the simulator's ~0.5 MB per machine besides
#   scripts/bench.sh soak        memory over many rollouts beyond item 3's 1,000 machines:
#                                SOAK_ROLLOUTS (default 10) rollouts in a row of a SOAK_KIB
#                                (default 64) KiB artifact to SOAK_SIZES (default 10000)
#                                machines, `serve`'s RSS after each (a small artifact, since
#                                each simulated machine keeps two slots and a staging file of
#                                it; their data in /dev/shm when it has room)
#   scripts/bench.sh ingest      status events/s acknowledged by the platform vs raw sled
#                                (INGEST_MACHINES=2000 INGEST_EVENTS=25, one event in flight each)
#   scripts/bench.sh mosquitto   a rollout to MOSQ_SIZES (default 1000) machines and a BENCH_MB
#                                (default 200) download (pairs as above), on Mosquitto as the
#                                external broker
#   scripts/bench.sh footprint   the agent process (`fleetcast-device run`): RSS idle and while
#                                downloading FOOTPRINT_SIZES MB (default 50,200), CPU time per MB,
#                                vs a raw rumqttc subscriber process receiving the same bytes
#   scripts/bench.sh all         download (200 MB), scale, ingest, mosquitto, footprint
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-download}
export CARGO_INCREMENTAL=0
# A record is of the commit built here, never of another build (benches/common: fleetcast_bin).
unset BENCH_BIN_DIR
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT

# The commit measured; "-dirty" when the code differs from it (docs/ is not counted: the
# benches write there).
commit_id() {
    local c
    c=$(git rev-parse --short=7 HEAD 2>/dev/null) || { echo unknown; return; }
    git diff --quiet HEAD -- . ':(exclude)docs' 2>/dev/null || c="$c-dirty"
    echo "$c"
}

heading() {
    echo
    echo "### $(date -u '+%Y-%m-%d %H:%M UTC') — $1, $(nproc) cores, $(uname -m), commit $(commit_id)"
    echo
}

# Open files: with the embedded broker `serve` holds one descriptor per machine (measured:
# 10,023 with 10,000 machines online; the gateway reaches rumqttd in process), the bench process
# one per raw subscriber, the simulator one per machine; an external broker needs more. serve
# and simulate raise their soft limit to the hard one; this raises the hard limit (root with
# CAP_SYS_RESOURCE only: not in every container) for everything started here.
raise_open_files() {
    local want=$1 hard
    hard=$(ulimit -Hn)
    if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ]; then
        if ulimit -Hn "$want" 2>/dev/null; then
            echo "open-file hard limit raised from $hard to $want"
        else
            echo "WARNING: cannot raise the open-file hard limit from $hard to $want (not root?);" \
                "large fleets may fail with 'too many open files'" >&2
        fi
    fi
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
}

build_device() {
    # The fleet benches start `fleetcast-device simulate`, found next to the `fleetcast` binary.
    # Both packages together: built alone, fleetcast-device unifies features differently and
    # recompiles.
    cargo build --locked -q --release -p fleetcast-platform -p fleetcast-device
}

# Runs one bench with the given environment; prints its output; appends what follows its
# `--- results ---` line to docs/benchmarks.md under a heading titled $1.
run_recorded() {
    local title=$1 bench=$2
    shift 2
    if ! env "$@" cargo bench --locked -q -p fleetcast-platform --bench "$bench" >"$OUT"; then
        cat "$OUT"
        echo "benchmark $bench failed" >&2
        return 1
    fi
    local body
    body=$(sed -n '/^--- results ---$/,$p' "$OUT" | tail -n +2)
    echo "$body"
    [ -n "$body" ] || { echo "benchmark $bench printed no results" >&2; return 1; }
    if grep -q '^Skipped' <<<"$body"; then
        echo "(not recorded)"
        return 0
    fi
    { heading "$title"; echo "$body"; } >>docs/benchmarks.md
    echo "recorded in docs/benchmarks.md"
}

download() {
    if ! cargo bench --locked -q -p fleetcast-platform --bench download >"$OUT"; then
        cat "$OUT"
        echo "benchmark failed" >&2
        exit 1
    fi
    cat "$OUT"
    ROWS=$(grep '^| ' "$OUT" || true)
    [ -n "$ROWS" ] || { echo "benchmark printed no results" >&2; exit 1; }
    {
        heading "download, ${BENCH_MB:-50} MB (in process, plain rumqttd without the gateway, budget lifted)"
        echo "| what | size | time | throughput | ratio to raw |"
        echo "|---|---|---|---|---|"
        echo "$ROWS"
    } >>docs/benchmarks.md
    echo "recorded in docs/benchmarks.md"
    # The deployment: `fleetcast serve` (embedded broker behind the gateway) and a simulated
    # machine, each its own process, at the default per-machine budget (a machine's first copy
    # of each chunk goes at once; `SCALE_MACHINE_RATE` sets `--machine-rate`).
    build_device
    run_recorded "download through fleetcast serve, ${BENCH_MB:-50} MB" scale \
        SCALE_DOWNLOAD_MB="${BENCH_MB:-50}"
}

largest() { tr ',' '\n' <<<"$1" | tr -d ' _' | sort -n | tail -1; }

scale() {
    local sizes=${SCALE_SIZES:-100,1000}
    raise_open_files $(($(largest "$sizes") * 4 + 4096))
    build_device
    run_recorded "fleet scale (issue 6), embedded broker, sizes $sizes" scale \
        SCALE_SIZES="$sizes" SCALE_SVG="$PWD/docs/scale.svg"
    echo "plot: docs/scale.svg"
}

soak() {
    local sizes=${SOAK_SIZES:-10000} kib=${SOAK_KIB:-64} rollouts=${SOAK_ROLLOUTS:-10}
    local sim_dir=${SCALE_SIM_DIR:-}
    # Two slots and a staging file per machine, and the simulator's ~0.5 MB each.
    local need_kb=$(($(largest "$sizes") * (3 * kib + 512)))
    if [ -z "$sim_dir" ] && [ -d /dev/shm ] &&
        [ "$(df -Pk /dev/shm | awk 'NR == 2 { print $4 }')" -gt "$need_kb" ]; then
        sim_dir=/dev/shm
    fi
    raise_open_files $(($(largest "$sizes") * 4 + 4096))
    build_device
    run_recorded "rollouts in a row (issue 6), embedded broker, sizes $sizes, $rollouts x $kib KiB" \
        scale SCALE_SIZES="$sizes" SCALE_ROLLOUTS="$rollouts" SCALE_ARTIFACT_KIB="$kib" \
        ${sim_dir:+SCALE_SIM_DIR="$sim_dir"}
}

ingest() {
    raise_open_files 4096
    run_recorded "status ingestion (issue 6)" ingest
}

mosquitto() {
    if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ] && [ ! -x /usr/local/sbin/mosquitto ]; then
        echo "mosquitto is not installed (apt-get install mosquitto): skipping the Mosquitto benchmarks"
        return 0
    fi
    local sizes=${MOSQ_SIZES:-1000}
    raise_open_files $(($(largest "$sizes") * 4 + 4096))
    build_device
    run_recorded "fleet rollout on Mosquitto (issue 6), sizes $sizes" scale \
        SCALE_BROKER=mosquitto SCALE_SIZES="$sizes" SCALE_ROLLOUTS=1
    run_recorded "download on Mosquitto, ${BENCH_MB:-200} MB" scale \
        SCALE_BROKER=mosquitto SCALE_DOWNLOAD_MB="${BENCH_MB:-200}"
}

footprint() {
    local sizes=${FOOTPRINT_SIZES:-50,200}
    build_device
    run_recorded "agent footprint (issue 8), downloads of $sizes MB" footprint \
        FOOTPRINT_SIZES="$sizes"
}

case "$MODE" in
    download) download ;;
    scale) scale ;;
    soak) soak ;;
    ingest) ingest ;;
    mosquitto) mosquitto ;;
    footprint) footprint ;;
    all)
        export BENCH_MB=${BENCH_MB:-200}
        download
        scale
        ingest
        mosquitto
        footprint
        ;;
    *)
        echo "usage: scripts/bench.sh [download|scale|soak|ingest|mosquitto|footprint|all]" >&2
        exit 2
        ;;
esac
