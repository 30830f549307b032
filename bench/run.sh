#!/bin/bash
# Runs every benchmark, one after the other, then writes bench/RESULTS.md and its plots.
# Never in tests or CI. Every container/network/volume a benchmark starts carries the label
# ssh-proxy-bench=1 (bench/common.py); this script removes all of them at start and at exit,
# also when interrupted, so nothing is left behind. The tests use ssh-proxy-test=1: neither
# removes the other's.
#   bench/run.sh [NAME ...]     NAME: keys_scale overhead burst watcher_cost propagation cold_start shutdown
# (with NAMEs, only those run again; RESULTS.md keeps the last results of the others, each
# section with its own date and commit)
# Python: $BENCH_PYTHON, else .venv/bin/python (the project's requirements; matplotlib from
# bench/requirements.txt is installed into it when missing).
set -uo pipefail
cd "$(dirname "$0")/.."
BENCH_LABEL="ssh-proxy-bench=1"
PY=${BENCH_PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ]; then
    echo "bench/run.sh: $PY not found: make the venv first (tests/run.sh does, or python3 -m venv .venv && .venv/bin/pip install -r requirements-dev.txt)" >&2
    exit 2
fi

cleanup() {
    local ids
    ids="$(docker ps -aq --filter "label=$BENCH_LABEL" 2>/dev/null || true)"
    [ -z "$ids" ] || docker rm -f -v $ids >/dev/null 2>&1 || true
    ids="$(docker network ls -q --filter "label=$BENCH_LABEL" 2>/dev/null || true)"
    [ -z "$ids" ] || docker network rm $ids >/dev/null 2>&1 || true
    ids="$(docker volume ls -q --filter "label=$BENCH_LABEL" 2>/dev/null || true)"
    [ -z "$ids" ] || docker volume rm -f $ids >/dev/null 2>&1 || true
}
cleanup
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$PY" -c 'import matplotlib' 2>/dev/null || "$PY" -m pip install -q -r bench/requirements.txt || exit 2
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(keys_scale overhead burst watcher_cost propagation cold_start shutdown)
failed=()
for name in "${names[@]}"; do
    rm -f "bench/results/$name.md" "bench/results/$name.json"  # the others' stay for the report
    echo "=== $name ($(date -u +%H:%M:%S))" >&2
    if ! timeout 600 "$PY" "bench/$name.py"; then
        echo "bench/run.sh: $name failed" >&2
        failed+=("$name")
    fi
done
"$PY" bench/report.py --failed "${failed[@]}"
[ ${#failed[@]} -eq 0 ]
