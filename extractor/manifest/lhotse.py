"""lhotse cut manifests (`cuts.jsonl.gz`) as manifest rows, without lhotse.

One JSON object per line, as lhotse's `CutSet.to_file` writes it: a MonoCut or a MultiCut with
`id`, `start`, `duration`, `channel` (one, or a list) and its `recording` (`id`, `sources`
[{type, channels, source}], `sampling_rate`, `num_samples`, `duration`). Each cut becomes one row:

    id        the cut's id
    path      its recording's one source (a local path, or a URL for `"type": "url"`)
    start     the cut's start, seconds into the recording
    end       start + duration
    duration, recording_id, sampling_rate, text (its supervisions' texts, joined by a space)
              columns that --keep-columns can copy to the output

A cut of every channel of a multi-channel recording (lhotse makes a MultiCut of a stereo file) is
embedded as a stereo file is: the mean of its channels (the recipe's `downmix`). What the job
cannot reproduce is refused, naming the cut, rather than embedded as something else: several
sources for one recording, some channels of a multi-channel recording (the job averages every
channel of a file), audio held in memory or produced by a command, recordings with transforms
(speed, volume, resampling: the job would embed the untransformed audio), a MixedCut (it mixes
tracks) and a PaddingCut (it has no audio).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping

import pyarrow as pa

from .errors import ManifestError
from .formats import open_binary

COLUMNS = {"id": "id", "path": "path", "start": "start", "end": "end"}  # the spec's columns, as ManifestSpec names them
KEEPABLE = ("duration", "recording_id", "sampling_rate", "text")
SOURCE_TYPES = ("file", "url")  # lhotse's AudioSource types the decoders can open; not "memory", "command", "shar"


def read_cuts(path: str, storage_options: Mapping | None = None) -> pa.Table:
    """The cuts of `path` as a table of COLUMNS and KEEPABLE; ManifestError naming a cut that cannot be honoured."""
    with open_binary(path, storage_options) as f:
        return cuts_table(f, path)


def cuts_table(lines: Iterable[bytes], name: str) -> pa.Table:
    cols: dict[str, list] = {c: [] for c in (*COLUMNS, *KEEPABLE)}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            cut = json.loads(line)
        except ValueError as e:
            raise ManifestError(f"{name}, line {n}: not JSON ({e})") from e
        if not isinstance(cut, dict):
            raise ManifestError(f"{name}, line {n}: expected a cut (a JSON object), got {type(cut).__name__}")
        row = _row(cut, f"{name}, line {n}")
        for c, v in zip(cols, row):
            cols[c].append(v)
    types = {"id": pa.large_string(), "path": pa.large_string(), "start": pa.float64(), "end": pa.float64(),
             "duration": pa.float64(), "recording_id": pa.large_string(), "sampling_rate": pa.int64(), "text": pa.large_string()}
    return pa.table({c: pa.array(v, type=types[c]) for c, v in cols.items()})


def _row(cut: dict, where: str) -> tuple:
    kind = cut.get("type", "MixedCut" if "tracks" in cut else "MonoCut")
    cid = cut.get("id")
    if not isinstance(cid, str) or not cid:
        raise ManifestError(f"{where}: a cut without an id (expected a non-empty string, got {cid!r})")
    at = f"{where}, cut {cid!r}"
    if kind not in ("MonoCut", "MultiCut"):
        why = {"MixedCut": "it mixes several tracks, and the job reads one source per row",
               "PaddingCut": "it is silence with no recording"}.get(kind, "only MonoCuts and MultiCuts are read")
        raise ManifestError(f"{at} is a {kind}: {why}")
    rec = cut.get("recording")
    if not isinstance(rec, dict):
        raise ManifestError(f"{at} has no recording (a cut of features only?): the job embeds audio")
    sources = rec.get("sources")
    if not isinstance(sources, list) or len(sources) != 1:
        count = len(sources) if isinstance(sources, list) else 0
        raise ManifestError(f"{at}: its recording {rec.get('id')!r} has {count} sources; the job reads one file per row")
    source = sources[0]
    if not isinstance(source, dict) or source.get("type") not in SOURCE_TYPES:
        kind = source.get("type") if isinstance(source, dict) else source
        raise ManifestError(f"{at}: its recording's source is of type {kind!r}; the job reads {' or '.join(SOURCE_TYPES)} sources")
    if not isinstance(source.get("source"), str) or not source["source"]:
        raise ManifestError(f"{at}: its recording's source names no file")
    if rec.get("transforms"):
        names = [t.get("name") if isinstance(t, dict) else t for t in rec["transforms"]]
        raise ManifestError(f"{at}: its recording has transforms {names}; the job would embed the untransformed audio")
    channels = rec.get("channel_ids") or source.get("channels") or [0]
    wanted = cut.get("channel", 0)
    wanted = wanted if isinstance(wanted, list) else [wanted]
    if len(channels) > 1 and sorted(wanted) != sorted(channels):
        raise ManifestError(f"{at} takes channel(s) {wanted} of a recording with channels {channels}; "
                            f"the job averages every channel of a file")
    start, duration = cut.get("start"), cut.get("duration")
    for field, v in (("start", start), ("duration", duration)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ManifestError(f"{at}: {field} is {v!r}, expected seconds (a number >= 0)")
    texts = [s.get("text") for s in cut.get("supervisions") or [] if isinstance(s, dict) and s.get("text")]
    rate = rec.get("sampling_rate")
    return (cid, source["source"], float(start), float(start) + float(duration), float(duration), rec.get("id"),
            rate if isinstance(rate, int) and not isinstance(rate, bool) else None, " ".join(texts) if texts else None)
