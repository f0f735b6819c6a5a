"""The manifest: what to embed. Read and validated whole before anything is written.

    spec.py  the command line's description of it (which columns mean what)
    read.py  reading (Parquet, CSV, JSONL, lhotse cuts), validation, canonical types, sharding
"""
