"""Merge a PEFT LoRA adapter into the audio tower at load time, so inference pays nothing for it.

Three adapter key layouts exist in practice (shared/QWEN2_AUDIO.md):
    base_model.model.audio_tower.layers.N...        PeftModel over the full model, transformers 4
    base_model.model.model.audio_tower.layers.N...  PeftModel over the full model, transformers 5
    base_model.model.layers.N...                    PeftModel over the bare tower
They are mapped explicitly onto the bare tower's names. Keys outside the tower (the language
model's q/k/v) are dropped with a warning.

PEFT defines the merge, so its scaling rules (alpha / r, rsLoRA, rank and alpha patterns, DoRA)
are honoured. A plain LoRA adapter (the usual one) merges as W + scaling · B @ A, which is
applied at once, and PEFT's merge of the same tensors checks it. A GPU job runs that check in a
child process (PeftCheck): importing peft takes ~7 s, the longest step of start-up, and the first
batch need not wait for it; the writer does, before its first commit. Any other adapter is merged
by PEFT itself before the first batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import fingerprint

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
# Where the tower sits under PEFT_PREFIX in each layout, most specific first.
TOWER_PATHS = ("model.audio_tower.", "audio_tower.", "")
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
_LAYER_RE = re.compile(r"^layers\.(\d+)\.")


class AdapterError(Exception):
    """The adapter cannot be merged into this tower."""


@dataclass(frozen=True)
class MergeReport:
    modules: int
    parameters: int
    ignored_modules: int
    fingerprint: str
    description: str


def _read_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    st = adapter_dir / SAFETENSORS_FILE
    if st.exists():
        from safetensors.torch import load_file

        try:
            return load_file(st)
        except Exception as e:
            raise AdapterError(f"cannot read {st}: {e}") from e
    pkl = adapter_dir / PICKLE_FILE
    if pkl.exists():
        # Never unpickle freely: weights_only refuses anything but tensors and plain containers.
        try:
            return torch.load(pkl, map_location="cpu", weights_only=True)
        except Exception as e:
            raise AdapterError(f"refusing {pkl}: not loadable with torch.load(weights_only=True): {e}") from e
    raise AdapterError(f"{adapter_dir} has neither {SAFETENSORS_FILE} nor {PICKLE_FILE}")


def _tower_key(key: str) -> str | None:
    """The key relative to the bare tower, or None if it is outside the tower."""
    if not key.startswith(PEFT_PREFIX):
        raise AdapterError(f"adapter key {key!r} does not start with {PEFT_PREFIX!r}: not a PEFT adapter file")
    rest = key[len(PEFT_PREFIX):]
    for path in TOWER_PATHS:
        if rest.startswith(path) and _LAYER_RE.match(rest[len(path):]):
            return rest[len(path):]
    return None


def _module_of(key: str) -> str:
    # "layers.3.self_attn.q_proj.lora_A.weight" → "layers.3.self_attn.q_proj"
    return key.split(".lora_")[0]


def _tower_modules(state: dict[str, torch.Tensor]) -> list[str]:
    """The tower modules an adapter's tensors (keyed PEFT_PREFIX + tower key) target, sorted."""
    return sorted({_module_of(k[len(PEFT_PREFIX):]) for k in state})


def _target_shapes(encoder: nn.Module, modules: list[str]) -> dict[str, tuple[int, int]]:
    known = dict(encoder.named_modules())
    return {m: tuple(known[m].weight.shape) for m in modules}


def _strip_pattern(pattern: str) -> str:
    for path in TOWER_PATHS[:-1]:
        if pattern.startswith(path):
            return pattern[len(path):]
    return pattern


