"""The chunked, content-addressed template format.

A template of ``size`` bytes is cut into fixed-size chunks of ``chunk_size`` bytes (the
last one may be shorter). A chunk of zeros (a hole, or written zeros) is not stored: the
manifest lists it as ``null``. Every other chunk is stored once, compressed with zstd,
under the SHA-256 of its *uncompressed* bytes::

    <prefix>/chunks/<sha256 of the chunk's bytes>     zstd frame
    <prefix>/manifests/<sha256 of the manifest's bytes>

The manifest is canonical JSON (sorted keys, no spaces) and is named by its own digest,
so the name checks it::

    {"chunk_size": 1048576, "chunks": ["9f86...", null, ...], "compression": "zstd",
     "format": "cowdisk-chunks/1", "size": 1073741824, "template": "<sha256 of the whole image>"}

A reader checks every chunk's SHA-256 after decompressing it and before using a byte of
it; a chunk that fails is an error (EIO), never data. Two templates that share chunks
store them once: pushing a template that differs from a pushed one in a few blocks
uploads only the chunks those blocks are in.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator

from ..errors import RemoteError
from ..kernel import fs

FORMAT = "cowdisk-chunks/1"
COMPRESSION = "zstd"
ZSTD_LEVEL = 3
HEX64 = re.compile(r"^[0-9a-f]{64}$")


def chunk_key(digest: str) -> str:
    return f"chunks/{digest}"


def manifest_key(digest: str) -> str:
    return f"manifests/{digest}"


@dataclass(frozen=True)
class Manifest:
    template: str
    """The SHA-256 of the whole image (the store's template digest)."""
    size: int
    chunk_size: int
    chunks: tuple[str | None, ...]
    """The SHA-256 of each chunk's bytes, in order; None for a chunk of zeros (not stored)."""

    def to_bytes(self) -> bytes:
        return json.dumps({"format": FORMAT, "compression": COMPRESSION, "template": self.template,
                           "size": self.size, "chunk_size": self.chunk_size, "chunks": list(self.chunks)},
                          sort_keys=True, separators=(",", ":")).encode()

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def length(self, index: int) -> int:
        """Bytes in chunk ``index`` (the last one may be short)."""
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def stored(self) -> set[str]:
        """The distinct chunks the bucket holds for this template."""
        return {c for c in self.chunks if c is not None}

    def as_dict(self) -> dict[str, Any]:
        """What listings show (without the chunk list)."""
        return {"manifest": self.digest, "template": self.template, "size": self.size,
                "chunk_size": self.chunk_size, "chunks": len(self.chunks),
                "zero_chunks": sum(c is None for c in self.chunks), "distinct_chunks": len(self.stored())}

    @classmethod
    def from_bytes(cls, data: bytes, name: str) -> "Manifest":
        """Parse a manifest fetched as ``name`` (its digest); it must hash to that name and be
        well formed, else RemoteError EIO."""
        def bad(why: str) -> RemoteError:
            return RemoteError("check manifest", name, errno.EIO, detail=why)

        got = hashlib.sha256(data).hexdigest()
        if got != name:
            raise bad(f"its SHA-256 is {got}")
        try:
            d = json.loads(data)
        except ValueError as e:
            raise bad(f"not JSON: {e}") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("compression") != COMPRESSION:
            raise bad(f"not a {FORMAT} manifest with {COMPRESSION} chunks")
        size, cs, chunks, tmpl = d.get("size"), d.get("chunk_size"), d.get("chunks"), d.get("template")
        if not (isinstance(size, int) and isinstance(cs, int) and size > 0 and cs > 0 and isinstance(chunks, list)
                and isinstance(tmpl, str) and HEX64.match(tmpl)):
            raise bad("size, chunk_size, chunks or template missing or of the wrong type")
        if len(chunks) != -(-size // cs):
            raise bad(f"{len(chunks)} chunks for {size} bytes in chunks of {cs}")
        if not all(c is None or (isinstance(c, str) and HEX64.match(c)) for c in chunks):
            raise bad("a chunk name is not a SHA-256")
        return cls(tmpl, size, cs, tuple(chunks))


# -- chunks ----------------------------------------------------------------------------

def compress(data: bytes) -> bytes:
    import zstandard

    return bytes(zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(data))


def decode(blob: bytes, digest: str, length: int, where: str) -> bytes:
    """The chunk's bytes from its stored form, checked: it must decompress to ``length``
    bytes whose SHA-256 is ``digest``; else RemoteError EIO naming ``where``."""
    import zstandard

    try:  # at most length + 1 bytes whatever the frame claims (no memory bomb from the bucket)
        with zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=False) as r:
            data = b""
            while len(data) <= length:
                more = r.read(length + 1 - len(data))
                if not more:
                    break
                data += more
    except zstandard.ZstdError as e:
        raise RemoteError("check chunk", where, errno.EIO, detail=f"does not decompress: {e}") from None
    if len(data) != length:
        raise RemoteError("check chunk", where, errno.EIO, detail=f"{len(data)} bytes, expected {length}")
    got = hashlib.sha256(data).hexdigest()
    if got != digest:
        raise RemoteError("check chunk", where, errno.EIO, detail=f"its SHA-256 is {got}, expected {digest}")
    return data


def read_chunks(fd: int, size: int, chunk_size: int) -> Iterator[tuple[int, bytes | None]]:
    """(index, bytes) of every chunk of the file, None for one of zeros; holes
    (SEEK_DATA/SEEK_HOLE) are not read."""
    segments = list(fs.data_segments(fd, size))
    zero = bytes(chunk_size)
    si = 0
    for i in range(-(-size // chunk_size)):
        start = i * chunk_size
        end = min(size, start + chunk_size)
        while si < len(segments) and segments[si][0] + segments[si][1] <= start:
            si += 1
        if si >= len(segments) or segments[si][0] >= end:
            yield i, None  # all hole
            continue
        data = os.pread(fd, end - start, start)
        if len(data) != end - start:
            raise OSError(errno.EIO, f"short read at {start}")
        yield i, (None if data == zero[:len(data)] else data)
