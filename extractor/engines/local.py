"""The local engine: a shard's pending rows embedded in this process, and its command-line run.

`embed` is the Embed every engine ends in (engines/devices.py runs it in each worker process,
engines/ray.py in each task): load the model while decoding starts, check the recipe, begin,
then the pipeline into a part writer until the rows are done or the run is stopped.

`run_local` stops the way a scheduler expects. Kubernetes, Airflow and systemd send SIGTERM, a
terminal sends SIGINT. The first one stops the run gracefully: no new work is taken, what is
already embedded is committed, the lock is let go, one line says what was kept, and the command
exits 128 + the signal's number (143, 130), well inside Kubernetes' 30 s grace. A second signal
stops at once (the kernel drops the lock, and a rerun resumes from the committed parts).
"""

from __future__ import annotations

import json
import logging
import threading
import time

from ..options import JobOptions, Shard
from ..output.layout import RunInfo
from ..pending import Pending
from ..seams import NONE, Seams
from ..shard import Control, Embed, StopSignal, Work, process_age_s, signal_name
from ..shard import run_shard as shard_run
from ..signals import graceful_signals
from ..summary import Summary

logger = logging.getLogger(__name__)

STALL_DECODE_TIMEOUTS = 3  # no row finished for this many decode timeouts: the log says what the run waits on

__all__ = ["embed", "graceful_signals", "run_local", "run_shard"]


def embed(work: Work, control: Control) -> Summary:
    """Embed `work.rows` (and what `control.more` hands on) in this process, under the held lock."""
    from ..audio.decode import OPUS_DECODER
    from ..output.writer import PartWriter
    from ..pipeline import Pipeline
    from ..pooling import POOLINGS
    from ..recipe import build_recipe

    opts, out, stop = work.opts, work.out, control.stop
    summary = Summary(output=str(out.root), shard=str(work.shard), rows_total=len(work.rows))
    rows = Pending(work.rows, control.more)
    # Decoding starts now, while torch is imported and the model loads; nothing is written until
    # the model is loaded and the recipe checked.
    opus_decoder = work.opus_decoder or OPUS_DECODER
    with Pipeline(rows, opts, work.cfg, stop, work.audio, control.seams.decode_fn, opus_decoder) as pipe:
        from ..model.load import load_model, resolve_device, resolve_dtype  # torch: only when there is work

        logger.debug("torch imported %.2f s after launch", process_age_s())
        device = resolve_device(opts.device)
        if device.type == "cuda" and device.index is not None:
            import torch

            torch.cuda.set_device(device)  # else cuda:0 gets a context and the default streams
        pipe.attach(device)
        control.progress.watch(pipe.waiting_on, STALL_DECODE_TIMEOUTS * opts.decode_timeout_s)
        model = control.model
        if model is None:
            t = time.monotonic()
            model = load_model(opts.model, opts.adapter, device, resolve_dtype(opts.dtype, device),
                               on_stage=lambda stage: control.seams.event(stage, shard=work.shard.index))
            logger.info("model loaded in %.1f s (%.2f s after launch)", time.monotonic() - t, process_age_s())
        control.seams.event("loaded", shard=work.shard.index)
        if stop.is_set():
            summary.interrupted = signal_name(stop)
            return summary
        recipe = build_recipe(model, opts, opus_decoder=opus_decoder)
        run_info = out.create_run(RunInfo(recipe, work.shard.count, work.sources, id_type=str(work.types["id"])))  # the first write
        out.forget_created()
        control.begin()
        metadata = {b"qwen2_audio_embeddings.sources": json.dumps(work.sources).encode()}
        with PartWriter(out, control.lock, work.shard, rows, work.types, recipe, first_seq=work.first_seq, seq_step=work.seq_step,
                        keep_columns=opts.manifest.keep_columns, part_rows=opts.part_rows, part_bytes=opts.part_bytes,
                        commit_seconds=opts.commit_seconds, metadata=metadata, path_column=run_info.path_column,
                        on_event=control.seams.on_event) as writer:
            pipe.run(model, POOLINGS[opts.pooling], writer, control.progress, summary.stats, work.t0, control.seams)
        summary.embedded, summary.failed, summary.audio_seconds = writer.embedded, writer.failed, writer.audio_s
    if stop.is_set():
        summary.interrupted = signal_name(stop)
    return summary


def run_shard(opts: JobOptions, shard: Shard | None = None, *, embed: Embed = embed, model=None, stop: threading.Event | None = None,
              seams: Seams = NONE, on_progress=None) -> Summary:
    """One shard in this process (opts.shard unless given), without signal handlers: for the
    notebook API, tests and Ray tasks."""
    return shard_run(opts, embed, shard, model=model, stop=stop, seams=seams, on_progress=on_progress)


def run_local(opts: JobOptions, *, model=None, stop: StopSignal | None = None, seams: Seams = NONE, embed: Embed = embed) -> Summary:
    """`stop`: the command's, whose handlers are already installed (a signal may have set it)."""
    stop = StopSignal() if stop is None else stop
    with graceful_signals(stop):
        return run_shard(opts, embed=embed, model=model, stop=stop, seams=seams)
