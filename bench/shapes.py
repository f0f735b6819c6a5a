"""Issue 10's benchmark: the job on the corpus shapes users run it on, nightly runs, several GPUs.

    bash bench/device.sh --shapes                   # one GPU, 16 cores: every shape + nightly (~6 min)
    bash bench/device.sh --shapes --devices all     # a 2-GPU machine: 61 h on one GPU, then on all
    python bench/shapes.py --tiny                   # CPU smoke run of every code path (tiny model)
    python bench/shapes.py --scale 0.1 --only mp3_48k_2_10s,nightly

One process tree, no network:
  1. corpora     every shape's files, each with its own generator and seed (synth_corpus), in one
                 pool over all cores; cached under --work-dir by their parameters. The checkpoint
                 and the matmul peak are done on the GPU meanwhile.
  2. checkpoint  random-weight Qwen2-Audio, full-size tower + r=16 LoRA (synth_model)
  3. peak        bf16 dense matmul peak (run.peak_matmul_tflops), the denominator of MFU
  4. naive       HF feature extractor + PeftModel over Qwen2AudioEncoder on flac16k's first clips
  5. shapes      the real CLI, default flags, on each corpus into a fresh output, its process
                 tree's memory sampled every second from /proc
  6. nightly     a finished 12,000-row output (flac16k's first rows), 1 % new rows appended to
                 the manifest and the run timed, then a rerun with nothing to do
  (--devices)    instead of 4-6: the 61 h corpus on one GPU, then with --devices; merged into an
                 existing shapes.json
Results: OUT/shapes.json (issue 10's keys, nothing else), OUT/shapes_detail.json (everything:
summaries, memory series, checks, phases), both also copied to $OUT when set and rewritten after
every phase, so a call cut off at the device's time limit still brings back what it measured;
a table appended to bench/RESULTS.md; a short table printed last.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402  (the issue-3 bench: log, peak, checks, git commit)
from synth_corpus import CorpusSpec  # noqa: E402

log = run.log


@dataclass(frozen=True)
class Shape:
    corpus: CorpusSpec  # at scale 1
    tiny_clips: int  # --tiny
    what: str


# Issue 10's corpus kinds. Seeds differ so no two corpora share a clip; flac16k is issue 3's corpus.
SHAPES = {
    "flac16k_2_20s": Shape(CorpusSpec(20_000, 0, 2.0, 20.0), 60, "16 kHz mono FLAC, 2-20 s (the bench's, 61 h)"),
    "mp3_48k_2_10s": Shape(CorpusSpec(12_000, 1, 2.0, 10.0, 48_000, 1, "mp3"), 24, "48 kHz mono MP3, 2-10 s (Common Voice-like, 20 h)"),
    "flac44k_stereo_10_14min": Shape(CorpusSpec(100, 2, 600.0, 840.0, 44_100, 2, "flac"), 1,
                                     "44.1 kHz stereo FLAC, 10-14 min (podcast-like, 20 h)"),
    "wav16k_0p4_2s": Shape(CorpusSpec(60_000, 3, 0.4, 2.0, 16_000, 1, "wav"), 80, "16 kHz mono WAV, 0.4-2 s (utterance-like, 20 h)"),
    "opus_48k_1_9s": Shape(CorpusSpec(14_400, 4, 1.0, 9.0, 48_000, 1, "opus"), 24,
                           "48 kHz mono Ogg Opus at 24 kbit/s, 1-9 s (voice-note-like, 20 h)"),
}
NIGHTLY = "nightly"
BASE_SHAPE = "flac16k_2_20s"  # the nightly output, the naive baseline and the multi-GPU figure use it
NIGHTLY_ROWS = 12_000  # rows of the finished output
NIGHTLY_TINY_ROWS = 40
NIGHTLY_NEW_FRACTION = 0.01  # rows appended for the incremental run
RSS_INTERVAL_S = 1.0
DEADLINE_S = 540.0  # the device runs a command for 10 min: stop starting runs after 9
MIN_RUN_S = 20.0  # a run is not started with less time than this left
STOP_GRACE_S = 20.0  # SIGTERM to a run past the deadline, then SIGKILL (its summary still comes)
SHAPES_JSON = "shapes.json"
DETAIL_JSON = "shapes_detail.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", action="store_true", help="(this mode; accepted so device.sh can pass its argv through)")
    p.add_argument("--tiny", action="store_true", help="tiny model and corpora on CPU: a smoke run of every code path")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every corpus's file count (and the nightly rows) by this")
    p.add_argument("--only", help=f"comma-separated: any of {', '.join(SHAPES)}, {NIGHTLY} (default: all)")
    p.add_argument("--devices", help="the multi-GPU figures only: the 61 h corpus on one device, then with --devices "
                   "(e.g. all; on CPU, --tiny maps all to cpu,cpu), merged into OUT/shapes.json")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu (default: cuda when available)")
    p.add_argument("--work-dir", default="/tmp/qwen2-audio-bench", help="checkpoint, corpora and outputs (local disk)")
    p.add_argument("--out", help="where shapes.json goes (default: bench/results; with --tiny, WORK_DIR/results-tiny)")
    p.add_argument("--results-md", help="the table is appended here (default: bench/RESULTS.md; with --tiny, OUT/RESULTS-tiny.md)")
    p.add_argument("--naive-clips", type=int, help="clips timed with the naive recipe (default 256; 8 with --tiny)")
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--no-ceiling", action="store_true", help="skip the decode ceiling (the corpus through the decode workers alone) before each shape")
    p.add_argument("--workers", type=int, help="corpus generation processes (default: every core)")
    p.add_argument("--deadline-s", type=float, default=DEADLINE_S,
                   help="no run starts, and a running one is stopped, this long after the bench started")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached checkpoint and corpora")
    args = p.parse_args(argv)
    wanted = [s.strip() for s in (args.only or ",".join([*SHAPES, NIGHTLY])).split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SHAPES and s != NIGHTLY]
    if unknown:
        p.error(f"--only: unknown {unknown}; expected names from {[*SHAPES, NIGHTLY]}")
    args.only = wanted
    if args.scale <= 0:
        p.error("--scale must be positive")
    args.out = Path(args.out or (Path(args.work_dir) / "results-tiny" if args.tiny else HERE / "results"))
    args.results_md = Path(args.results_md or (args.out / "RESULTS-tiny.md" if args.tiny else run.RESULTS_MD))
    args.naive_clips = args.naive_clips or (8 if args.tiny else 256)
    return args


def corpus_of(name: str, args) -> CorpusSpec:
    """The shape's corpus at this run's size."""
    shape = SHAPES[name]
    base = shape.tiny_clips if args.tiny else shape.corpus.clips
    clips = max(1, round(base * args.scale))
    s = shape.corpus
    return CorpusSpec(clips, s.seed, s.min_s, s.max_s, s.sample_rate, s.channels, s.container)


def nightly_rows(args) -> tuple[int, int]:
    """(rows of the finished output, rows appended)."""
    base = max(1, round((NIGHTLY_TINY_ROWS if args.tiny else NIGHTLY_ROWS) * args.scale))
    return base, max(1, round(base * NIGHTLY_NEW_FRACTION))


# ---------------------------------------------------------------------------------------------
# The job's process tree, sampled from /proc (psutil is not on the device)
# ---------------------------------------------------------------------------------------------

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # comm may hold spaces and parentheses
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (the decode workers are the fork server's children)."""
    children = _children_map()
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


