"""A Ray cluster of two nodes on this machine, started once per test session (`ray_cluster`).

Ray's start-up is the slow part of its tests (193 s was once measured under load in CI, about 8 s on
a quiet 2-core machine), so it is paid once. Each node is a raylet of its own with its own workers,
like two hosts; what they share here and real hosts would not is the file system, so each node gets
its own Hugging Face cache (HF_HUB_CACHE in the node's environment, inherited by its workers), as
two machines have. The tests' drivers are processes that join it through RAY_ADDRESS.
"""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest

NODE_CPUS = 2  # one shard task each on CPU: one CPU for the encoder, one for its decode worker
OBJECT_STORE_BYTES = 80 * 1024**2  # a little above Ray's minimum (75 MiB); tasks return only summaries

logger = logging.getLogger(__name__)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """SimpleNamespace(address, nodes={"head": node id, "worker": node id}, hf_cache={same keys: Path}, start_s)."""
    ray = pytest.importorskip("ray", reason="--engine ray needs the optional extra: pip install '.[ray]'")
    from ray.cluster_utils import Cluster

    root = tmp_path_factory.mktemp("ray_nodes")
    caches = {name: root / name / "hf" for name in ("head", "worker")}
    common = dict(num_cpus=NODE_CPUS, object_store_memory=OBJECT_STORE_BYTES)
    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args=dict(include_dashboard=False, env_vars={"HF_HUB_CACHE": str(caches["head"])},
                                                                 **common))
    try:
        worker = cluster.add_node(env_vars={"HF_HUB_CACHE": str(caches["worker"])}, **common)
        cluster.wait_for_nodes()
        start_s = time.monotonic() - t0
        logger.warning("ray_cluster: two nodes started in %.1f s", start_s)  # shown with -rA: the figure the issue asks for
        yield SimpleNamespace(address=cluster.address, nodes={"head": cluster.head_node.node_id, "worker": worker.node_id},
                              hf_cache=caches, start_s=start_s)
    finally:
        cluster.shutdown()
        if ray.is_initialized():
            ray.shutdown()
