"""What a run computes, frozen, saved beside the outputs and compared on resume."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from .version import __version__
from .constants import CHUNK_SECONDS, SAMPLE_RATE
from .pooling import POOLINGS

RECIPE_VERSION = 1
METADATA_KEY = b"qwen2_audio_embeddings.recipe"
# Fields that change the numbers: a resume into an output written with other values is refused.
# package_version is recorded but not compared, so a bug-fix release can finish a run.
NOT_COMPARED = ("package_version",)
# What an output written before a field existed computed, where that differs from the field's
# default: its recipe reads as that value, and a resume of it computes the same (an older output
# keeps decoding Ogg Opus with libsndfile: engines/local.py hands its decoder to the requests).
BEFORE_FIELD = {"opus_decoder": "libsndfile"}


@dataclass(frozen=True)
class Recipe:
    model_fingerprint: str
    adapter_fingerprint: str | None
    d_model: int
    padding_mask: bool
    dtype: str  # compute dtype on the device: float32 | bfloat16 | float16
    pooling: str = "mean"  # mean | none (per-frame output)
    output_dtype: str = "float32"
    gelu: str = "erf"  # erf (HF's exact GELU) | tanh-epilogue (fused into the GEMM; bf16/fp16 on CUDA)
    windowing: str = f"{CHUNK_SECONDS}s-consecutive-from-0"
    frame_pooling: str = "mean-of-valid-frames-over-all-windows"
    sample_rate: int = SAMPLE_RATE
    downmix: str = "channel-mean"  # of every channel of a file or a lhotse cut, as every output before the field
    # How Opus becomes samples (audio.decode.OPUS_DECODER): FFmpeg's libopus wrapper; outputs from
    # before this field decoded Ogg Opus with libsndfile (the same codec, another build: ~1 ulp apart).
    opus_decoder: str = "ffmpeg-libopus"
    recipe_version: int = RECIPE_VERSION
    package_version: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        names = {f.name for f in fields(cls)}
        return cls(**{**BEFORE_FIELD, **{k: v for k, v in d.items() if k in names}})

    def differences(self, other: "Recipe") -> list[str]:
        """Human-readable 'field: old → new' for each compared field that differs from `other`
        (what the output holds)."""
        return other.mismatches({f.name: getattr(self, f.name) for f in fields(self) if f.name not in NOT_COMPARED})

    def mismatches(self, values: dict) -> list[str]:
        """'field: old → new' for each of this run's `values` that differs from this recipe (the
        output's); also for what a run knows before its model is loaded."""
        return [f"{k}: {getattr(self, k)!r} (existing output) → {v!r} (this run)" for k, v in values.items() if getattr(self, k) != v]


def build_recipe(model, opts, *, opus_decoder: str | None = None) -> Recipe:
    """The recipe of a loaded model (model.load.LoadedModel) run with these options (and the Opus
    decoder its output keeps, where an older output's differs from today's)."""
    return Recipe(
        model_fingerprint=model.model_fingerprint,
        adapter_fingerprint=model.adapter.fingerprint if model.adapter else None,
        d_model=model.cfg.d_model,
        padding_mask=opts.padding_mask,
        dtype=str(model.dtype).removeprefix("torch."),
        pooling=opts.pooling,
        output_dtype=opts.output_dtype,
        gelu="tanh-epilogue" if model.encoder.fused_gelu else "erf",
        frame_pooling=POOLINGS[opts.pooling].recipe,
        **({"opus_decoder": opus_decoder} if opus_decoder else {}),
        package_version=__version__,
    )
