"""Where shards run. An engine embeds a shard's pending rows (an Embed, run by the shard's
lifecycle, extractor.shard.ShardRun), or launches several shards' lifecycles.

    local.py    one shard in this process, with the signal handling a scheduler expects
    devices.py  one shard over every GPU of a host, one worker process per GPU, under one lock
    ray.py      every shard of the layout as a ShardRun on a Ray cluster's nodes

`--engine` takes a name of ENGINES, or `module:function`: a launcher of your own, called as
`function(opts, stop=..., seams=...)` and returning a Summary. An engine is one file
(tests/engines/halves.py is one); registering it here is one line.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ..errors import ConfigError

ENGINES = {"local": "extractor.engines.local:run_local", "ray": "extractor.engines.ray:run_ray"}


def engine_named(name: str) -> Callable:
    """The launcher `--engine name` names; ConfigError (exit 2) when there is none."""
    spec = ENGINES.get(name, name)
    module, _, function = spec.partition(":")
    if not module or not function:
        raise ConfigError(f"--engine {name!r}: expected one of {', '.join(ENGINES)}, or module:function")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"--engine {name!r}: cannot import {spec}: {e}") from e
