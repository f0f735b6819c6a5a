#!/usr/bin/env bash
# Issue 3's benchmark on a GPU machine, in one command: bash bench/device.sh [run.py options]
# The machine has no network: polars, soundfile, soxr (and cffi) come from the wheels in .whl/.
# Everything is logged to $OUT/bench.log and latest.json + RESULTS.md are copied to $OUT when
# OUT is set (the device runner brings back what is under $OUT).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
log_dir=${OUT:-bench/results}
mkdir -p "$log_dir" bench/results
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 | tee "$log_dir/bench.log"
python3 bench/run.py --out bench/results "$@" 2>&1 | tee -a "$log_dir/bench.log"
status=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then
    cp bench/results/latest.json bench/results/extract_summary.json bench/RESULTS.md "$OUT/" 2>/dev/null || true
fi
exit "$status"
