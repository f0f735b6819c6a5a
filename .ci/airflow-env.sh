#!/usr/bin/env bash
# Airflow in a venv of its own (its pins clash with the job's), for tests/integration/test_airflow.py.
# Built at a fixed path from .ci/airflow.lock (every package pinned and hashed, so no resolver runs and
# no new release of a dependency breaks CI), and reused while the lock is unchanged.
#   bash .ci/airflow-env.sh [VENV]      (default /tmp/ci-airflow, where the test looks)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-/tmp/ci-airflow}
lock=.ci/airflow.lock
stamp=$(sha256sum "$lock" | cut -d' ' -f1)
if [[ -x $venv/bin/airflow && "$(cat "$venv/.lock-sha256" 2>/dev/null)" == "$stamp" ]]; then
    echo "airflow-env: reusing $venv"
    exit 0
fi
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --no-deps --require-hashes -r "$lock"
"$venv/bin/python" -m pip check
echo "$stamp" > "$venv/.lock-sha256"
echo "airflow-env: Airflow $("$venv/bin/airflow" version) in $venv"
