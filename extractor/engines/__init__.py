"""Where shards run. Each engine is a launcher of extractor.shard.run_shard, never a copy of it.

    local.py    one shard in this process, with the signal handling a scheduler expects
    devices.py  one shard over every GPU of a host, one worker process per GPU, under one lock
    ray.py      every shard of the layout as Ray tasks on a cluster's GPU nodes
"""
