#!/bin/bash
# Runs every benchmark, one after the other, then writes bench/RESULTS.md and its plots.
# Never in tests or CI. Each benchmark removes its containers (label ssh-proxy-bench=1) at exit.
#   bench/run.sh [NAME ...]     NAME: keys_scale overhead burst watcher_cost propagation cold_start
# (with NAMEs, only those run again; RESULTS.md keeps the last results of the others)
# Python: $BENCH_PYTHON, else .venv/bin/python (the project's requirements; matplotlib from
# bench/requirements.txt is installed into it when missing).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${BENCH_PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ]; then
    echo "bench/run.sh: $PY not found: make the venv first (tests/run.sh does, or python3 -m venv .venv && .venv/bin/pip install -r requirements-dev.txt)" >&2
    exit 2
fi
"$PY" -c 'import matplotlib' 2>/dev/null || "$PY" -m pip install -q -r bench/requirements.txt || exit 2
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(keys_scale overhead burst watcher_cost propagation cold_start)
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
