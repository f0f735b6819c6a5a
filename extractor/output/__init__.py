"""The output stage: parts, failure records, recipe, markers and locks, on a disk or an object store.

    layout.py   what lives where, what is done, and the checks before a write
    storage.py  local directories and object stores: every file appears whole or not at all
    locks.py    one run per shard, however the last one died
    writer.py   the writer thread: finished rows → committed parts
"""