def read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor], int]:
    """(adapter_config, tower tensors keyed for the bare tower with PEFT's prefix, ignored module count)."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except FileNotFoundError as e:
        raise AdapterError(f"{adapter_dir} has no adapter_config.json: not a PEFT adapter directory") from e
    except (OSError, ValueError) as e:
        raise AdapterError(f"cannot read {cfg_path}: {e}") from e
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    tower, ignored = {}, set()
    for key, tensor in _read_tensors(adapter_dir).items():
        tk = _tower_key(key)
        if tk is None:
            ignored.add(_module_of(key))
        else:
            tower[PEFT_PREFIX + tk] = tensor
    return config, tower, len(ignored)


@dataclass
class Adapter:
    """An adapter read and checked against a tower, before any merge."""

    path: Path
    config: dict
    state: dict[str, torch.Tensor]  # PEFT_PREFIX + tower key → tensor
    modules: list[str]  # tower module names, sorted
    report: MergeReport


def read_for(encoder: nn.Module, adapter_dir: Path) -> Adapter:
    """Read the adapter, check it against `encoder`'s Linear layers and log what will be merged."""
    adapter_dir = Path(adapter_dir)
    config, state, ignored = read_adapter(adapter_dir)
    if ignored:
        logger.warning("LoRA: ignoring %d modules outside the audio tower (e.g. the language model's)", ignored)
    if not state:
        raise AdapterError(f"{adapter_dir}: no LoRA module matches the audio tower (keys checked against {TOWER_PATHS})")
    modules = _tower_modules(state)
    known = dict(encoder.named_modules())
    unknown = [m for m in modules if not isinstance(known.get(m), nn.Linear)]
    if unknown:
        raise AdapterError(f"{adapter_dir}: LoRA targets modules the tower does not have as Linear layers: {unknown[:5]}")

    parameters = sum(t.numel() for t in state.values())
    targeted = set(modules)
    kinds = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in known if n in targeted))  # model order: q, k, v
    layers = len({_LAYER_RE.match(m).group(1) for m in modules})
    if all(k.endswith("_proj") for k in kinds):
        names = "/".join(k.removesuffix("_proj") for k in kinds) + "_proj"
    else:
        names = "/".join(kinds)
    description = f"{len(modules)} modules ({names} × {layers} layers), {parameters:,} parameters"
    h = hashlib.sha256(fingerprint(state).encode())
    for key in ("r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern"):
        h.update(f"{key}={json.dumps(config.get(key), sort_keys=True)};".encode())
    report = MergeReport(len(modules), parameters, ignored, h.hexdigest(), description)
    logger.info("LoRA: %s", description)
    return Adapter(adapter_dir, config, state, modules, report)


# Config entries under which a LoRA merge is no longer W + (alpha / r) · B @ A, when set.
_NOT_PLAIN = ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "lora_bias", "layer_replication",
              "target_parameters", "use_qalora", "alora_invocation_tokens", "trainable_token_indices", "modules_to_save")


def _config_scaling(cfg: dict) -> float | None:
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if cfg.get("peft_type") != "LORA" or any(cfg.get(k) for k in _NOT_PLAIN) or cfg.get("bias", "none") != "none":
        return None
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0 or not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        return None
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def plain_config(adapter_dir: Path) -> bool:
    """Whether the adapter's config is plain LoRA (a quick look at adapter_config.json only)."""
    try:
        return _config_scaling(json.loads((Path(adapter_dir) / "adapter_config.json").read_text())) is not None
    except (OSError, ValueError, AttributeError):
        return False


def plain_scaling(adapter: Adapter) -> float | None:
    """PEFT's scaling when the adapter is plain LoRA, which merges as W + scaling · B @ A; None
    when PEFT has to merge it (DoRA, rank or alpha patterns, LoRA biases, anything else)."""
    scaling = _config_scaling(adapter.config)
    r = adapter.config.get("r")
    if scaling is None:
        return None
    for m in adapter.modules:
        a, b = adapter.state.get(f"{PEFT_PREFIX}{m}.lora_A.weight"), adapter.state.get(f"{PEFT_PREFIX}{m}.lora_B.weight")
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
            return None
    if len(adapter.state) != 2 * len(adapter.modules):
        return None  # tensors other than lora_A / lora_B (magnitude vectors, biases, embeddings)
    return scaling


