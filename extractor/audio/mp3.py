"""How long an MP3 says it is: the Xing/Info or VBRI header of its first frame (issue 12).

An MP3 is a bare sequence of frames with no container and no length field. A decoder that meets
the end of the data simply stops (and junk it may skip, stop at, or fail on): a file cut off by a
broken download decodes "successfully" into a shorter signal. libsndfile (mpg123) gives no sign.
Most MP3s written since ~2000 carry an info header in their first frame, which is itself a silent
frame that decoders skip:

- Xing / Info (LAME, FFmpeg, libsndfile, iTunes, ...): the number of audio frames after it, at the
  side-information offset of the first frame. LAME (and FFmpeg's "Lavf"/"Lavc") append a tag with
  the encoder delay and padding, which a gapless decoder (mpg123 does this) trims, so the decoded
  length is exactly `frames * samples_per_frame - delay - padding`.
- VBRI (Fraunhofer encoders): the same count 32 bytes after the frame header; no gapless data.

`declared_length` reads that header; decode.py compares it with what was decoded and fails the
file as truncated when the decode comes up more than one frame short (see `Mp3Length.is_short`
for the tolerance). libsndfile stops reading at its own idea of the length: the Xing/Info
count when there is one, else a guess from the file size and the first frame's bitrate (mpg123
does not read VBRI). The guess holds for constant bitrate; for a VBR file it was 28% of the
length (measured). So decode.py leaves to FFmpeg, which reads to the end of the stream, the MP3s
with a VBRI header and those without a header whose bitrate varies (`variable_bitrate`). Not the
constant-bitrate ones: FFmpeg fails on trailing junk (Lyrics3 tags, garbage after the last frame),
which libsndfile reads past.

What cannot be known without such a header (a constant-bitrate MP3 from an old encoder, a
stream capture, a file whose first frame was cut off): the intended length. A file cut at a frame
boundary, or after junk that the decoder skips, looks exactly like a shorter file (FFmpeg reports
some cuts inside a frame, not all). Also undetectable with a header: audio *after* the declared
frames (two MP3s concatenated; mpg123 stops at the declared count), a loss of less than one frame
(26 ms at 44.1 kHz), junk that still parses as frames (decoded as noise of the right length), and
any MP3 streamed from a server without byte ranges once it is too long to spool
(sources.SPOOL_MAX_BYTES): its first frame is gone by the time FFmpeg has opened it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

__all__ = ["Mp3Length", "declared_length", "variable_bitrate"]

ReadAt = Callable[[int, int], bytes]  # (offset, size) -> up to `size` bytes of the file at `offset`

ID3V2_HEADER_BYTES = 10
ID3V2_FOOTER_BYTES = 10  # present when flag 0x10 is set
# How far past the ID3v2 tag(s) the first frame is looked for: encoders write it right after the
# tag; a few KB of padding or junk is tolerated, as decoders resync over it.
SYNC_SEARCH_BYTES = 64 << 10
# The longest layer III frame: MPEG-1 at 320 kbit/s and 32 kHz, 144000 * 320 / 32000 + 1 bytes.
# Free-format frames may be longer, but their info header still sits at the start.
MAX_FRAME_BYTES = 1441 + 4
VBRI_OFFSET = 4 + 32  # "VBRI" follows the 4-byte frame header by 32 bytes, whatever the mode
LAME_DELAY_OFFSET = 21  # delay and padding (12 bits each) within the LAME tag
LAME_ENCODERS = (b"LAME", b"Lavf", b"Lavc")  # tags in LAME's layout (FFmpeg's checks these too)
MAX_GAPLESS_SAMPLES = 4095  # 12 bits each for the encoder delay and the padding

_VERSIONS = {0b00: "2.5", 0b10: "2", 0b11: "1"}  # 0b01 is reserved
_RATES = {"1": (44100, 48000, 32000), "2": (22050, 24000, 16000), "2.5": (11025, 12000, 8000)}
_KBPS = {  # layer III, bitrate index 1..14 (0 is free format, 15 invalid)
    "1": (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    "2": (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_KBPS["2.5"] = _KBPS["2"]


@dataclass(frozen=True)
class Mp3Length:
    """The length an MP3's info header declares, in samples per channel at `sample_rate`."""

    samples: int
    sample_rate: int
    frames: int  # audio frames after the info frame
    samples_per_frame: int  # 1152 (MPEG-1) or 576 (MPEG-2/2.5)
    header: str  # "Xing", "Info" or "VBRI"
    gapless: bool  # delay and padding came from a LAME tag and are subtracted from `samples`

    @property
    def seconds(self) -> float:
        return self.samples / self.sample_rate

    def is_short(self, decoded: int) -> bool:
        """Whether `decoded` samples fall short of the declared length by more than one frame.

        One frame of slack: encoders disagree on whether the count includes the info frame, and
        a decoder without gapless support keeps or drops the 529-sample decoder delay; both stay
        under one frame. A loss that small (26 ms at 44.1 kHz) is harmless; real truncations
        (a broken download, junk the decoder stops at) lose far more.
        """
        return decoded < self.samples - self.samples_per_frame

    def shortfall(self, decoded: int) -> str:
        """What a DecodeError says of a decode that `is_short`."""
        return (f"truncated MP3: its {self.header} header declares {self.seconds:.3f} s ({self.samples} samples), "
                f"only {decoded / self.sample_rate:.3f} s ({decoded}) decode")


