"""bench/shapes.py: the figures it derives, the files it writes, the memory it samples, and one
nightly sequence through the real CLI on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import run
import shapes
import synth_corpus
import synth_model

SUMMARY = {  # the fields of extractor.summary.Summary.to_json that the figures use
    "audio_seconds": 7200.0, "wall_seconds": 4.0, "steady_audio_seconds": 6000.0, "steady_wall_seconds": 2.5,
    "steady_useful_flops": 1.0e15, "device_idle_fraction": 0.01, "time_to_first_batch_s": 1.2, "tail_s": 0.3,
    "host_rss_gb_samples": [2.0, 2.5], "host_rss_gb_first_batch": 1.9, "host_rss_gb_end": 2.4,
}


def test_shape_figures_follow_the_summary():
    job = shapes.JobRun(0, 4.5, SUMMARY, {"tree_pss_gb_max": 5.5, "tree_rss_gb_max": 9.0})
    f = shapes.shape_figures(job, peak_tflops=800.0)
    assert f == {
        "audio_hours": 2.0, "mfu": pytest.approx(1e15 / 2.5 / 800e12), "device_idle_fraction": 0.01,
        "steady_audio_seconds_per_second": 2400.0, "audio_seconds_per_second": 1800.0,
        "time_to_first_batch_s": 1.2, "tail_s": 0.3, "host_rss_gb_max": 5.5,
    }
    # Without our own samples (a kernel with neither smaps_rollup nor the process), the job's own.
    assert shapes.shape_figures(shapes.JobRun(0, 4.5, SUMMARY, {}), 800.0)["host_rss_gb_max"] == 2.5


def test_shapes_json_has_issue_10s_keys_and_no_others():
    figures = shapes.shape_figures(shapes.JobRun(0, 4.5, SUMMARY, {}), 800.0)
    detail = {"device": "H100", "git_commit": "abc", "peak_bf16_tflops": 800.0, "extra": 1,
              "shapes": {"mp3_48k_2_10s": {"figures": figures, "summary": SUMMARY}, "wav16k_0p4_2s": {"error": "boom"}},
              "nightly": {"figures": {"incremental_1pct_wall_s": 5.0, "noop_wall_s": 2.0, "noop_exit_code": 0}, "runs": {}}}
    out = shapes.results_json(detail)
    assert list(out) == ["device", "git_commit", "peak_bf16_tflops", "shapes", "nightly", "multi_gpu"]
    assert list(out["shapes"]) == ["mp3_48k_2_10s"]  # a shape that failed has no figures to give
    assert set(out["shapes"]["mp3_48k_2_10s"]) == {"audio_hours", "mfu", "device_idle_fraction", "steady_audio_seconds_per_second",
                                                  "audio_seconds_per_second", "time_to_first_batch_s", "tail_s", "host_rss_gb_max"}
    assert out["nightly"] == {"incremental_1pct_wall_s": 5.0, "noop_wall_s": 2.0, "noop_exit_code": 0}
    assert out["multi_gpu"] is None


def test_a_devices_call_merges_into_the_shapes_call(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    figures = shapes.shape_figures(shapes.JobRun(0, 4.5, SUMMARY, {}), 800.0)
    earlier = {"date": "2026-01-01T00:00:00+00:00", "git_commit": "aaa", "device": "NVIDIA H100", "mode": "full",
               "peak_bf16_tflops": 790.0, "shapes": {"flac16k_2_20s": {"figures": figures, "checks": {"ok": True}}},
               "nightly": {"figures": {"incremental_1pct_wall_s": 5.0, "noop_wall_s": 2.0, "noop_exit_code": 0}}}
    shapes.save(earlier, tmp_path)
    now = {"date": "2026-01-02T00:00:00+00:00", "git_commit": "bbb", "device": "NVIDIA H200", "mode": "full --devices all",
           "host": {"cpus": 32}, "phases_s": {}, "shapes": {}, "errors": []}
    shapes.merge_previous(now, tmp_path)
    now["multi_gpu"] = {"figures": {"gpus": 2, "e2e_scaling": 1.9, "steady_scaling": 1.97}, "checks": {"ok": True}}
    shapes.save(now, tmp_path)
    out = json.loads((tmp_path / shapes.SHAPES_JSON).read_text())
    assert out["device"] == "NVIDIA H100" and out["git_commit"] == "aaa" and out["peak_bf16_tflops"] == 790.0
    assert out["shapes"]["flac16k_2_20s"] == figures and out["nightly"]["noop_exit_code"] == 0
    assert out["multi_gpu"] == {"gpus": 2, "e2e_scaling": 1.9, "steady_scaling": 1.97}


def test_results_md_blocks_go_last_and_issue_3_rows_stay_in_their_table(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text(run.RESULTS_HEADER + "| old row |\n\nNotes on the runs above.\n")
    detail = {"date": "2026-01-02T03:04:05+00:00", "git_commit": "abc", "device": "NVIDIA H100 80GB HBM3", "mode": "full",
              "host": {"cpus": 16}, "phases_s": {"corpora": 80.0}, "total_wall_s": 400.0, "peak_bf16_tflops": 790.0,
              "naive_bf16_audio_seconds_per_second": 1093.0,
              "shapes": {"wav16k_0p4_2s": {"figures": shapes.shape_figures(shapes.JobRun(0, 4.5, SUMMARY, {}), 790.0), "checks": {"ok": True}}},
              "nightly": {"base_rows": 12000, "new_rows": 120, "full_wall_s": 28.0, "checks": {"ok": True},
                          "figures": {"incremental_1pct_wall_s": 5.5, "noop_wall_s": 1.5, "noop_exit_code": 0}}}
    shapes.append_results(detail, md)
    shapes.append_results(detail, md)
    run.add_row(md, "| new issue-3 row |")
    text = md.read_text()
    assert text.count("## Corpus shapes (issue 10)") == 1 and text.count("### 2026-01-02 03:04 UTC, abc, NVIDIA H100 80GB HBM3") == 2
    assert "| wav16k_0p4_2s | 2.0 |" in text and "Nightly: 120 new rows into a finished 12,000-row output 5.5 s" in text
    assert text.index("| old row |\n| new issue-3 row |") < text.index("Notes on the runs above.") < text.index("## Corpus shapes")


def test_tree_memory_counts_every_descendant(tmp_path):
    """A parent holding ~60 MB that starts a child holding ~40 MB and burning half a second of CPU:
    both are found and counted; once the child has exited (the test releases it), its CPU stays
    in the tree's sum, as a decode worker's does when decoding ends before the device's last batch."""
    release = tmp_path / "release"
    child = ("import os, time; x = bytearray(40 << 20); x[::4096] = b'x' * len(x[::4096]); t = time.process_time()\n"
             "while time.process_time() - t < 0.5: pass\n"
             f"while not os.path.exists({str(release)!r}): time.sleep(0.02)")
    parent = (f"import subprocess, sys, time; x = bytearray(60 << 20); x[::4096] = b'x' * len(x[::4096]); "
              f"p = subprocess.Popen([sys.executable, '-c', {child!r}]); p.wait(); time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", parent])
    memory = shapes.TreeMemory(proc.pid)

    def sample_until(done) -> tuple:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            memory.sample()
            if memory.samples and done(memory.samples[-1]):
                return memory.samples[-1]
            time.sleep(0.05)
        raise AssertionError(f"not reached: {memory.samples[-1:]}")

    try:
        t, main, tree_rss, tree_pss, processes, main_cpu, tree_cpu = sample_until(
            lambda x: x[4] >= 2 and x[2] > 0.1 and x[6] - x[5] >= 0.45)
        assert processes == 2
        assert main > 0.06 and tree_rss > main + 0.04
        assert tree_pss is None or 0.1 < tree_pss <= tree_rss
        release.touch()  # the child exits, and the parent reaps it: it is gone from /proc
        after = sample_until(lambda x: x[4] == 1)
        assert after[6] - after[5] >= tree_cpu - main_cpu >= 0.45  # its CPU is still the tree's
    finally:
        for pid in shapes.process_tree(proc.pid)[::-1]:
            subprocess.run(["kill", "-9", str(pid)], check=False)
        proc.wait()
    n = len(memory.samples)
    memory.sample()  # the process is gone: no sample, no error
    assert len(memory.samples) == n and memory.figures()["processes_max"] == 2


