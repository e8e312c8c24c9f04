#!/bin/sh
# Run every native fuzz harness: sh native/fuzz/run.sh BUILD_DIR SECONDS [HARNESS...]
# SECONDS in all, split evenly between the harnesses; seeds from spec/vectors
# (native/fuzz/seeds.py); new corpus entries kept in BUILD_DIR/corpus/; findings written
# to ARTIFACTS (default native/fuzz/crashes/). Exit 1 when any harness found something.
set -u
build=$1
seconds=$2
shift 2
here=$(cd "$(dirname "$0")" && pwd)
artifacts=${ARTIFACTS:-$here/crashes}
harnesses=${*:-check apply journal json feed}
n=$(echo $harnesses | wc -w)
each=$((seconds / n))
[ "$each" -ge 1 ] || each=1
py=python3
[ -x "$here/../../.venv/bin/python" ] && py="$here/../../.venv/bin/python"
"$py" "$here/seeds.py" "$build/seeds" || exit 2
mkdir -p "$artifacts" "$build/logs"
status=0
for h in $harnesses; do
    mkdir -p "$build/corpus/$h"
    log="$build/logs/$h.log"
    "$build/fuzz_$h" -max_total_time="$each" -timeout=20 -rss_limit_mb=2048 -max_len=65536 \
        -artifact_prefix="$artifacts/$h-" -print_final_stats=1 \
        "$build/corpus/$h" "$build/seeds/$h" >"$log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
    if [ "$rc" -ne 0 ]; then
        status=1
        echo "fuzz_$h: FINDING after ${execs:-?} executions ($cov); log $log:"
        grep -E 'ERROR:|runtime error|^fuzz:|Test unit written|SUMMARY' "$log" | head -20
    else
        echo "fuzz_$h: ${execs:-?} executions in ${each}s, $cov, no finding"
    fi
done
exit $status
