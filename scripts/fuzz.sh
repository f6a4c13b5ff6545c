#!/usr/bin/env bash
# Fuzz stateshift's parsers of outside input, one target after the other (the machine is
# shared: never in parallel). Usage: scripts/fuzz.sh [RUNS] [TARGET...]
#   RUNS     executions per target (default 10000000)
#   TARGET   lineproto spool zabbix heat (default: all four)
# Env: FUZZ_TIMEOUT (seconds per input, default 10), FUZZ_MAX_LEN (bytes, default 4096),
#      FUZZ_SANITIZER (none or address; default none: the code under test is safe Rust,
#      panics, integer overflow (debug assertions are on), timeouts and memory blow-ups
#      are caught without ASan, and ASan halves the speed), CARGO_TARGET_DIR (as usual).
# Needs the nightly toolchain; installs cargo-fuzz if it is missing. Prints, per target:
# executions, seconds, exec/s and the crashes found (artifacts under fuzz/artifacts/).
# Exits non-zero if any target crashed.
set -euo pipefail

RUNS=${1:-10000000}
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(lineproto spool zabbix heat)
TIMEOUT=${FUZZ_TIMEOUT:-10}
MAX_LEN=${FUZZ_MAX_LEN:-4096}
SANITIZER=${FUZZ_SANITIZER:-none}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz missing: installing it" >&2
    cargo install cargo-fuzz --locked
fi
rustup toolchain list | grep -q '^nightly' || {
    echo "the nightly toolchain is missing: rustup toolchain install nightly" >&2
    exit 2
}

dict_of() {
    case "$1" in
        lineproto) echo "$ROOT/fuzz/dicts/lineproto.dict" ;;
        zabbix | heat) echo "$ROOT/fuzz/dicts/json.dict" ;;
        *) echo "" ;;
    esac
}

# -O: release; -a: debug assertions on (integer overflow panics, as in tests).
LOGS="$ROOT/fuzz/logs"
mkdir -p "$LOGS"
if ! cargo +nightly fuzz build -O -a --sanitizer "$SANITIZER" >"$LOGS/build.log" 2>&1; then
    tail -30 "$LOGS/build.log" >&2
    exit 2
fi
printf '%s\n' "fuzz: $RUNS runs per target, timeout ${TIMEOUT}s per input, max_len $MAX_LEN, sanitizer $SANITIZER"
printf '%s\n' "rustc: $(rustc +nightly --version)"
printf '%-10s %12s %9s %10s %8s\n' target executions seconds exec/s crashes
failed=0
for t in "${TARGETS[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    before=$(find "fuzz/artifacts/$t" -type f | wc -l)
    dict=$(dict_of "$t")
    args=(-runs="$RUNS" -timeout="$TIMEOUT" -max_len="$MAX_LEN" -print_final_stats=1)
    [ -n "$dict" ] && args+=(-dict="$dict")
    start=$(date +%s.%N)
    set +e
    cargo +nightly fuzz run -O -a --sanitizer "$SANITIZER" "$t" \
        "fuzz/corpus/$t" "fuzz/seeds/$t" -- "${args[@]}" >"$LOGS/$t.log" 2>&1
    rc=$?
    set -e
    end=$(date +%s.%N)
    after=$(find "fuzz/artifacts/$t" -type f | wc -l)
    crashes=$((after - before))
    [ $rc -ne 0 ] && [ $crashes -eq 0 ] && crashes="rc=$rc"
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$LOGS/$t.log" | tail -1)
    secs=$(echo "$end - $start" | bc)
    rate=$(echo "scale=0; ${execs:-0} / $secs" | bc)
    printf '%-10s %12s %9.1f %10s %8s\n' "$t" "${execs:-?}" "$secs" "$rate" "$crashes"
    if [ $rc -ne 0 ]; then
        failed=1
        echo "  $t: see $LOGS/$t.log and fuzz/artifacts/$t/" >&2
        grep -m5 -E 'panicked|ERROR: libFuzzer|SUMMARY' "$LOGS/$t.log" | sed 's/^/  /' >&2 || true
    fi
done
exit $failed
