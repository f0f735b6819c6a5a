"""The Python API (extractor.api.Embedder): what it takes (paths, arrays at any rate, integer PCM,
stereo, `datasets` dicts and columns), that each embeds as the job's decode of the same samples in
a file does, and that it refuses what the job refuses, naming the input."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from builders import speak, speechlike, write_audio
from canonical import canonical_embedding, cosine
from extractor.api import Embedder
from extractor.audio.decode import DecodeRequest, FileJob, decode_request
from extractor.audio.errors import AudioError, DecodeError, TooLongError, TooShort
from extractor.constants import SAMPLE_RATE


@pytest.fixture(scope="module")
def embedder(tiny_model, tiny_adapter) -> Embedder:
    return Embedder(tiny_model, tiny_adapter, device="cpu", dtype="float32")


def job_decode(path) -> np.ndarray:
    """The job's worker decode of a whole file (decode_request), its windows joined."""
    blocks = list(decode_request(DecodeRequest((FileJob(str(path), (0,), ((None, None),)),))))
    assert [b.done for b in blocks if b.done] and not any(b.failed for b in blocks)
    return np.concatenate([b.samples for b in blocks])


def float_wav(path, x: np.ndarray, rate: int):
    sf.write(str(path), x, rate, subtype="FLOAT")  # the samples exactly, as libsndfile will read them
    return path


@pytest.mark.parametrize("rate", [8_000, 22_050, 44_100, 48_000])
def test_an_array_at_any_rate_embeds_as_the_job_decodes_it_in_a_file(embedder, tiny_ref_adapted, tmp_path, rate):
    x = speechlike(2.3, rate, seed=rate)
    path = float_wav(tmp_path / "x.wav", x, rate)
    got = embedder.embed(x, sample_rate=rate)
    np.testing.assert_array_equal(got, embedder.embed(str(path)))  # the same decode, bit for bit
    reference = canonical_embedding(tiny_ref_adapted, job_decode(path))  # the job's decode, the canonical tower
    assert got.shape == (embedder.d_model,) and cosine(got, reference) > 0.99999
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-5)


def test_stereo_arrays_are_downmixed_as_files_are(embedder, tiny_ref_adapted, tmp_path):
    x = np.stack([speechlike(1.7, 44_100, seed=1), 0.5 * speechlike(1.7, 44_100, seed=2)], axis=1)
    path = float_wav(tmp_path / "stereo.wav", x, 44_100)
    got = embedder.embed(x, sample_rate=44_100)
    np.testing.assert_array_equal(got, embedder.embed(path))
    assert cosine(got, canonical_embedding(tiny_ref_adapted, job_decode(path))) > 0.99999
    # ... and it is the channels' mean, not one channel.
    assert cosine(got, embedder.embed(np.ascontiguousarray(x[:, 0]), sample_rate=44_100)) < 0.9999


@pytest.mark.parametrize("dtype", ["int16", "int32", "uint8"])
def test_integer_pcm_is_scaled_as_the_decoders_scale_it(embedder, tmp_path, dtype):
    x = speechlike(1.5, 16_000, seed=3)
    info = np.iinfo(dtype)
    pcm = np.round(x * info.max * 0.9 + (0 if info.min < 0 else 128)).astype(dtype)
    # The float equivalent, as libsndfile and FFmpeg's integer formats give it: / 2^(bits-1).
    centred = pcm.astype(np.float64) - (0 if info.min < 0 else 128)
    as_float = (centred / 2 ** (info.bits - 1)).astype(np.float32)
    got = embedder.embed(pcm, sample_rate=16_000)
    np.testing.assert_array_equal(got, embedder.embed(as_float, sample_rate=16_000))
    if dtype == "int16":  # the same samples in a 16-bit WAV, through the job's decode
        path = tmp_path / "pcm16.wav"
        sf.write(str(path), pcm, 16_000, subtype="PCM_16")
        np.testing.assert_array_equal(got, embedder.embed(path))


def test_one_path_a_list_of_paths_dicts_and_mixed_lists(embedder, tmp_path):
    a = write_audio(tmp_path / "a.flac", speechlike(1.2, 16_000, seed=4), 16_000)
    b = write_audio(tmp_path / "b.wav", speechlike(0.8, 22_050, seed=5), 22_050)
    both = embedder.embed([str(a), b])
    assert both.shape == (2, embedder.d_model)
    one = embedder.embed(str(a))  # a string is one path, not 60 characters
    assert one.shape == (embedder.d_model,)
    np.testing.assert_array_equal(one, both[0])
    y, rate = sf.read(str(b), dtype="float32")
    mixed = embedder.embed([{"array": y, "sampling_rate": rate}, str(a), y], sample_rate=rate)
    np.testing.assert_array_equal(mixed, np.stack([both[1], both[0], both[1]]))
    raw = {"bytes": a.read_bytes(), "path": "a.flac"}  # datasets' Audio(decode=False): the job's decoder reads the bytes
    np.testing.assert_array_equal(embedder.embed(raw), both[0])
    assert embedder.embed([]).shape == (0, embedder.d_model)


