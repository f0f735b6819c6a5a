"""The batching stage: windows → packed batches under a token budget → the device → pooled rows.

    packing.py  windows sorted and packed into batches, with every index the device needs
    device.py   the device loop: one batch in flight, pinned copies, out-of-memory back-off
    pooling.py  window outputs → one embedding (and frames) per row
"""
