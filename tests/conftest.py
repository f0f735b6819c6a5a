"""Shared fixtures and the `gpu` marker.

Session fixtures are built once and shared: never modify their files (corrupt, delete, rewrite).
Tests that do should build their own with `build_checkpoint(tmp_path)` or `checkpoint_factory`.
"""

from __future__ import annotations

import pytest
import torch

from builders import build_adapter, build_checkpoint
from canonical import load_canonical


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped when torch.cuda.is_available() is False")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """checkpoint_factory(**build_checkpoint_kwargs) -> Path, built once per distinct kwargs."""
    cache = {}

    def make(**kwargs):
        key = tuple(sorted(kwargs.items()))
        if key not in cache:
            cache[key] = build_checkpoint(tmp_path_factory.mktemp("checkpoint"), **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_model(checkpoint_factory):
    """Default tiny checkpoint: d_model 64, 2 layers, 4 heads, sharded with an LM-only shard."""
    return checkpoint_factory()


@pytest.fixture(scope="session")
def adapter_factory(tmp_path_factory, tiny_model):
    """adapter_factory(layout, model_dir=tiny_model, **build_adapter_kwargs) -> Path, cached.

    layout is "tf5_full", "tf4_full" or "tower"; with equal seed/r the tower LoRA tensors are
    identical across layouts, so `load_canonical(model, tf5_full_adapter, "tf5_full")` is the
    reference for all three.
    """
    cache = {}

    def make(layout, model_dir=None, **kwargs):
        model_dir = tiny_model if model_dir is None else model_dir
        key = (layout, str(model_dir), tuple(sorted(kwargs.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"adapter_{layout}")
            cache[key] = build_adapter(out, model_dir, layout=layout, **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_adapter(adapter_factory):
    """tf5_full LoRA (r=4, alpha=8, seed=0, tower q/k/v only) for `tiny_model`."""
    return adapter_factory("tf5_full")


@pytest.fixture(scope="session")
def tiny_ref(tiny_model):
    """Canonical reference for `tiny_model`, no adapter."""
    return load_canonical(tiny_model)


@pytest.fixture(scope="session")
def tiny_ref_adapted(tiny_model, tiny_adapter):
    """Canonical reference for `tiny_model` with `tiny_adapter` applied unmerged."""
    return load_canonical(tiny_model, tiny_adapter, "tf5_full")
