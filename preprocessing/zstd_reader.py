"""Zstandard-compressed input (the Pile's, RedPajama's and many a crawl's ``.jsonl.zst``), read
as gzip and bz2 files are: frame after frame, and a truncated file an ``EOFError``.
zstandard's own ``stream_reader`` ends a file cut inside a frame in silence, with nothing of that
frame, so a half-copied file lost documents without a count."""

from __future__ import annotations

import io
from typing import BinaryIO

import zstandard  # comes with Apache Beam

_RAW_CHUNK = 1 << 16  # compressed bytes decompressed at once: a few hundred KiB of text


class ZstdReader(io.RawIOBase):
    """A readable binary stream of ``raw``'s decompressed frames, in order."""

    def __init__(self, raw: BinaryIO):
        super().__init__()
        self._raw = raw
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._in_frame = False  # fed bytes of a frame not yet ended
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        while not self._buffer:
            chunk = self._raw.read(_RAW_CHUNK)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame")
                return b""
            self._feed(chunk)
        if size is None or size < 0:
            size = len(self._buffer)
        out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out

    read1 = read

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def _feed(self, data: bytes) -> None:
        while data:
            self._buffer += self._frame.decompress(data)
            if not self._frame.eof:
                self._in_frame = True
                return
            # A frame ended: what follows it begins the next (files appended by several zstd calls).
            data = self._frame.unused_data
            self._frame = zstandard.ZstdDecompressor().decompressobj()
            self._in_frame = False
