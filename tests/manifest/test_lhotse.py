"""lhotse cut manifests, read without lhotse. lhotse itself (a test dependency only) writes the
cuts of these tests where it can; the rest are written by hand in its format."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from builders import speechlike, write_audio
from extractor.manifest import ManifestError, ManifestSpec, read_manifest
from extractor.recipe import METADATA_KEY

from .runs import embeddings, run_job

SR = 16_000


def write_cuts(path, cuts: list[dict]):
    with gzip.open(path, "wt") as f:
        for c in cuts:
            f.write(json.dumps(c) + "\n")
    return path


def mono_cut(cid: str, source: str, *, start=0.0, duration=1.0, channel=0, sources=None, **recording) -> dict:
    """A MonoCut as lhotse's `to_dict` writes it."""
    rec = {"id": f"rec-{cid}", "sources": sources or [{"type": "file", "channels": [0], "source": source}], "sampling_rate": SR,
           "num_samples": int(2 * SR), "duration": 2.0, "channel_ids": [0], **recording}
    return {"id": cid, "start": start, "duration": duration, "channel": channel, "supervisions": [], "recording": rec, "type": "MonoCut"}


def test_lhotse_cuts_become_rows_and_segments_embed_like_parquet_segments(clips, model, tmp_path):
    lhotse = pytest.importorskip("lhotse")
    recordings = [lhotse.Recording.from_file(str(p), recording_id=f"r{i}") for i, p in enumerate(clips[:3])]
    whole = [r.to_cut() for r in recordings[:2]]
    part = recordings[2].to_cut().truncate(offset=0.25, duration=0.5)
    part = part.with_id("r2-part")
    part.supervisions = [lhotse.SupervisionSegment("s", "r2", 0.25, 0.5, text="hello"),
                         lhotse.SupervisionSegment("s2", "r2", 0.5, 0.25, text="there")]
    cuts = tmp_path / "cuts.jsonl.gz"
    lhotse.CutSet.from_cuts([*whole, part]).to_file(cuts)

    m = read_manifest(ManifestSpec(str(cuts), keep_columns=("recording_id", "text")))
    assert m.rows["id"].to_list() == ["r0", "r1", "r2-part"]
    assert m.rows["path"].to_list() == [str(p) for p in clips[:3]]
    assert m.rows["start_s"].to_list() == [0.0, 0.0, 0.25] and m.rows["end_s"].to_list() == [c.duration for c in whole] + [0.75]
    assert m.rows["text"].to_list() == [None, None, "hello there"]

    out = tmp_path / "out"
    code, log = run_job(cuts, out, model, "--keep-columns", "recording_id,text")
    assert code == 0 and "3 embedded, 0 failed" in log, log
    got = embeddings(out)
    assert got.column("recording_id").to_pylist() == ["r0", "r1", "r2"]
    # The same segment given as a Parquet manifest of paths with start/end columns: bit-identical.
    pq.write_table(pa.table({"id": ["r2-part"], "path": [str(clips[2])], "start": [0.25], "end": [0.75]}), tmp_path / "seg.parquet")
    code, log = run_job(tmp_path / "seg.parquet", tmp_path / "seg", model, "--id-column", "id", "--start-column", "start", "--end-column", "end")
    assert code == 0, log
    assert embeddings(tmp_path / "seg").column("embedding").equals(got.filter(pa.compute.equal(got.column("id"), "r2-part")).column("embedding"))


def _lhotse_made(tmp_path) -> dict[str, dict]:
    """Cuts lhotse makes that the job cannot honour."""
    lhotse = pytest.importorskip("lhotse")
    mono = write_audio(tmp_path / "mono.wav", speechlike(1.0, SR, seed=1), SR)
    stereo = write_audio(tmp_path / "stereo.wav", np.stack([speechlike(1.0, SR, seed=2), speechlike(1.0, SR, seed=3)], 1), SR)
    quad = write_audio(tmp_path / "quad.wav", np.stack([speechlike(1.0, SR, seed=c) for c in range(4)], 1), SR)
    cut = lhotse.Recording.from_file(str(mono), recording_id="m").to_cut()
    stereo_rec = lhotse.Recording.from_file(str(stereo), recording_id="s")
    quad_rec = lhotse.Recording.from_file(str(quad), recording_id="q")
    return {
        "MultiCut_of_two_of_four": lhotse.MultiCut("two", 0.0, 1.0, channel=[0, 1], recording=quad_rec).to_dict(),
        "MixedCut": cut.pad(duration=2.0).to_dict(),
        "one_channel": lhotse.MonoCut("left", 0.0, 1.0, channel=0, recording=stereo_rec).to_dict(),
        "speed": cut.perturb_speed(1.1).to_dict(),
    }