def pss_bytes(pid: int) -> int | None:
    """Proportional set size: a page shared by n processes counts 1/n in each. Decode workers fork
    from a fork server that preloaded torch, so summing their RSS would count it 16 times."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a process, all its threads (clock ticks, 10 ms)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, ValueError, IndexError):
        return None


class TreeMemory(threading.Thread):
    """Samples a process tree every `interval` s: (t, main RSS, tree RSS, tree PSS, processes,
    main CPU s, tree CPU s).

    Tree PSS is None where the kernel has no smaps_rollup (gVisor); tree RSS then stands in."""

    def __init__(self, pid: int, interval: float = RSS_INTERVAL_S):
        super().__init__(name="tree-memory", daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float, float, float | None, int, float, float]] = []
        self._halt = threading.Event()
        self._t0 = time.monotonic()
        self._cpu: dict[int, float] = {}  # pid -> CPU s, last seen

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        tree = process_tree(self.pid)
        main = rss_bytes(self.pid)
        if main is None:
            return  # exited
        rss = [rss_bytes(p) for p in tree]
        pss = [pss_bytes(p) for p in tree]
        tree_rss = sum(r for r in rss if r is not None)
        tree_pss = sum(p for p in pss if p is not None) if all(p is not None for p, r in zip(pss, rss) if r is not None) else None
        # Each process's CPU as last seen: the decode workers exit when decoding ends, before the
        # device's last batches, and their CPU must not leave the tree's sum with them.
        for p in tree:
            c = cpu_seconds(p)
            if c is not None:
                self._cpu[p] = c
        self.samples.append((round(time.monotonic() - self._t0, 2), main / 1e9, tree_rss / 1e9,
                             None if tree_pss is None else tree_pss / 1e9, len(tree), self._cpu.get(self.pid, 0.0),
                             sum(self._cpu.values())))

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def figures(self) -> dict:
        s = self.samples
        pss = [x[3] for x in s if x[3] is not None]
        return {
            "samples": len(s),
            "main_rss_gb_max": max((x[1] for x in s), default=None),
            "tree_rss_gb_max": max((x[2] for x in s), default=None),
            "tree_pss_gb_max": max(pss, default=None),
            "processes_max": max((x[4] for x in s), default=None),
            # t s, main RSS GB, tree RSS GB, tree PSS GB, processes: flat over a run is the goal;
            # main and tree CPU s: where the cores went.
            "series": [[x[0], round(x[1], 3), round(x[2], 3), None if x[3] is None else round(x[3], 3), x[4], x[5], x[6]] for x in s],
        }


def steady_cores(memory: dict, summary: dict) -> dict | None:
    """Cores busy in the job's main process and in the rest of its tree (decode workers) over its
    steady phase (first batch to last), from the samples' CPU clocks; None without two samples in it."""
    start = summary.get("time_to_first_batch_s")
    steady = summary.get("steady_wall_seconds")
    series = [x for x in memory.get("series", []) if len(x) >= 7]
    if start is None or not steady or not series:
        return None
    inside = [x for x in series if start <= x[0] <= start + steady]
    if len(inside) < 2 or inside[-1][0] - inside[0][0] < 1.0:
        return None
    a, b = inside[0], inside[-1]
    span = b[0] - a[0]
    main = (b[5] - a[5]) / span
    rest = ((b[6] - b[5]) - (a[6] - a[5])) / span
    return {"span_s": round(span, 2), "main_cores": round(main, 2), "worker_cores": round(rest, 2), "cpus": os.cpu_count()}