def merge_plain(encoder: nn.Module, adapter: Adapter, scaling: float) -> None:
    """W += scaling · B @ A on the weights' device, in their dtype (float32): PEFT's own merge of a
    plain LoRA layer, operation for operation (peft.tuners.lora.layer.Linear.get_delta_weight)."""
    known = dict(encoder.named_modules())
    pairs = {m: (adapter.state[f"{PEFT_PREFIX}{m}.lora_A.weight"], adapter.state[f"{PEFT_PREFIX}{m}.lora_B.weight"]) for m in adapter.modules}
    for m, (a, b) in pairs.items():
        shape = tuple(known[m].weight.shape)
        if (b.shape[0], a.shape[1]) != shape:
            raise AdapterError(f"{adapter.path}: adapter tensors do not fit the tower: {m} is {shape}, its LoRA gives {(b.shape[0], a.shape[1])}")
    with torch.no_grad():
        for m, (a, b) in pairs.items():
            w = known[m].weight
            w += (b.to(w.device, w.dtype) @ a.to(w.device, w.dtype)) * scaling


def merge_with_peft(encoder: nn.Module, adapter: Adapter) -> nn.Module:
    """PEFT's get_peft_model + set_peft_model_state_dict + merge_and_unload on `encoder`."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    config = adapter.config
    lora_config = LoraConfig(
        **{k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__ and k not in ("target_modules", "modules_to_save", "layers_to_transform", "layers_pattern", "base_model_name_or_path", "task_type", "inference_mode", "peft_type", "rank_pattern", "alpha_pattern")},
        target_modules=adapter.modules,
        rank_pattern={_strip_pattern(k): v for k, v in (config.get("rank_pattern") or {}).items()},
        alpha_pattern={_strip_pattern(k): v for k, v in (config.get("alpha_pattern") or {}).items()},
    )
    peft_model = get_peft_model(encoder, lora_config)
    try:
        result = set_peft_model_state_dict(peft_model, adapter.state)
    except RuntimeError as e:  # size mismatch: an adapter trained on another tower shape
        raise AdapterError(f"{adapter.path}: adapter tensors do not fit the tower: {e}") from e
    missing_lora = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing_lora:
        raise AdapterError(
            f"{adapter.path}: adapter tensors do not fit the tower: unexpected {list(result.unexpected_keys)[:5]}, missing {missing_lora[:5]}"
        )
    return peft_model.merge_and_unload()


def check_with_peft(adapter: Adapter, shapes: dict[str, tuple[int, int]], scaling: float) -> float:
    """Check that PEFT merges `adapter` as merge_plain did: W + scaling · B @ A.

    PEFT's merge runs on zero-weight copies of the targeted Linear layers (on the host, in
    float32), which then hold PEFT's delta; each must equal scaling · B @ A. Returns the largest
    relative difference; raises AdapterError above 1e-5.
    """
    t = time.monotonic()
    skeleton = nn.Module()
    for name, (out_f, in_f) in shapes.items():
        parent = skeleton
        *path, leaf = name.split(".")
        for p in path:
            if not hasattr(parent, p):
                parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        linear = nn.Linear(in_f, out_f, bias=False, device="meta")
        linear.weight = nn.Parameter(torch.zeros(out_f, in_f))
        parent.add_module(leaf, linear)
    merged = dict(merge_with_peft(skeleton, adapter).named_modules())
    worst, where = 0.0, ""
    with torch.no_grad():
        for m in adapter.modules:
            a = adapter.state[f"{PEFT_PREFIX}{m}.lora_A.weight"].float()
            b = adapter.state[f"{PEFT_PREFIX}{m}.lora_B.weight"].float()
            ours = (b @ a) * scaling
            err = float((merged[m].weight - ours).abs().max() / ours.abs().max().clamp_min(1e-30))
            if err > worst:
                worst, where = err, m
    if worst > 1e-5:
        raise AdapterError(
            f"{adapter.path}: PEFT merges {where} differently from scaling · B @ A (relative difference "
            f"{worst:.2e}); nothing was written. This adapter's config is not plain LoRA in a way this "
            "job does not know: please report it"
        )
    logger.debug("LoRA: PEFT's merge checked in %.2f s (max relative difference %.1e)", time.monotonic() - t, worst)
    return worst


CHECK_TIMEOUT_S = 600.0  # the child imports torch and peft and merges on the host: seconds, not minutes


class PeftCheck:
    """check_with_peft in a child process, so that the job can start on merge_plain's weights.

    Importing peft (and transformers under it) takes ~7 s of the interpreter's lock; in a thread
    it slowed the device loop's first seconds, in a child it costs the job nothing. Whoever writes
    results calls wait() first (PartWriter, before its first commit): nothing is written from
    weights PEFT would not give.
    """

    def __init__(self, encoder: nn.Module, adapter: Adapter, scaling: float):
        self._adapter, self._scaling = adapter, scaling
        self._shapes = _target_shapes(encoder, adapter.modules)
        job = {"adapter": str(adapter.path), "scaling": scaling, "shapes": self._shapes}
        root = str(Path(__file__).resolve().parents[1])  # where `extractor` is importable from
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self._error: str | None = None
        self._done = self._killed = False
        self._proc: subprocess.Popen | None = None
        self._spawn_error = ""
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "extractor.lora", json.dumps(job)], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
        except OSError as e:
            self._spawn_error = str(e)

    def join(self) -> None:
        if self._done:
            return
        self._done = True
        lines, rc = [self._spawn_error], None
        if self._proc is not None:
            try:
                _, err = self._proc.communicate(timeout=CHECK_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                _, err = self._proc.communicate()
                err += f"\ntimed out after {CHECK_TIMEOUT_S:.0f} s"
            rc = self._proc.returncode
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        if rc == 0:
            logger.debug("%s", lines[-1] if lines else "LoRA: PEFT's check passed")
        elif rc == 3 and lines:  # the check ran and failed
            self._error = lines[-1]
        elif not self._killed:
            # The child could not run (an odd interpreter or environment) or hung: the check is
            # not optional, so it runs here instead, slower but the same.
            logger.warning("LoRA: the child process checking the merge failed (exit %s: %s); checking in this process",
                           rc, " | ".join(lines[-3:]))
            self._check_here()

    def _check_here(self) -> None:
        try:
            check_with_peft(self._adapter, self._shapes, self._scaling)
        except AdapterError as e:
            self._error = str(e)

    def close(self) -> None:
        """The run ends without having needed the check: stop it."""
        if not self._done:
            self._killed = True
            if self._proc is not None:
                self._proc.kill()
        self.join()

    def wait(self) -> None:
        """Block until the check is done; raise AdapterError if it failed."""
        self.join()
        if self._killed:  # stopped by close(), and needed after all (the model is used again)
            self._killed = False
            self._check_here()
        if self._error is not None:
            raise AdapterError(self._error)


def _check_main() -> int:
    """`python -m extractor.lora '{"adapter", "scaling", "shapes"}'`: PeftCheck's child."""
    from .workers import die_with_parent

    die_with_parent()
    torch.set_num_threads(1)  # a few small GEMMs; the decode workers need the cores more
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logger.setLevel(logging.DEBUG)  # this module's line for the parent's debug log
    job = json.loads(sys.argv[1])
    try:
        config, state, _ = read_adapter(Path(job["adapter"]))
        modules = _tower_modules(state)
        adapter = Adapter(Path(job["adapter"]), config, state, modules, MergeReport(len(modules), 0, 0, "", ""))
        check_with_peft(adapter, {m: tuple(v) for m, v in job["shapes"].items()}, float(job["scaling"]))
    except AdapterError as e:
        print(e, file=sys.stderr)
        return 3
    return 0


def merge_adapter(encoder: nn.Module, adapter_dir: Path, *, defer_check: bool = False) -> tuple[nn.Module, MergeReport, PeftCheck | None]:
    """Merge the adapter into `encoder` (float32 weights expected) and return the plain module.

    A plain LoRA adapter is merged at once as W + scaling · B @ A; PEFT's own merge of the same
    tensors checks it (PeftCheck: awaited here, or by the caller with defer_check). Any other
    adapter (DoRA, patterns, biases) is merged by PEFT itself, so its scaling rules are honoured.
    """
    adapter = read_for(encoder, adapter_dir)
    scaling = plain_scaling(adapter)
    if scaling is None:
        logger.debug("LoRA: not plain LoRA; merged by PEFT")
        return merge_with_peft(encoder, adapter), adapter.report, None
    merge_plain(encoder, adapter, scaling)
    if defer_check:
        return encoder, adapter.report, PeftCheck(encoder, adapter, scaling)
    check_with_peft(adapter, _target_shapes(encoder, adapter.modules), scaling)
    return encoder, adapter.report, None


if __name__ == "__main__":
    sys.exit(_check_main())
