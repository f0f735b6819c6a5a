"""`extract-embeddings --dry-run`: what a run would do, or why it would be refused; nothing is written.

Pending rows are planned as the run would plan them, from the committed ids (without its lock,
so a run finishing meanwhile can make the real plan smaller). Audio hours come from segment bounds
where the manifest gives them, else from file headers: all of them up to HEADER_SAMPLE rows, a
seeded sample of that many beyond (the figure is then marked as an estimate).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from ..errors import EXIT_BUSY, EXIT_CONFIG, EXIT_OK, ConfigError
from ..options import JobOptions
from ..output.layout import SHARDS_DIR
from ..output.locks import flock_holder
from ..urls import is_url
from ..shard import committed, is_noop, pending_rows, prepare

HEADER_SAMPLE = 1000


def _lock_held(plan) -> str | None:
    """Who holds the shard's lock, if a live run does (local outputs; read-only check)."""
    if not isinstance(plan.out.root, Path):
        return None
    return flock_holder(plan.out.root / SHARDS_DIR / f"{plan.shard.tag}.lock")


def _audio_hours(pending) -> tuple[float | None, bool]:
    """(hours, estimated) of the pending rows; None when no header could be read."""
    if not len(pending):
        return 0.0, False
    if "start_s" in pending.columns and "end_s" in pending.columns and pending["end_s"].null_count() == 0:
        return float((pending["end_s"] - pending["start_s"].fill_null(0.0)).clip(0).sum()) / 3600, False
    import soundfile as sf

    paths = pending["path"].to_list()
    sample = paths if len(paths) <= HEADER_SAMPLE else random.Random(0).sample(paths, HEADER_SAMPLE)
    seconds, read = 0.0, 0
    for p in sample:
        if is_url(p):
            continue
        try:
            info = sf.info(p)
            seconds += info.frames / info.samplerate
            read += 1
        except Exception:
            continue
    if not read:
        return None, True
    return seconds / read * len(paths) / 3600, read < len(paths)


def dry_run(opts: JobOptions, engine: str = "local", devices: str | None = None, stream=None) -> int:
    stream = stream or sys.stdout
    try:
        plan = prepare(opts)
    except ConfigError as e:
        print(json.dumps({"would_run": False, "refused": f"{type(e).__name__}: {e}", "exit_code": EXIT_CONFIG}, indent=2), file=stream)
        return EXIT_CONFIG
    report = {
        "output": str(plan.out.root), "shard": str(plan.shard), "engine": engine, "devices": devices,
        "rows": len(plan.rows), "model": opts.model, "adapter": opts.adapter,
        "recipe": {"padding_mask": opts.padding_mask, "pooling": opts.pooling, "dtype": opts.dtype,
                   "output_dtype": opts.output_dtype, "d_model": plan.cfg.d_model, "layers": plan.cfg.encoder_layers},
        "existing_output": plan.existing is not None,
    }
    if is_noop(plan):
        report.update(would_run=False, nothing_to_do=True, pending_rows=0, exit_code=EXIT_OK)
        print(json.dumps(report, indent=2), file=stream)
        return EXIT_OK
    done, failed, _ = committed(plan, repair=False)  # no lock: nothing is moved
    pending, n_done, n_failed = pending_rows(plan, done, failed)
    hours, estimated = _audio_hours(pending)
    holder = _lock_held(plan)
    report.update(
        would_run=holder is None, pending_rows=len(pending), already_embedded=n_done, failed_earlier=n_failed,
        retry_failed=opts.retry_failed, pending_audio_hours=None if hours is None else round(hours, 6),
        audio_hours_estimated=estimated, busy=holder, exit_code=EXIT_BUSY if holder else EXIT_OK,
    )
    print(json.dumps(report, indent=2), file=stream)
    return EXIT_BUSY if holder else EXIT_OK