@dataclass(frozen=True)
class _Frame:
    version: str
    sample_rate: int
    samples_per_frame: int
    side_info: int  # bytes of side information after the 4-byte header (and its CRC, if any)
    length: int | None  # bytes, None for free format
    crc: bool


def declared_length(read_at: ReadAt) -> Mp3Length | None:
    """The length that the first frame's Xing/Info or VBRI header declares; None without one.

    `read_at(offset, size)` reads the file; a short or failed read makes this return None.
    """
    found = _first_frame(read_at)
    if found is None:
        return None
    window, i, frame = found
    return _info_header(window[i : i + MAX_FRAME_BYTES], frame)


def variable_bitrate(read_at: ReadAt) -> bool:
    """Whether the frames in the first SYNC_SEARCH_BYTES differ in bitrate: a VBR stream, whose
    length cannot be guessed from the file size when it has no info header."""
    found = _first_frame(read_at)
    if found is None:
        return False
    window, i, _ = found
    bitrates = set()
    while (frame := _parse_header(window[i : i + 4])) is not None and frame.length is not None:
        bitrates.add(window[i + 2] >> 4)
        i += frame.length
    return len(bitrates) > 1


def _first_frame(read_at: ReadAt) -> tuple[bytes, int, _Frame] | None:
    """(the bytes after any ID3v2 tag, the offset in them of the first frame, that frame)."""
    start = _skip_id3v2(read_at)
    if start is None:
        return None
    window = read_at(start, SYNC_SEARCH_BYTES + MAX_FRAME_BYTES)
    for i in range(min(len(window), SYNC_SEARCH_BYTES)):
        if window[i] != 0xFF:
            continue
        frame = _parse_header(window[i : i + 4])
        if frame is None:
            continue
        # A real first frame holds an info header or is followed by another frame; a false sync
        # (0xFF in junk) is neither, and the search goes on.
        if _info_header(window[i : i + MAX_FRAME_BYTES], frame) is not None:
            return window, i, frame
        if frame.length is not None and _parse_header(window[i + frame.length : i + frame.length + 4]) is not None:
            return window, i, frame
    return None


def _skip_id3v2(read_at: ReadAt) -> int | None:
    """Offset just past the ID3v2 tag(s) at the start of the file (some files carry several)."""
    pos = 0
    for _ in range(16):
        head = read_at(pos, ID3V2_HEADER_BYTES)
        if len(head) < ID3V2_HEADER_BYTES:
            return None
        if head[:3] != b"ID3":
            return pos
        size_bytes = head[6:10]
        if any(b & 0x80 for b in size_bytes):
            return None  # not a syncsafe integer: not an ID3v2 tag after all
        size = (size_bytes[0] << 21) | (size_bytes[1] << 14) | (size_bytes[2] << 7) | size_bytes[3]
        pos += ID3V2_HEADER_BYTES + size + (ID3V2_FOOTER_BYTES if head[5] & 0x10 else 0)
    return None