# ---------------------------------------------------------------------------------------------
# What the decode workers alone deliver (also bench/cpu_breakdown.py's)
# ---------------------------------------------------------------------------------------------


def descendants_cpu_s(exclude: int) -> float:
    """CPU seconds of this process's descendants (the pool's fork server and worker): schedstat's
    nanoseconds where the kernel has them, else stat's clock ticks (10 ms)."""
    total = 0.0
    for pid in process_tree(os.getpid()):
        if pid == exclude:
            continue
        try:
            with open(f"/proc/{pid}/schedstat") as f:
                total += int(f.read().split()[0]) / 1e9
            continue
        except (OSError, ValueError, IndexError):
            pass
        total += cpu_seconds(pid) or 0.0
    return total


def requests_of(paths: list[str], durations: list[float]):
    """Decode requests grouped as the job groups them (audio.requests): REQUEST_AUDIO_S of audio each."""
    from extractor.audio.decode import DecodeRequest, FileJob
    from extractor.audio.requests import files_per_request

    per = files_per_request(sum(durations) / len(durations))
    requests = []
    for i in range(0, len(paths), per):
        files = tuple(FileJob(p, (k,), ((None, None),)) for k, p in zip(range(i, i + per), paths[i:i + per]))
        requests.append(DecodeRequest(files))
    return requests


def decode_ceiling(corpus: dict, workers: int | None = None, share: float = 0.9) -> dict:
    """What the job's decode workers deliver at most: every file of a corpus through
    DecodePool(workers) (default: the job's own count), this process only receiving, as the job's
    producer does. The rate is the audio decoded by the time `share` of it was, over that time,
    so the last files (fewer than workers, some cores idle) do not count. Compared with a job's
    steady rate it says which side bounds the job: the decode, or the device and its loop.
    """
    import pyarrow.parquet as pq

    from extractor.audio.pool import END, DecodePool, WorkerFailure
    from extractor.constants import SAMPLE_RATE
    from extractor.options import default_decode_workers

    workers = default_decode_workers() if workers is None else workers
    paths = pq.read_table(corpus["manifest"], columns=["path"]).column("path").to_pylist()
    requests = requests_of(paths, [corpus["mean_s"]] * len(paths))
    expected = corpus["audio_seconds"]
    with DecodePool(workers) as pool:
        for _ in pool.stream([(0, requests[0])]):  # every worker started, one of them warm
            pass
        me = os.getpid()
        cpu0, t0 = descendants_cpu_s(me), time.perf_counter()
        done_s, at_share, cpu_at_share, failures = 0.0, None, None, 0
        for _, message in pool.stream(enumerate(requests)):
            if isinstance(message, WorkerFailure):
                failures += 1
                continue
            if message is END:
                continue
            done_s += len(message.samples) / SAMPLE_RATE
            if at_share is None and done_s >= share * expected:
                at_share, cpu_at_share = time.perf_counter() - t0, descendants_cpu_s(me) - cpu0
        wall, cpu_all = time.perf_counter() - t0, descendants_cpu_s(me) - cpu0  # before the workers exit
    if at_share is None:  # failures kept it short of the share: all of it counts
        at_share, cpu_at_share = wall, cpu_all
    return {
        "workers": workers,
        "audio_seconds": done_s,
        "wall_s": wall,
        "share": share,
        "audio_seconds_per_second": (share * expected if done_s >= share * expected else done_s) / at_share,
        "worker_cores": cpu_at_share / at_share,  # the pool's processes' CPU over the same span
        "failures": failures,
    }


# ---------------------------------------------------------------------------------------------
# Running the job
# ---------------------------------------------------------------------------------------------


@dataclass
class JobRun:
    exit_code: int
    process_wall_s: float  # launch to exit, as cron or Airflow sees it
    summary: dict  # the job's --summary-json ({} if it wrote none)
    memory: dict = field(default_factory=dict)
    stopped: bool = False  # past the deadline


class Runner:
    """Runs `python -m jobs.extract` with default flags, within the bench's deadline."""

    def __init__(self, model: str, adapter: str, device_flags: list[str], deadline: float, logs: Path):
        self.model, self.adapter, self.device_flags, self.deadline, self.logs = model, adapter, device_flags, deadline, logs

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def __call__(self, manifest: str | Path, out_dir: Path, tag: str, *, fresh: bool = True, devices: str | None = None) -> JobRun:
        if fresh:
            shutil.rmtree(out_dir, ignore_errors=True)  # the job resumes into an existing output
        if self.left() < MIN_RUN_S:
            raise TimeoutError(f"{tag}: not started, {self.left():.0f} s left before the deadline")
        summary_path = self.logs / f"summary-{tag}.json"
        summary_path.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "jobs.extract", "--manifest", str(manifest), "--id-column", "id", "--output", str(out_dir),
               "--model", self.model, "--adapter", self.adapter, "--summary-json", str(summary_path),
               *(["--devices", devices] if devices else self.device_flags)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        log(f"{tag}: " + " ".join(cmd[1:]))
        t = time.monotonic()
        # Its own session, so that a run past the deadline is stopped with all its workers.
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
        memory = TreeMemory(proc.pid)
        memory.start()
        stopped = False
        try:
            proc.wait(timeout=max(1.0, self.left()))
        except subprocess.TimeoutExpired:
            stopped = True
            log(f"{tag}: past the deadline; SIGTERM (the job commits what it has and writes its summary)")
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        wall = time.monotonic() - t
        memory.stop()
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        log(f"{tag}: exit {proc.returncode} after {wall:.1f} s; {summary_line(summary)}")
        return JobRun(proc.returncode, wall, summary, memory.figures(), stopped)


