"""An output's ids keep their logical type from night to night: a manifest whose id column turned
from strings to integers (or back, or to floats) is refused before anything is written, naming the
column and both types. Widths may change (string/large_string, int32/int64): see test_nightly.py."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from .runs import run_job, snapshot


def parquet(path, ids, clips, id_type=None) -> str:
    pq.write_table(pa.table({"id": pa.array(ids, type=id_type), "path": [str(c) for c in clips[: len(ids)]]}), path)
    return str(path)


@pytest.mark.parametrize("first, second, kinds", [
    ("csv", "int", ("string (large_string)", "integer (int64)")),  # "001" in a CSV, then 1 as an integer: one id by a cast
    ("int", "string", ("integer (int64)", "string (large_string)")),
    ("int", "float", ("integer (int64)", "floating point (double)")),
    ("string", "int", ("string (large_string)", "integer (int64)")),
])
def test_an_id_column_that_changed_type_is_refused_with_nothing_written(first, second, kinds, clips, model, tmp_path):
    out = tmp_path / "out"
    if first == "csv":
        night1 = tmp_path / "night1.csv"
        night1.write_text("id,path\n" + "".join(f"00{i},{clips[i]}\n" for i in range(3)))
    else:
        night1 = parquet(tmp_path / "night1.parquet", [1, 2, 3] if first == "int" else ["a", "b", "c"], clips)
    code, log = run_job(night1, out, model, "--id-column", "id")
    assert code == 0, log
    values = {"int": [1, 2, 3, 4], "string": ["1", "2", "3", "4"], "float": [1.0, 2.0, 3.0, 4.0]}[second]
    night2 = parquet(tmp_path / "night2.parquet", values, clips)
    before = snapshot(out)
    code, log = run_job(night2, out, model, "--id-column", "id")
    assert code == 2, log
    assert f"its ids are {kinds[0]}, and the id column 'id' of {night2} is {kinds[1]}" in log, log
    assert snapshot(out) == before
