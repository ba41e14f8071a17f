#!/usr/bin/env bash
# Fuzzes every decoder with libFuzzer on the stable toolchain, each for a bounded time.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default 60 s, every target)
#
# Coverage comes from LLVM's SanitizerCoverage, switched on with stable `-C` flags only (no
# nightly, no RUSTC_BOOTSTRAP, no cargo-fuzz); libFuzzer itself is built from the
# libfuzzer-sys crate. Each target starts from its committed corpus fuzz/corpus/<target> plus
# a working corpus in target/fuzz/corpus/<target>; afterwards the inputs that reach new edges
# are added to fuzz/corpus/<target>, ready to commit (FUZZ_MERGE=0 skips this;
# FUZZ_MERGE=minimize re-minimises the committed corpus instead).
# Crash inputs land in target/fuzz/artifacts/<target>/. Exits non-zero if any target found
# a crash, a timeout (> 10 s for one input) or ran out of memory (> 2 GiB).
# How it works and how to add a target: docs/fuzzing.md.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${1:-60}
shift || true
if ! [[ "$SECS" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]" >&2
    exit 2
fi

# libFuzzer is C++, compiled by the cc crate.
if ! command -v c++ >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
    echo "installing g++ (libFuzzer is C++)..." >&2
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++ >/dev/null
fi

TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
# --target keeps these flags off build scripts and proc macros. Debug assertions and overflow
# checks stay on, so an arithmetic overflow is a crash here even though release wraps.
export RUSTFLAGS="-Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
-Cdebug-assertions -Coverflow-checks -Cforce-frame-pointers"
echo "building the fuzz binary (instrumented, release)..." >&2
cargo build --quiet --locked --release -p fleetcast-fuzz --features libfuzzer --bin fuzz \
    --target "$TRIPLE" --target-dir target/fuzz
BIN="target/fuzz/$TRIPLE/release/fuzz"

mapfile -t ALL < <(FLEETCAST_FUZZ_TARGET=list "$BIN" 2>/dev/null)
if [ $# -gt 0 ]; then
    for t in "$@"; do
        printf '%s\n' "${ALL[@]}" | grep -qx -- "$t" || {
            echo "unknown target $t; targets: ${ALL[*]}" >&2
            exit 2
        }
    done
    TARGETS=("$@")
else
    TARGETS=("${ALL[@]}")
fi

# Adds to the committed corpus the working-corpus inputs that reach an edge it does not reach
# yet (edges only, not hit counts): it grows with coverage, not with fuzzing time, and files
# already committed stay, so git sees only what is new.
merge() {
    FLEETCAST_FUZZ_TARGET="$1" "$BIN" -merge=1 -use_counters=0 \
        "fuzz/corpus/$1" "target/fuzz/corpus/$1" >"$LOGS/$1.merge.log" 2>&1
}

# Replaces the committed corpus (seeds aside) with a small set (greedy set cover) that reaches
# every edge the committed and the working corpus reach. Renames many files: run it rarely.
minimize() {
    local t=$1 committed="fuzz/corpus/$1" fresh="target/fuzz/merged/$1"
    rm -rf "$fresh"
    mkdir -p "$fresh"
    FLEETCAST_FUZZ_TARGET="$t" "$BIN" -set_cover_merge=1 -use_counters=0 \
        "$fresh" "$committed" "target/fuzz/corpus/$t" >"$LOGS/$t.merge.log" 2>&1
    # Seeds keep their names; drop the copies the merge made under their SHA-1.
    for seed in "$committed"/seed-*; do
        rm -f "$fresh/$(sha1sum <"$seed" | cut -d' ' -f1)"
    done
    find "$committed" -type f ! -name 'seed-*' -delete
    find "$fresh" -type f -exec cp {} "$committed"/ \;
}

LOGS=target/fuzz/logs
mkdir -p "$LOGS"
failed=()
printf '%-16s %10s %8s %6s %6s %8s %8s  %s\n' target execs exec/s cov ft corpus change result
for t in "${TARGETS[@]}"; do
    work="target/fuzz/corpus/$t"
    artifacts="target/fuzz/artifacts/$t"
    committed="fuzz/corpus/$t"
    mkdir -p "$work" "$artifacts" "$committed"
    before=$(find "$committed" -type f | wc -l)
    log="$LOGS/$t.log"
    set +e
    FLEETCAST_FUZZ_TARGET="$t" "$BIN" "$work" "$committed" \
        -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -dict=fuzz/fuzz.dict \
        -artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
    execs=$(stat number_of_executed_units)
    rate=$(stat average_exec_per_sec)
    # The last status line, e.g. "#123456 DONE cov: 2345 ft: 6789 corp: 321/45Kb ...".
    last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    if [ "$rc" -eq 0 ]; then
        result=ok
        case "${FUZZ_MERGE:-add}" in
            0) ;;
            minimize) minimize "$t" ;;
            *) merge "$t" ;;
        esac
    else
        found=$(grep -oE "(crash|timeout|oom|leak|slow-unit)-[0-9a-f]+" "$log" | tail -1 || true)
        result="FAILED (exit $rc): $artifacts/${found:-?}; log $log"
        failed+=("$t")
    fi
    after=$(find "$committed" -type f | wc -l)
    printf '%-16s %10s %8s %6s %6s %8s %8s  %s\n' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" \
        "${ft:-?}" "$after" "$(printf '%+d' $((after - before)))" "$result"
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzzing found problems in: ${failed[*]}" >&2
    echo "reproduce: FLEETCAST_FUZZ_TARGET=<target> $BIN <crash file>" >&2
    exit 1
fi
