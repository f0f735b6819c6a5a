"""Start-up work done ahead (model/ahead.py): the tower's bytes, and only those, read ahead."""

from __future__ import annotations

import subprocess
import sys

import torch
from safetensors import safe_open

from builders import LM_PREFIX, build_checkpoint
from extractor.model import ahead
from extractor.model.config import TOWER_PREFIX, coalesce, tower_files, tower_layout


def _tensor_bytes(path, key) -> bytes:
    with safe_open(path, framework="pt") as f:
        return f.get_tensor(key).contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()


def test_the_ranges_read_ahead_are_the_tower_tensors_bytes(tmp_path):
    # One file holding the tower, the projector and the language model, as Qwen2-Audio-7B's first shard.
    ckpt = build_checkpoint(tmp_path / "ckpt", single_file=True)
    (path,) = tower_files(ckpt)
    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
    tower = [k for k in keys if k.startswith(TOWER_PREFIX)]
    assert tower and any(k.startswith(LM_PREFIX) for k in keys)

    layout = tower_layout(path)
    assert sorted(layout) == sorted(tower)
    exact = [(lo, hi - lo) for lo, hi in coalesce([(a, b) for _, _, a, b in layout.values()], gap=0)]
    data = path.read_bytes()
    advised = b"".join(data[o:o + n] for o, n in exact)
    # Uncoalesced, the ranges hold the tower's tensors and nothing else.
    assert all(_tensor_bytes(path, k) in advised for k in tower)
    assert sum(n for _, n in exact) == sum(len(_tensor_bytes(path, k)) for k in tower)

    coalesced = [(lo, hi - lo) for lo, hi in coalesce([(a, b) for _, _, a, b in layout.values()])]
    assert len(coalesced) <= len(exact)
    for o, n in exact:  # every tower byte is still covered
        assert any(co <= o and o + n <= co + cn for co, cn in coalesced)


def test_read_ahead_of_a_sharded_checkpoint_reads_only_tower_ranges(tmp_path):
    ckpt = build_checkpoint(tmp_path / "ckpt")  # sharded, with language-model-only shards
    files = tower_files(ckpt)
    expected = sum(hi - lo for f in files for lo, hi in coalesce([(a, b) for _, _, a, b in tower_layout(f).values()]))
    assert ahead.read_tower(ckpt) == expected > 0
    every = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    assert expected < every


def test_a_broken_header_is_left_to_the_load(tmp_path):
    ckpt = build_checkpoint(tmp_path / "ckpt", single_file=True)
    (path,) = tower_files(ckpt)
    path.write_bytes(b"\xff" * 64)  # header size 2^64-1
    threads = ahead.start(ckpt, "cpu")  # logs at DEBUG, raises nothing
    for thread in threads:
        thread.join(120)
    assert len(threads) == 2 and not any(t.is_alive() for t in threads)


def test_the_thread_imports_the_models_stages_without_touching_a_cpu_device(tiny_model):
    code = ("import sys, extractor.model.ahead as a; [t.join(120) for t in a.start(sys.argv[1], 'cpu')]; "
            "print('extractor.model.load' in sys.modules, 'torch' in sys.modules and __import__('torch').cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_model)], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]