def test_nightly_through_the_cli(tmp_path):
    """A finished output, 1 % new rows, then nothing to do: the real CLI on a tiny model (CPU)."""
    ckpt = synth_model.build_checkpoint(tmp_path / "model", synth_model.TINY_AUDIO, max_shard_bytes=1 << 18)
    adapter = synth_model.build_adapter(tmp_path / "adapter", Path(ckpt["path"]), synth_model.TINY_AUDIO)
    corpus = synth_corpus.build_corpora([(tmp_path / "corpus", synth_corpus.CorpusSpec(6, 0, 0.5, 2.0))], workers=1)[0]
    runner = shapes.Runner(ckpt["path"], adapter["path"], ["--device", "cpu"], time.monotonic() + 600, tmp_path / "summaries")
    runner.logs.mkdir()
    detail: dict = {}
    shapes.run_nightly(corpus, runner, detail, tmp_path, base=5, new=1)
    rec = detail["nightly"]
    assert "error" not in rec, rec.get("error")
    assert rec["checks"]["ok"], rec["checks"]
    assert rec["checks"]["incremental_embedded"] == 1 and rec["checks"]["incremental_skipped"] == 5
    assert rec["figures"]["noop_exit_code"] == 0
    assert 0 < rec["figures"]["noop_wall_s"] < rec["full_wall_s"]
    assert rec["runs"]["full"]["memory"]["samples"] >= 1  # sampled while the job ran


def test_steady_cores_are_the_cpu_clocks_over_the_steady_phase():
    # t, main RSS, tree RSS, tree PSS, processes, main CPU s, tree CPU s: the main process burns
    # half a core and the workers 12 cores from t=4 (the first batch) to t=14.
    series = [[t, 1.0, 2.0, None, 17, 3.0 + 0.5 * max(0, t - 4), 3.5 + 12.5 * max(0, t - 4)] for t in range(0, 16)]
    series[0][6] = 0.0  # before the first batch: a start-up that must not count
    cores = shapes.steady_cores({"series": series}, {"time_to_first_batch_s": 4.0, "steady_wall_seconds": 10.0})
    assert cores["span_s"] == 10 and cores["main_cores"] == pytest.approx(0.5) and cores["worker_cores"] == pytest.approx(12.0)
    assert shapes.steady_cores({"series": series[:5]}, {"time_to_first_batch_s": 4.0, "steady_wall_seconds": 10.0}) is None
    assert shapes.steady_cores({"series": series}, {}) is None