def _parse_header(b: bytes) -> _Frame | None:
    """A layer III frame header, or None if these 4 bytes are not one."""
    if len(b) < 4 or b[0] != 0xFF or (b[1] & 0xE0) != 0xE0:
        return None
    version = _VERSIONS.get((b[1] >> 3) & 0b11)
    layer = (b[1] >> 1) & 0b11
    bitrate_index = b[2] >> 4
    rate_index = (b[2] >> 2) & 0b11
    if version is None or layer != 0b01 or bitrate_index == 15 or rate_index == 3:
        return None
    crc = not (b[1] & 1)
    padding = (b[2] >> 1) & 1
    mono = (b[3] >> 6) == 0b11
    rate = _RATES[version][rate_index]
    mpeg1 = version == "1"
    side_info = (17 if mono else 32) if mpeg1 else (9 if mono else 17)
    samples = 1152 if mpeg1 else 576
    length = None
    if bitrate_index:
        length = (samples // 8) * _KBPS[version][bitrate_index - 1] * 1000 // rate + padding
    return _Frame(version, rate, samples, side_info, length, crc)


def _info_header(frame_bytes: bytes, frame: _Frame) -> Mp3Length | None:
    # Xing/Info sits right after the side information; writers disagree on whether a CRC shifts
    # it by two bytes, so both places are tried (as mpg123 and FFmpeg tolerate either).
    for offset in (4 + frame.side_info, 4 + 2 + frame.side_info) if frame.crc else (4 + frame.side_info,):
        tag = frame_bytes[offset : offset + 4]
        if tag in (b"Xing", b"Info"):
            return _xing(frame_bytes, offset, frame, tag.decode())
    if frame_bytes[VBRI_OFFSET : VBRI_OFFSET + 4] == b"VBRI":
        return _vbri(frame_bytes, frame)
    return None


def _xing(b: bytes, offset: int, frame: _Frame, name: str) -> Mp3Length | None:
    flags = int.from_bytes(b[offset + 4 : offset + 8], "big")
    pos = offset + 8
    if not flags & 0x1:
        return None  # no frame count: it declares no length
    frames = int.from_bytes(b[pos : pos + 4], "big")
    pos += 4
    pos += 4 if flags & 0x2 else 0  # stream bytes
    pos += 100 if flags & 0x4 else 0  # seek table
    pos += 4 if flags & 0x8 else 0  # quality
    if frames == 0 or pos + 4 > len(b):
        return None
    samples = frames * frame.samples_per_frame
    lame = b[pos : pos + LAME_DELAY_OFFSET + 3]
    gapless = len(lame) == LAME_DELAY_OFFSET + 3 and lame[:4] in LAME_ENCODERS
    if gapless:
        packed = int.from_bytes(lame[LAME_DELAY_OFFSET:], "big")
        delay, padding = packed >> 12, packed & 0xFFF
        if delay + padding >= samples:
            gapless = False  # nonsense; keep the plain frame count
        else:
            samples -= delay + padding
    return Mp3Length(samples, frame.sample_rate, frames, frame.samples_per_frame, name, gapless)


def _vbri(b: bytes, frame: _Frame) -> Mp3Length | None:
    # "VBRI", version (2), delay (2), quality (2), stream bytes (4), frames (4), ...
    body = b[VBRI_OFFSET : VBRI_OFFSET + 18]
    if len(body) < 18:
        return None
    frames = int.from_bytes(body[14:18], "big")
    if frames == 0:
        return None
    return Mp3Length(frames * frame.samples_per_frame, frame.sample_rate, frames, frame.samples_per_frame, "VBRI", False)
