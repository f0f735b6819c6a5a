"""The audio stage: sources → decode (mono, 16 kHz, 30 s windows) in isolated worker processes.

    sources.py  where a file's bytes come from (paths, URLs, bytes in the manifest), bounded
    decode.py   containers → downmix → resample → windows, streamed
    pool.py     the decode worker processes: a crash or a hang costs one file
"""