def _signal_group(pgid: int, signum: int) -> None:
    """Signal the job's session (started with start_new_session: its group is its pid)."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass  # it ended meanwhile


def summary_line(s: dict) -> str:
    if not s:
        return "no summary"
    steady = s.get("steady_audio_seconds", 0) / s["steady_wall_seconds"] if s.get("steady_wall_seconds") else None
    return (f"{s.get('embedded', 0):,} embedded, {s.get('failed', 0)} failed, {s.get('skipped', 0):,} skipped, "
            f"{s.get('audio_seconds', 0) / 3600:.2f} h in {s.get('wall_seconds', 0):.1f} s = {s.get('audio_seconds_per_second', 0):,.0f} "
            f"audio-s/s end to end, {run.fmt(steady)} steady, first batch {run.fmt(s.get('time_to_first_batch_s'), '.1f')} s, "
            f"tail {run.fmt(s.get('tail_s'), '.1f')} s")


def shape_figures(job: JobRun, peak_tflops: float | None) -> dict:
    """Issue 10's figures of one run, from its summary and its sampled memory."""
    s = job.summary
    steady_wall = s.get("steady_wall_seconds") or 0.0
    wall = s.get("wall_seconds") or 0.0
    own = [x for x in (job.memory.get("tree_pss_gb_max"), job.memory.get("tree_rss_gb_max")) if x is not None]
    reported = [*s.get("host_rss_gb_samples", []), s.get("host_rss_gb_first_batch"), s.get("host_rss_gb_end")]
    reported = [x for x in reported if x is not None]
    return {
        "audio_hours": s.get("audio_seconds", 0.0) / 3600,
        "mfu": s["steady_useful_flops"] / steady_wall / (peak_tflops * 1e12) if steady_wall and peak_tflops else None,
        "device_idle_fraction": s.get("device_idle_fraction"),
        "steady_audio_seconds_per_second": s.get("steady_audio_seconds", 0.0) / steady_wall if steady_wall else None,
        # From the process's launch: the summary's wall counts imports, model load and start-up.
        "audio_seconds_per_second": s.get("audio_seconds", 0.0) / wall if wall else None,
        "time_to_first_batch_s": s.get("time_to_first_batch_s"),
        "tail_s": s.get("tail_s"),
        # The whole tree (main process, fork server, decode workers), PSS where the kernel has it;
        # the job's own samples (main process, every 10 s) where we have none.
        "host_rss_gb_max": own[0] if own else max(reported, default=None),
    }


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def results_json(detail: dict) -> dict:
    """shapes.json: issue 10's keys, in its order, nothing else."""
    return {
        "device": detail.get("device"),
        "git_commit": detail.get("git_commit"),
        "peak_bf16_tflops": detail.get("peak_bf16_tflops"),
        "shapes": {name: r["figures"] for name, r in detail.get("shapes", {}).items() if r.get("figures")},
        "nightly": detail["nightly"]["figures"] if detail.get("nightly", {}).get("figures") else None,
        "multi_gpu": detail["multi_gpu"]["figures"] if detail.get("multi_gpu", {}).get("figures") else None,
    }


def save(detail: dict, out: Path) -> None:
    """Both files, to OUT and to $OUT: after every phase, so a cut-off call keeps what it measured."""
    detail["total_wall_s"] = time.perf_counter() - run.T0
    texts = {SHAPES_JSON: json.dumps(results_json(detail), indent=2) + "\n",
             DETAIL_JSON: json.dumps(detail, indent=2, default=str) + "\n"}
    for folder in dict.fromkeys([out, *([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])]):
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            tmp = folder / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(folder / name)


RESULTS_SECTION = """
## Corpus shapes (issue 10)

One block per `bash bench/device.sh --shapes` call (`python bench/shapes.py`), newest last;
`--devices all` calls add a two-GPU line. The record of the latest call is `results/shapes.json`
(issue 10's keys) and `results/shapes_detail.json` (summaries, memory series, checks, phases).
Default flags, the bench's random full-size tower and r=16 LoRA; each corpus generated by the
bench with its own seed (bench/synth_corpus.py: speech-like syllables, noise floor at -66 dBFS).

- **MFU**: steady useful FLOPs per second / the bf16 matmul peak measured in the same call.
- **idle**: fraction of the steady phase the device loop waited for input.
- **steady**: audio-s/s after the first batch is back; **e2e**: audio-s/s over the summary's wall
  time, which counts from the process's launch; **e2e/steady** (goals ≥ 0.85 on 61 h, ≥ 0.65 on 20 h).
- **first batch**: from the process's launch; **tail**: from the last batch's results to the
  summary line. **host GB**: the job's whole process tree (main, fork server, decode workers),
  proportional set size, max over 1 s samples.
- **decode ceiling**: the same corpus through the job's decode workers alone (bench/shapes.py
  `decode_ceiling`), measured just before the run: what the host's cores can feed. **cores**: CPU
  of the job's main process and of its decode workers over the steady phase, from /proc.
- **nightly**: process wall times (launch to exit): 1 % new rows appended to the manifest of a
  finished 12,000-row output (goal ≤ 6 s), then a rerun with nothing to do (goal ≤ 3 s, exit 0).
"""