@pytest.mark.parametrize("case,says", [
    ("MultiCut_of_two_of_four", "takes channel(s) [0, 1] of a recording with channels [0, 1, 2, 3]; the job averages every channel of a file"),
    ("MixedCut", "is a MixedCut: it mixes several tracks"),
    ("one_channel", "takes channel(s) [0] of a recording with channels [0, 1]; the job averages every channel"),
    ("speed", "its recording has transforms ['Speed']"),
])
def test_cuts_lhotse_makes_that_cannot_be_honoured_are_refused_naming_the_cut(case, says, tmp_path):
    cut = _lhotse_made(tmp_path)[case]
    cuts = write_cuts(tmp_path / "cuts.jsonl.gz", [mono_cut("fine", "/a.wav"), cut])
    with pytest.raises(ManifestError) as e:
        read_manifest(ManifestSpec(str(cuts)))
    assert says in str(e.value) and f"line 2, cut {cut['id']!r}" in str(e.value)


def test_multichannel_cuts_embed_as_their_files_downmixed_and_the_recipe_says_so(model, tmp_path):
    """A MultiCut of every channel of a stereo recording (what lhotse makes of a stereo file), whole
    or a segment of it: the same vector, bit for bit, as the file and the segment given by path."""
    lhotse = pytest.importorskip("lhotse")
    stereo = write_audio(tmp_path / "stereo.wav", np.stack([speechlike(1.5, SR, seed=7), 0.3 * speechlike(1.5, SR, seed=8)], 1), SR)
    whole = lhotse.Recording.from_file(str(stereo), recording_id="st").to_cut()
    assert type(whole).__name__ == "MultiCut" and whole.channel == [0, 1]
    part = whole.truncate(offset=0.25, duration=0.75).with_id("st-part")
    cuts = tmp_path / "cuts.jsonl.gz"
    lhotse.CutSet.from_cuts([whole, part]).to_file(cuts)
    code, log = run_job(cuts, tmp_path / "out", model)
    assert code == 0 and "2 embedded, 0 failed" in log, log

    pq.write_table(pa.table({"id": ["st", "st-part"], "path": [str(stereo)] * 2, "start": [None, 0.25], "end": [None, 1.0]}),
                   tmp_path / "paths.parquet")
    code, log = run_job(tmp_path / "paths.parquet", tmp_path / "paths", model, "--id-column", "id", "--start-column", "start",
                        "--end-column", "end")
    assert code == 0, log
    got, want = embeddings(tmp_path / "out"), embeddings(tmp_path / "paths")
    assert got.column("id").to_pylist() == ["st", "st-part"]
    assert got.column("embedding").equals(want.column("embedding"))
    assert json.loads((tmp_path / "out" / "_run.json").read_text())["recipe"]["downmix"] == "channel-mean"