def test_a_datasets_map_gives_the_vectors_of_embed(embedder, tmp_path):
    datasets = pytest.importorskip("datasets")
    paths = [str(write_audio(tmp_path / f"c{i}.wav", speechlike(0.6 + 0.3 * i, 16_000, seed=10 + i), 16_000)) for i in range(3)]
    audio = datasets.Dataset.from_dict({"audio": paths, "id": ["a", "b", "c"]}).cast_column("audio", datasets.Audio(decode=False))
    out = audio.map(embedder.map_batch, batched=True, batch_size=2)
    want = embedder.embed(paths)
    np.testing.assert_array_equal(np.array(out["embedding"], dtype=np.float32), want)
    assert out["id"] == ["a", "b", "c"]

    # Plain {"array", "sampling_rate"} dicts, as a decoded column gives them, under another name.
    arrays = [sf.read(p, dtype="float32")[0] for p in paths]
    plain = datasets.Dataset.from_dict({"speech": [{"array": x, "sampling_rate": 16_000} for x in arrays]})
    out = plain.map(embedder.map_batch, batched=True, batch_size=2, fn_kwargs={"audio_column": "speech"})
    np.testing.assert_array_equal(np.array(out["embedding"], dtype=np.float32), want)


REFUSALS = ["nan", "inf", "absurd", "no_rate", "dict_without_rate", "dict_of_nothing", "rate_1_hz", "fractional_rate",
            "list_of_ints", "channels_first", "three_dims", "too_short", "too_long", "missing_file"]


def refusal(case: str, tmp_path) -> tuple:
    """(what embed is given, its keywords, the error's type, words of its message)."""
    ok = speechlike(1.0, 16_000, seed=6)
    rate = {"sample_rate": 16_000}
    if case == "nan":
        bad = ok.copy()
        bad[8000] = np.nan
        return [ok, bad], rate, DecodeError, "cannot decode input 1: NaN samples (first at 0.500 s)"
    if case == "inf":
        bad = ok.copy()
        bad[100] = np.inf
        return bad, rate, DecodeError, "cannot decode input 0: Inf samples (first at 0.006 s)"
    if case == "absurd":
        return ok * 1e6, rate, DecodeError, "cannot decode input 0: implausible sample value"
    if case == "no_rate":
        fine = str(write_audio(tmp_path / "fine.wav", ok, 16_000))
        return [fine, ok], {}, ValueError, "input 1: an array needs its sample rate: pass sample_rate="
    if case == "dict_without_rate":
        return {"array": ok}, {}, ValueError, "input 0: a dict with an 'array' needs its 'sampling_rate'"
    if case == "dict_of_nothing":
        return {"text": "hi"}, {}, ValueError, "input 0: a dict must hold 'array' and 'sampling_rate', or 'bytes' or 'path'"
    if case == "rate_1_hz":
        return ok, {"sample_rate": 1}, DecodeError, "cannot decode input 0: implausible sample rate 1 Hz"
    if case == "fractional_rate":
        return ok, {"sample_rate": 22_050.5}, ValueError, "input 0: sample rate 22050.5 is not a whole number of Hz"
    if case == "list_of_ints":  # a Python list of ints is int64: its scale is unknowable
        return {"array": [0, 100, -100] * 4000, "sampling_rate": 16_000}, {}, TypeError, "input 0: expected float samples or integer PCM"
    if case == "channels_first":
        return np.stack([ok, ok]), rate, ValueError, "(transpose a (channels, samples) array)"
    if case == "three_dims":
        return ok.reshape(10, 100, 16), rate, ValueError, "input 0: expected (samples,) or (samples, channels)"
    if case == "too_short":
        return ok[:200], rate, TooShort, "input 0 is too short (12.5 ms) for one output frame"
    if case == "too_long":
        return np.tile(ok, 4), rate, TooLongError, "input 0 is longer than max_duration_s=3"
    if case == "missing_file":
        return str(tmp_path / "nowhere.wav"), {}, AudioError, f"cannot read {tmp_path / 'nowhere.wav'}: not found"
    raise AssertionError(case)


@pytest.fixture(scope="module")
def capped(tiny_model, tiny_adapter) -> Embedder:
    return Embedder(tiny_model, tiny_adapter, device="cpu", dtype="float32", max_duration_s=3.0)


@pytest.mark.parametrize("case", REFUSALS)
def test_what_the_job_refuses_is_refused_naming_the_input(capped, tmp_path, case):
    inputs, kwargs, kind, words = refusal(case, tmp_path)
    with pytest.raises(kind) as info:
        capped.embed(inputs, **kwargs)
    assert words in str(info.value), str(info.value)


def test_datasets_fingerprints_the_map_by_the_weights_not_by_pickling_them(embedder, tiny_model, tiny_adapter, adapter_factory):
    """datasets hashes map's function (and pickles it for num_proc workers): the Embedder pickles
    as where its weights are and their fingerprints, and loads them again when unpickled."""
    import pickle

    hasher = pytest.importorskip("datasets.fingerprint").Hasher
    assert len(pickle.dumps(embedder)) < 10_000
    again = pickle.loads(pickle.dumps(embedder))
    x = speechlike(0.7, 16_000, seed=20)
    np.testing.assert_array_equal(again.embed(x, sample_rate=16_000), embedder.embed(x, sample_rate=16_000))
    assert hasher.hash(again.map_batch) == hasher.hash(embedder.map_batch)
    other = Embedder(tiny_model, adapter_factory("tf5_full", seed=1), device="cpu", dtype="float32")
    assert hasher.hash(other.map_batch) != hasher.hash(embedder.map_batch)