def results_block(detail: dict, multi: bool = False) -> str:
    """A --shapes call's block: its table, nightly line and, if merged, the multi-GPU line; a
    --devices call's: that line alone, under its own card and commit."""
    figures = results_json(detail)
    if multi:
        m = detail.get("multi_gpu", {})
        head = (f"\n### {detail['date'][:16].replace('T', ' ')} UTC, {m.get('git_commit') or '-'}, {m.get('device') or detail['mode']} "
                f"({detail['host']['cpus']} cores), {detail['mode']}\n\n")
        return head + (multi_gpu_line(detail) if m.get("figures") else f"Several GPUs: {m.get('error') or 'no figures'}") + "\n"
    head = (f"\n### {detail['date'][:16].replace('T', ' ')} UTC, {detail.get('git_commit') or '-'}, {detail.get('device')} "
            f"({detail['host']['cpus']} cores){', ' + detail['mode'] if detail['mode'] != 'full' else ''}\n\n")
    naive = detail.get("naive_bf16_audio_seconds_per_second")
    lines = [head + f"bf16 peak {run.fmt(figures['peak_bf16_tflops'])} TFLOP/s; naive HF+PEFT {run.fmt(naive)} audio-s/s; "
             f"whole call {detail['total_wall_s']:.0f} s (phases: {', '.join(f'{k} {v:.0f}' for k, v in detail['phases_s'].items())}).\n",
             "| corpus | audio h | MFU | idle | steady a-s/s | e2e a-s/s | e2e/steady | first batch s | tail s | host GB | decode ceiling a-s/s | cores: main / workers | ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in detail.get("shapes", {}).items():
        f = r.get("figures") or {}
        ratio = (f["audio_seconds_per_second"] / f["steady_audio_seconds_per_second"]
                 if f.get("audio_seconds_per_second") and f.get("steady_audio_seconds_per_second") else None)
        lines.append("| " + " | ".join([
            name, run.fmt(f.get("audio_hours"), ".1f"), run.fmt(f.get("mfu"), ".3f"), run.fmt(f.get("device_idle_fraction"), ".1%"),
            run.fmt(f.get("steady_audio_seconds_per_second")), run.fmt(f.get("audio_seconds_per_second")), run.fmt(ratio, ".2f"),
            run.fmt(f.get("time_to_first_batch_s"), ".1f"), run.fmt(f.get("tail_s"), ".1f"), run.fmt(f.get("host_rss_gb_max"), ".1f"),
            run.fmt((r.get("decode_ceiling") or {}).get("audio_seconds_per_second")),
            f"{r['cpu']['main_cores']:.2f} / {r['cpu']['worker_cores']:.1f}" if r.get("cpu") else "-",
            "yes" if ok(r) else f"NO: {r.get('error') or 'checks failed'}",
        ]) + " |")
    n = detail.get("nightly") or {}
    if n.get("figures"):
        f = n["figures"]
        lines.append(f"\nNightly: {n['new_rows']:,} new rows into a finished {n['base_rows']:,}-row output "
                     f"{f['incremental_1pct_wall_s']:.1f} s (the full output took {n['full_wall_s']:.1f} s); "
                     f"a rerun with nothing to do {f['noop_wall_s']:.1f} s, exit {f['noop_exit_code']}"
                     f"{'' if n.get('checks', {}).get('ok') else ' (checks FAILED: see shapes_detail.json)'}.")
    elif n.get("error"):
        lines.append(f"\nNightly: {n['error']}")
    if detail.get("multi_gpu", {}).get("figures"):
        lines.append("\n" + multi_gpu_line(detail))
    return "\n".join(lines) + "\n"


def multi_gpu_line(detail: dict) -> str:
    m = detail["multi_gpu"]
    f = m["figures"]
    return (f"Several GPUs ({m['device']}, {BASE_SHAPE}): end to end {f['e2e_scaling']:.2f}× one GPU "
            f"({run.fmt(m['one']['audio_seconds_per_second'])} → {run.fmt(m['all']['audio_seconds_per_second'])} audio-s/s), "
            f"steady {f['steady_scaling']:.2f}× ({run.fmt(m['one']['steady_audio_seconds_per_second'])} → "
            f"{run.fmt(m['all']['steady_audio_seconds_per_second'])}); {f['gpus']} GPUs.")


def append_results(detail: dict, path: Path, multi: bool = False) -> str:
    block = results_block(detail, multi)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run.RESULTS_HEADER if path == run.RESULTS_MD else "# Smoke runs of bench/shapes.py (numbers mean nothing)\n")
    text = path.read_text()
    if RESULTS_SECTION.strip().splitlines()[0] not in text:
        text = text.rstrip("\n") + "\n" + RESULTS_SECTION
    path.write_text(text.rstrip("\n") + "\n" + block)
    return block


