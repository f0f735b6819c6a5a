"""A test-only engine, to show that an engine is one file: the shard's pending rows embedded in two
halves, one after the other, in this process (`--engine tests.engines.halves:run`).

It is an Embed (extractor.shard): everything else (the checks, the lock, the plan, the markers)
is the shard's lifecycle, shared with every engine.
"""

from __future__ import annotations

import time
from dataclasses import replace

from extractor.engines.local import embed, run_local
from extractor.seams import NONE
from extractor.shard import Control, Work
from extractor.summary import Summary, merge


def embed_in_halves(work: Work, control: Control) -> Summary:
    n = len(work.rows)
    first = embed(replace(work, rows=work.rows.head(n // 2)), control)
    if first.interrupted:
        return first
    # The second half's parts follow the first's: the next free part number, as a rerun finds it.
    second = embed(replace(work, rows=work.rows.tail(n - n // 2), first_seq=work.out.next_seq(work.shard)), control)
    summary = merge([first, second], str(work.out.root), str(work.shard), time.monotonic() - work.t0, False)
    summary.interrupted = second.interrupted
    return summary


def run(opts, *, stop=None, seams=None, **_):
    return run_local(opts, stop=stop, seams=seams or NONE, embed=embed_in_halves)
