"""Where the seconds before the first batch go: the job's start-up steps, after launch, per run.

    python bench/timeline.py --runs 3                         # this tree, one GPU
    python bench/timeline.py --runs 3 --tree old=/path/to/other/tree --devices all

Builds (or reuses, under --work-dir) the bench's full-size checkpoint and LoRA and a small 16 kHz
FLAC corpus, then runs `python -m jobs.extract` with --log-level DEBUG on a fresh output, `--runs`
times per tree, the trees alternating. Every other run starts with the tower's pages dropped from
the page cache (posix_fadvise DONTNEED: a cold cache, as a job's first run on a host sees it).
Each step's time after launch comes from the log lines' clocks, anchored by "first batch on the
device X s after launch". Prints one JSON object; --out writes it too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]

STEPS = {  # log line → step name (the first match per run)
    "configuration, manifest and output checked": "checked",
    "rows to embed": "planned",
    "read ahead in": "tower read ahead",
    "torch imported": "torch imported",
    "model: tower tensors read": "tensors read",
    "warmed up": "device warmed up (ahead)",
    "model: moved to": "moved to device",
    "model: LoRA merged": "LoRA merged",
    "model loaded in": "model loaded",
    "first batch on the device": "first batch",
    "done:": "summary",
}
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
FIRST = re.compile(r"first batch on the device ([\d.]+) s after launch")


def timeline(log: str) -> dict[str, float]:
    """Step → seconds after launch, from one run's log."""
    stamped = []
    anchor = None
    for line in log.splitlines():
        m = STAMP.match(line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        stamped.append((t, line))
        f = FIRST.search(line)
        if f and anchor is None:
            anchor = t - float(f.group(1))
    if anchor is None:
        return {}
    steps: dict[str, float] = {}
    for t, line in stamped:
        for needle, name in STEPS.items():
            if needle in line and name not in steps:
                steps[name] = round(t - anchor, 3)
    return steps


def drop_cache(model_dir: Path) -> None:
    for f in model_dir.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tree", action="append", default=[], help="NAME=DIR: another code tree to time (alternating)")
    ap.add_argument("--devices", default=None, help="pass --devices to the job (e.g. all)")
    ap.add_argument("--clips", type=int, default=400)
    ap.add_argument("--tiny", action="store_true", help="the tiny tower (a smoke test of this script on CPU)")
    ap.add_argument("--work-dir", default="/tmp/qwen2-audio-bench")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import synth_corpus
    import synth_model

    work = Path(args.work_dir)
    t = time.monotonic()
    device = "cuda" if _has_cuda() else "cpu"
    mode, audio = ("tiny", synth_model.TINY_AUDIO) if args.tiny else ("full", synth_model.FULL_AUDIO)
    ckpt = synth_model.build_checkpoint(work / f"model-{mode}", audio, seed=0, device=device)
    adapter = synth_model.build_adapter(work / f"adapter-{mode}", Path(ckpt["path"]), audio)
    (corpus,) = synth_corpus.build_corpora([(work / f"timeline-flac16k-{args.clips}", synth_corpus.CorpusSpec(args.clips, 7, 2.0, 20.0))])
    print(f"[timeline] checkpoint and corpus in {time.monotonic() - t:.1f} s", flush=True)

    trees = {"this": REPO, **{n: Path(d).resolve() for n, d in (s.split("=", 1) for s in args.tree)}}
    runs = []
    for i in range(args.runs):
        for name, tree in trees.items():
            cold = i % 2 == 0
            if cold:
                drop_cache(Path(ckpt["path"]))
            out = work / f"timeline-out-{name}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            cmd = [sys.executable, "-m", "jobs.extract", "--manifest", corpus["manifest"], "--id-column", "id", "--output", str(out),
                   "--model", ckpt["path"], "--adapter", adapter["path"], "--log-level", "DEBUG",
                   *(["--devices", args.devices] if args.devices else [])]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p))
            t = time.monotonic()
            proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
            wall = time.monotonic() - t
            steps = timeline(proc.stderr + proc.stdout)
            runs.append({"tree": name, "run": i, "cold_cache": cold, "exit_code": proc.returncode, "wall_s": round(wall, 2), "steps": steps})
            print(f"[timeline] {name} run {i} ({'cold' if cold else 'warm'} cache): exit {proc.returncode}, {wall:.1f} s, {steps}", flush=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], flush=True)
    result = {"devices": args.devices, "clips": args.clips, "runs": runs}
    print(json.dumps(result), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    raise SystemExit(main())