def print_table(detail: dict) -> None:
    figures = results_json(detail)
    print(f"\n  {detail.get('device')}, commit {detail.get('git_commit')}, peak {run.fmt(figures['peak_bf16_tflops'])} TFLOP/s, "
          f"naive {run.fmt(detail.get('naive_bf16_audio_seconds_per_second'))} audio-s/s, total {detail['total_wall_s']:.0f} s")
    cols = ("audio h", "MFU", "idle", "steady", "e2e", "1st batch", "tail", "host GB")
    print(f"  {'shape':<25}" + "".join(f"{c:>10}" for c in cols))
    for name, f in figures["shapes"].items():
        cells = [run.fmt(f["audio_hours"], ".1f"), run.fmt(f["mfu"], ".3f"), run.fmt(f["device_idle_fraction"], ".1%"),
                 run.fmt(f["steady_audio_seconds_per_second"]), run.fmt(f["audio_seconds_per_second"]),
                 run.fmt(f["time_to_first_batch_s"], ".1f"), run.fmt(f["tail_s"], ".1f"), run.fmt(f["host_rss_gb_max"], ".2f")]
        print(f"  {name:<25}" + "".join(f"{c:>10}" for c in cells))
    for name, r in detail.get("shapes", {}).items():
        if not ok(r):
            print(f"  {name}: {r.get('error') or 'checks FAILED ' + json.dumps(r.get('checks'))}")
    if figures["nightly"]:
        f = figures["nightly"]
        print(f"  nightly: 1% incremental {f['incremental_1pct_wall_s']:.1f} s, no-op {f['noop_wall_s']:.1f} s (exit {f['noop_exit_code']})")
    elif detail.get("nightly", {}).get("error"):
        print(f"  nightly: {detail['nightly']['error']}")
    if figures["multi_gpu"]:
        f = figures["multi_gpu"]
        print(f"  {f['gpus']} GPUs: end to end {f['e2e_scaling']:.2f}x, steady {f['steady_scaling']:.2f}x")
    elif detail.get("multi_gpu", {}).get("error"):
        print(f"  multi-GPU: {detail['multi_gpu']['error']}")
    for e in detail.get("errors", []):
        print(f"  error: {e}")
    print(flush=True)


# ---------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------


def check_run(job: JobRun, out_dir: Path, manifest: str | Path) -> dict:
    checks = run.check_output(out_dir, str(manifest), job.summary, None, [])
    checks["exit_code"] = job.exit_code
    checks["ok"] = checks["ok"] and job.exit_code == 0 and not job.stopped
    return checks


def run_shape(name: str, corpus: dict, runner: Runner, detail: dict, work: Path, ceiling: bool = True) -> None:
    rec = detail["shapes"][name] = {"corpus": corpus}
    try:
        if ceiling:
            # What the decode workers alone deliver on this host, just before the job runs.
            rec["decode_ceiling"] = c = decode_ceiling(corpus)
            log(f"{name}: decode ceiling {c['audio_seconds_per_second']:,.0f} audio-s/s with {c['workers']} workers "
                f"({c['worker_cores']:.1f} cores busy; {c['wall_s']:.1f} s)")
        out_dir = work / f"out-{name}"
        job = runner(corpus["manifest"], out_dir, name)
        rec.update(exit_code=job.exit_code, process_wall_s=job.process_wall_s, stopped=job.stopped, summary=job.summary, memory=job.memory)
        rec["cpu"] = cores = steady_cores(job.memory, job.summary)
        if cores:
            log(f"{name}: steady phase {cores['main_cores']:.2f} cores in the main process, {cores['worker_cores']:.1f} in the decode workers")
        rec["figures"] = shape_figures(job, detail.get("peak_bf16_tflops")) if job.summary.get("wall_seconds") else None
        rec["checks"] = check_run(job, out_dir, corpus["manifest"])
        if not rec["checks"]["ok"]:
            log(f"{name}: checks FAILED {rec['checks']}")
    except Exception as e:  # one shape failing must not lose the others' figures
        rec["error"] = f"{type(e).__name__}: {e}"
        log(f"{name}: FAILED {rec['error']}")


def run_nightly(base_corpus: dict, runner: Runner, detail: dict, work: Path, base: int, new: int) -> None:
    import pyarrow.parquet as pq

    rec = detail["nightly"] = {"base_rows": base, "new_rows": new}
    try:
        rows = pq.read_table(base_corpus["manifest"])
        if rows.num_rows < base + new:
            raise ValueError(f"{BASE_SHAPE} has {rows.num_rows} rows; the nightly needs {base + new}")
        folder = work / "nightly"
        folder.mkdir(parents=True, exist_ok=True)
        manifest, out_dir = folder / "manifest.parquet", folder / "out"
        pq.write_table(rows.slice(0, base), manifest)
        full = runner(manifest, out_dir, "nightly-full")
        pq.write_table(rows.slice(0, base + new), manifest)  # tonight's manifest: yesterday's rows and 1 % new ones
        inc = runner(manifest, out_dir, "nightly-incremental", fresh=False)
        noop = runner(manifest, out_dir, "nightly-noop", fresh=False)
        rec.update(full_wall_s=full.process_wall_s, runs={"full": vars(full), "incremental": vars(inc), "noop": vars(noop)})
        rec["figures"] = {"incremental_1pct_wall_s": inc.process_wall_s, "noop_wall_s": noop.process_wall_s, "noop_exit_code": noop.exit_code}
        checks = run.check_output(out_dir, str(manifest), inc.summary, None, [])
        checks.update(
            full_exit_code=full.exit_code, incremental_exit_code=inc.exit_code,
            incremental_embedded=inc.summary.get("embedded"), incremental_skipped=inc.summary.get("skipped"),
            noop_reported=inc.summary.get("noop") is False and noop.summary.get("noop") is True,
        )
        checks["ok"] = bool(checks["ok"] and full.exit_code == 0 and inc.exit_code == 0 and checks["incremental_embedded"] == new
                            and checks["incremental_skipped"] == base and checks["noop_reported"])
        rec["checks"] = checks
        if not checks["ok"]:
            log(f"nightly: checks FAILED {checks}")
    except Exception as e:
        rec["error"] = f"{type(e).__name__}: {e}"
        log(f"nightly: FAILED {rec['error']}")


