#!/usr/bin/env bash
# The GPU benchmark in one command, on a lent machine, from the repository root:
#   bash bench/device.sh [run.py options]          issue 3's: the job on 61 h of 16 kHz FLAC vs the naive recipe
#   bash bench/device.sh --shapes [--scale F]      issue 10's: four corpus shapes + nightly runs (bench/shapes.py)
#   bash bench/device.sh --shapes --devices all    issue 10's multi-GPU figures, merged into results/shapes.json
#   bash bench/device.sh --cpu-breakdown [...]     issue 10's CPU cost per audio-second by stage (bench/cpu_breakdown.py)
# The machine has no network: polars, soundfile, soxr, av, click, tqdm, cffi (and pycparser) come
# from the wheels in .whl/. Everything is logged to $OUT/bench.log and the results are copied to
# $OUT when OUT is set (the device runner brings back what is under $OUT).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
log_dir=${OUT:-bench/results}
mkdir -p "$log_dir" bench/results
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 | tee "$log_dir/bench.log"
if [ "${1:-}" = "--cpu-breakdown" ]; then
    python3 bench/cpu_breakdown.py --json bench/results/cpu_breakdown.json "${@:2}" 2>&1 | tee -a "$log_dir/bench.log"
    status=${PIPESTATUS[0]}
    results="bench/results/cpu_breakdown.json"
else
    case " $* " in
        *" --shapes "*) script=bench/shapes.py ;;
        *) script=bench/run.py ;;
    esac
    python3 "$script" --out bench/results "$@" 2>&1 | tee -a "$log_dir/bench.log"
    status=${PIPESTATUS[0]}
    case " $* " in
        *" --shapes "*) results="bench/results/shapes.json bench/results/shapes_detail.json bench/RESULTS.md" ;;
        *) results="bench/results/latest.json bench/results/extract_summary.json bench/RESULTS.md" ;;
    esac
fi
if [ -n "${OUT:-}" ]; then
    cp $results "$OUT/" 2>/dev/null || true
fi
exit "$status"
