"""Run hooks for the Ray tests: `EXTRACTOR_TEST_HOOK=tests.engines.ray_hooks:record`, HOOK_DIR set.

They run inside the processes that run shards (Ray workers, or whatever process calls run_shard),
so they import nothing from the test suite. Each leaves an empty file in HOOK_DIR whose name says
what happened where, for the test to read after the run:

    prepared-S-PID-NODE   shard S was read and checked by process PID on Ray node NODE
    commit-S-SEQ-PID-NODE part number SEQ of shard S was committed by process PID on node NODE

NODE is "none" outside a Ray worker (a driver, the local engine).
"""

from __future__ import annotations

import os
import sys

_shard: int | None = None  # the shard this process holds the lock of ("locked" comes before any commit)


def _node() -> str:
    ray = sys.modules.get("ray")  # a Ray worker has imported it; nothing else needs to
    if ray is None or not ray.is_initialized():
        return "none"
    return ray.get_runtime_context().get_node_id()


def _leave(name: str) -> None:
    open(os.path.join(os.environ["HOOK_DIR"], name), "w").close()


def record(point: str, **info) -> None:
    global _shard
    if point == "prepared":
        _leave(f"prepared-{info['shard']}-{os.getpid()}-{_node()}")
    elif point == "locked":
        _shard = info["shard"]
    elif point == "committed":
        _leave(f"commit-{_shard}-{info['seq']}-{os.getpid()}-{_node()}")