def run_multi_gpu(base_corpus: dict, runner: Runner, detail: dict, work: Path, devices: str, tiny: bool) -> None:
    rec = detail["multi_gpu"] = {"git_commit": run.git_commit()}
    try:
        import torch

        if devices == "all" and not torch.cuda.is_available():
            if not tiny:
                raise RuntimeError("--devices all: no CUDA device here")
            devices = "cpu,cpu"  # the smoke run exercises the same engine with two CPU workers
        gpus = torch.cuda.device_count() if devices == "all" else len(devices.split(","))
        out_dir, manifest = work / f"out-{BASE_SHAPE}", base_corpus["manifest"]
        runs, checks, figures = {}, {}, {}
        for name, flag in (("one", None), ("all", devices)):
            job = runner(manifest, out_dir, f"multi-{name}", devices=flag)
            runs[name], checks[name], figures[name] = vars(job), check_run(job, out_dir, manifest), shape_figures(job, None)
        rec.update(device=runs["all"]["summary"].get("device"), devices=devices, one=figures["one"], all=figures["all"], runs=runs,
                   checks={**checks, "ok": checks["one"]["ok"] and checks["all"]["ok"]})
        rec["figures"] = {
            "gpus": gpus,
            "e2e_scaling": figures["all"]["audio_seconds_per_second"] / figures["one"]["audio_seconds_per_second"],
            "steady_scaling": figures["all"]["steady_audio_seconds_per_second"] / figures["one"]["steady_audio_seconds_per_second"],
        }
    except Exception as e:
        rec["error"] = f"{type(e).__name__}: {e}"
        log(f"multi-GPU: FAILED {rec['error']}")


def merge_previous(detail: dict, out: Path) -> None:
    """A --devices call adds to the record of an earlier --shapes call: its shapes, nightly, card
    and peak stay as they were (this call's card is multi_gpu's)."""
    if (out / DETAIL_JSON).exists():
        old = json.loads((out / DETAIL_JSON).read_text())
        shapes, nightly = old.get("shapes") or {}, old.get("nightly") or {}
    elif (out / SHAPES_JSON).exists():
        old = json.loads((out / SHAPES_JSON).read_text())
        shapes = {n: {"figures": f, "checks": {"ok": True}} for n, f in (old.get("shapes") or {}).items()}
        nightly = {"figures": old["nightly"], "checks": {"ok": True}} if old.get("nightly") else {}
    else:
        return
    detail["shapes_call"] = {k: old.get(k) for k in ("date", "git_commit", "device", "mode")}
    detail.update(device=old.get("device"), git_commit=old.get("git_commit"), peak_bf16_tflops=old.get("peak_bf16_tflops"),
                  naive_bf16_audio_seconds_per_second=old.get("naive_bf16_audio_seconds_per_second"), shapes=shapes)
    if nightly:
        detail["nightly"] = nightly


