"""The audio stage: sources → decode (mono, 16 kHz, 30 s windows) in isolated worker processes.

    sources.py  where a file's bytes come from (paths, URLs, bytes in the manifest), bounded
    decode.py   containers → downmix → resample → windows, streamed (files and the API's arrays)
    pcm.py      integer PCM scaling, the channel-mean downmix and its checks: every decoder's blocks
    mp3.py      an MP3's declared length (Xing/Info, VBRI)
    pool.py     the decode worker processes: a crash or a hang costs one file
"""