def test_an_output_from_before_the_downmix_field_resumes(model, clips, tmp_path):
    """Its recipe lacks `downmix` and reads as the channel mean it computed: new rows are added.
    One that also lacks `opus_decoder` decoded Ogg Opus with libsndfile, and a resume keeps
    decoding it so: its new parts say so, and nothing is refused."""
    out = tmp_path / "out"
    write_cuts(tmp_path / "one-cuts.jsonl.gz", [mono_cut("a", str(clips[0]), duration=0.4)])
    assert run_job(tmp_path / "one-cuts.jsonl.gz", out, model)[0] == 0
    run_file = out / "_run.json"
    run = json.loads(run_file.read_text())
    del run["recipe"]["downmix"]
    run_file.write_text(json.dumps(run))
    write_cuts(tmp_path / "two-cuts.jsonl.gz", [mono_cut("a", str(clips[0]), duration=0.4), mono_cut("b", str(clips[1]), duration=0.5)])
    code, log = run_job(tmp_path / "two-cuts.jsonl.gz", out, model)
    assert code == 0 and "1 embedded, 0 failed" in log, log

    old = tmp_path / "old"  # an output from before both fields: its _run.json and its parts' recipes lack them
    assert run_job(tmp_path / "one-cuts.jsonl.gz", old, model)[0] == 0
    for path in [old / "_run.json", *(old / "embeddings").glob("*.parquet"), *(old / "_failures").glob("*.parquet")]:
        if path.suffix == ".json":
            run = json.loads(path.read_text())
            for field in ("downmix", "opus_decoder"):
                del run["recipe"][field]
            path.write_text(json.dumps(run))
        else:
            table = pq.read_table(path)
            recipe = json.loads(table.schema.metadata[METADATA_KEY])
            for field in ("downmix", "opus_decoder"):
                del recipe[field]
            pq.write_table(table.replace_schema_metadata({**table.schema.metadata, METADATA_KEY: json.dumps(recipe).encode()}), path)
    write_cuts(tmp_path / "three-cuts.jsonl.gz", [mono_cut(c, str(clips[i]), duration=0.4) for i, c in enumerate("abc")])
    code, log = run_job(tmp_path / "three-cuts.jsonl.gz", old, model)
    assert code == 0 and "2 embedded, 0 failed" in log, log
    recipes = [json.loads(pq.read_schema(p).metadata[METADATA_KEY]) for p in (old / "embeddings").glob("*.parquet")]
    assert [r.get("opus_decoder") for r in recipes].count("libsndfile") == 1 and len(recipes) == 2  # the old part, and the resume's


@pytest.mark.parametrize("case,says", [
    ("several_sources", "has 2 sources; the job reads one file per row"),
    ("memory", "source is of type 'memory'"),
    ("command", "source is of type 'command'"),
    ("no_recording", "has no recording"),
    ("bad_duration", "duration is 'long', expected seconds"),
])
def test_hand_written_cuts_that_cannot_be_honoured_are_refused(case, says, model, tmp_path):
    two = [{"type": "file", "channels": [0], "source": "/a.wav"}, {"type": "file", "channels": [1], "source": "/b.wav"}]
    cut = {
        "several_sources": mono_cut("bad", "/a.wav", sources=two),
        "memory": mono_cut("bad", "", sources=[{"type": "memory", "channels": [0], "source": "UklGRg=="}]),
        "command": mono_cut("bad", "", sources=[{"type": "command", "channels": [0], "source": "sox a.flac -t wav -"}]),
        "no_recording": {"id": "bad", "start": 0, "duration": 1, "channel": 0, "features": {}, "type": "MonoCut"},
        "bad_duration": mono_cut("bad", "/a.wav", duration="long"),
    }[case]
    cuts = write_cuts(tmp_path / "cuts.jsonl.gz", [mono_cut("fine", "/a.wav"), cut])
    out = tmp_path / "out"
    code, log = run_job(cuts, out, model)
    assert code == 2 and says in log and "line 2, cut 'bad'" in log, log
    assert not out.exists()


def test_lhotse_rows_come_from_the_cuts_not_from_column_flags(tmp_path):
    cuts = write_cuts(tmp_path / "cuts.jsonl.gz", [mono_cut("a", "/a.wav"), mono_cut("a", "/b.wav")])
    with pytest.raises(ManifestError, match="drop --id-column"):
        read_manifest(ManifestSpec(str(cuts), id_column="id"))
    with pytest.raises(ManifestError, match="duplicate id"):
        read_manifest(ManifestSpec(str(cuts)))
    with pytest.raises(ManifestError, match=r"lacks column\(s\) \['speaker'\].*a lhotse row has id, path, start, end"):
        read_manifest(ManifestSpec(str(tmp_path / "cuts.jsonl.gz"), keep_columns=("speaker",)))