def ok(record: dict) -> bool:
    return bool(record.get("figures")) and bool(record.get("checks", {}).get("ok"))


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() - (time.perf_counter() - run.T0) + args.deadline_s
    import synth_corpus
    import synth_model
    import torch

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    work, out = Path(args.work_dir), args.out
    out.mkdir(parents=True, exist_ok=True)
    mode = "tiny" if args.tiny else "full"
    label = mode + (f" --scale {args.scale:g}" if args.scale != 1 else "") + (f" --devices {args.devices}" if args.devices else "")
    audio = synth_model.TINY_AUDIO if args.tiny else synth_model.FULL_AUDIO
    phases: dict[str, float] = {}
    detail: dict = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": run.git_commit(),
        "mode": label,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "host": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "phases_s": phases,
        "shapes": {},
        "errors": [],
    }
    multi = args.devices is not None
    if multi:
        merge_previous(detail, out)  # before the first save() overwrites the earlier call's record
    names = [BASE_SHAPE] if multi else [n for n in SHAPES if n in args.only]
    nightly = not multi and NIGHTLY in args.only
    need_base = multi or nightly or not args.skip_naive
    specs = {n: corpus_of(n, args) for n in SHAPES if n in names or (n == BASE_SHAPE and need_base)}
    if need_base and BASE_SHAPE not in names:
        # Only the naive baseline's and the nightly's rows of it (the first rows of the full corpus:
        # same seed, same clips).
        b = specs[BASE_SHAPE]
        rows = max([args.naive_clips if not args.skip_naive else 1, sum(nightly_rows(args)) if nightly else 1])
        specs[BASE_SHAPE] = CorpusSpec(rows, b.seed, b.min_s, b.max_s, b.sample_rate, b.channels, b.container)
    if args.rebuild:
        for sub in (f"model-{mode}", f"adapter-{mode}", *(corpus_dir(n, s) for n, s in specs.items())):
            shutil.rmtree(work / sub, ignore_errors=True)
    log(f"shapes ({label}) on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, {os.cpu_count()} cores: {', '.join(f'{n} ({s.clips:,} files)' for n, s in specs.items())}"
        f"{', nightly' if nightly else ''}; work dir {work}")

    code = 0
    try:
        # 1-3. Corpora on every core, while the checkpoint is drawn and the peak measured on the GPU.
        corpora: dict[str, dict] = {}
        generation: dict = {}

        def generate() -> None:
            t = time.perf_counter()
            try:
                stats = synth_corpus.build_corpora([(work / corpus_dir(n, s), s) for n, s in specs.items()], args.workers, log=log)
                corpora.update(zip(specs, stats))
            except BaseException as e:  # surfaced on the main thread
                generation["error"] = e
            generation["seconds"] = time.perf_counter() - t

        gen_thread = threading.Thread(target=generate, name="corpora", daemon=True)
        gen_thread.start()

        t = time.perf_counter()
        ckpt = synth_model.build_checkpoint(work / f"model-{mode}", audio, seed=0, max_shard_bytes=(1 << 18) if args.tiny else (1 << 30),
                                            device=device.type)
        adapter = synth_model.build_adapter(work / f"adapter-{mode}", Path(ckpt["path"]), audio)
        phases["checkpoint"] = time.perf_counter() - t
        detail["checkpoint"], detail["adapter"] = ckpt, adapter
        log(f"checkpoint: {ckpt['tower_parameters']:,} tower parameters, adapter {adapter['parameters']:,} "
            f"({'reused' if ckpt['reused'] and adapter['reused'] else 'built'}) in {phases['checkpoint']:.1f} s")

        if not multi:
            t = time.perf_counter()
            peak = run.peak_matmul_tflops(device)
            phases["peak"] = time.perf_counter() - t
            detail["peak"], detail["peak_bf16_tflops"] = peak, peak["tflops"]
            log(f"peak: bf16 {peak['n']}^3 matmul {peak['tflops']:,.1f} TFLOP/s (repeats {peak['repeats_tflops']})"
                f"{' while the corpora were generated' if gen_thread.is_alive() else ''}")

        gen_thread.join()
        phases["corpora"] = generation["seconds"]
        if "error" in generation:
            raise generation["error"]
        detail["corpora"] = corpora
        fresh = [s for s in corpora.values() if not s["reused"]]
        cpu = sum(s["cpu_s"] for s in fresh)
        log(f"corpora: {len(fresh)} generated ({cpu:,.0f} CPU s, {cpu / max(phases['corpora'], 1e-9):.1f} cores busy on average) "
            f"and {len(corpora) - len(fresh)} reused in {phases['corpora']:.1f} s")
        save(detail, out)

        # 4. The naive baseline, once the cores are free again (its feature extractor runs on the CPU).
        if not args.skip_naive and not multi:
            import pyarrow.parquet as pq
            from naive import run_naive

            t = time.perf_counter()
            paths = pq.read_table(corpora[BASE_SHAPE]["manifest"]).slice(0, args.naive_clips).column("path").to_pylist()
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            found = {}
            for masked in (True, False):
                n = run_naive(Path(ckpt["path"]), Path(adapter["path"]), paths, device, dtype, log=log, padding_mask=masked)
                found["masked" if masked else "unmasked"] = {k: v for k, v in n.items() if k != "embeddings"}
            phases["naive"] = time.perf_counter() - t
            detail["naive"] = found
            detail["naive_bf16_audio_seconds_per_second"] = max(n["audio_seconds_per_second"] for n in found.values())
            log(f"naive: {detail['naive_bf16_audio_seconds_per_second']:,.0f} audio-s/s (the faster of masked and unmasked) "
                f"in {phases['naive']:.1f} s")
            save(detail, out)

        runner = Runner(ckpt["path"], adapter["path"], [] if args.device == "auto" and device.type == "cuda" else ["--device", device.type],
                        deadline, work / "summaries")
        runner.logs.mkdir(parents=True, exist_ok=True)
        if multi:
            t = time.perf_counter()
            run_multi_gpu(corpora[BASE_SHAPE], runner, detail, work, args.devices, args.tiny)
            phases["multi_gpu"] = time.perf_counter() - t
            save(detail, out)
        else:
            # 5. Every shape, on a fresh output; 6. the nightly.
            for name in names:
                t = time.perf_counter()
                run_shape(name, corpora[name], runner, detail, work, ceiling=not args.no_ceiling)
                phases[name] = time.perf_counter() - t
                save(detail, out)
            if nightly:
                t = time.perf_counter()
                run_nightly(corpora[BASE_SHAPE], runner, detail, work, *nightly_rows(args))
                phases["nightly"] = time.perf_counter() - t
                save(detail, out)
    except BaseException as e:
        detail["errors"].append(f"{type(e).__name__}: {e}")
        log(f"FAILED: {detail['errors'][-1]}")
        code = 1
        if not isinstance(e, Exception):
            raise
    finally:
        save(detail, out)

    if multi:
        failed = [] if ok(detail.get("multi_gpu", {})) else ["multi_gpu"]
    else:
        failed = [n for n in names if not ok(detail["shapes"].get(n, {}))] + ([NIGHTLY] if nightly and not ok(detail.get("nightly", {})) else [])
    block = append_results(detail, args.results_md, multi)
    log(f"wrote {out / SHAPES_JSON}, {out / DETAIL_JSON}; appended to {args.results_md}:{block}")
    print_table(detail)
    if failed:
        log(f"FAILED: {', '.join(failed)}")
    return code or (1 if failed else 0)


def corpus_dir(name: str, spec: CorpusSpec) -> str:
    if name == BASE_SHAPE:
        return f"corpus-n{spec.clips}-s{spec.seed}"  # run.py's name for the same corpus: one call can run both
    return f"corpus-{name}-n{spec.clips}-s{spec.seed}"


if __name__ == "__main__":
    sys.exit(main())
