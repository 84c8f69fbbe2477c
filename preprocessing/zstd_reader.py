"""Zstandard-compressed input (the Pile's, RedPajama's and many a crawl's ``.jsonl.zst``), read
as gzip and bz2 files are: frame after frame (skippable frames, as pzstd writes, passed over),
and a truncated file an ``EOFError``. zstandard's own ``stream_reader`` ends a file cut inside a
frame in silence, with nothing of that frame, so a half-copied file lost documents uncounted."""

from __future__ import annotations

import io
from typing import BinaryIO

import zstandard  # comes with Apache Beam

# Decompressed while less than _READY waits, in feeds of compressed bytes sized by the ratio so
# far to make about a quarter of it: a feed's output is its size times the ratio, which is 3-10 for
# text but thousands for a run of one letter (zstd's blocks of 128 KiB in a few bytes each).
_READY = 1 << 20
_FIRST_FEED = 256  # before the ratio is known
# A frame's first four bytes, little-endian: a zstd frame, or a skippable one (0x184D2A50-5F).
FRAME_MAGIC = b"\x28\xb5\x2f\xfd"


def starts_like_zstd(head: bytes) -> bool:
    return head[:4] == FRAME_MAGIC or (len(head) >= 4 and head[0] & 0xF0 == 0x50 and head[1:4] == b"\x2a\x4d\x18")


class ZstdReader(io.RawIOBase):
    """A readable binary stream of ``raw``'s decompressed frames, in order. Wrap it in an
    ``io.BufferedReader`` for ``readline``: a raw stream's reads one byte at a time."""

    def __init__(self, raw: BinaryIO, close_raw: bool = False):
        super().__init__()
        self._raw = raw
        self._close_raw = close_raw  # a file this reader was given to own (fine-tuning's tables)
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._in_frame = False  # fed bytes of a frame not yet ended
        self._ready = bytearray()
        self._at = 0  # the next byte of _ready to return
        self._input = b""  # compressed bytes read from raw, not yet fed
        self._fed = self._made = 0  # bytes in and out so far: the ratio

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if self._close_raw and not self.closed:
            self._raw.close()
        super().close()

    def readinto(self, b) -> int:
        while self._at == len(self._ready):
            self._ready, self._at = bytearray(), 0
            if not self._fill():
                return 0
        n = min(len(b), len(self._ready) - self._at)
        b[:n] = self._ready[self._at:self._at + n]
        self._at += n
        return n

    def _fill(self) -> bool:
        """Decompresses until _READY bytes wait or the input ends; False at the end."""
        while len(self._ready) < _READY:
            if not self._input:
                self._input = self._raw.read(1 << 16)
                if not self._input:
                    if self._in_frame and not self._ready:  # what came before is read first
                        raise EOFError("the file ends inside a zstd frame")
                    return bool(self._ready)
            feed = max(64, min(1 << 16, _READY * self._fed // (4 * self._made))) if self._made else _FIRST_FEED
            data, self._input = self._input[:feed], self._input[feed:]
            self._fed += len(data)
            while data:
                made = self._frame.decompress(data)
                self._made += len(made)
                self._ready += made
                if not self._frame.eof:
                    self._in_frame = True
                    break
                # A frame ended: what follows it begins the next (files appended by several zstd runs).
                data = self._frame.unused_data
                self._frame = zstandard.ZstdDecompressor().decompressobj()
                self._in_frame = False
        return True
