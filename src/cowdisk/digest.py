"""The one content hash of the project: sha256 of a file, holes hashed without reading them."""

from __future__ import annotations

import hashlib
import os

from .kernel import fs
from .progress import Progress

_ZERO = bytes(1 << 20)


def sha256_file(path: str | os.PathLike[str], progress: Progress | None = None) -> str:
    """Hex sha256 of the file's bytes. Holes (SEEK_DATA/SEEK_HOLE) count as zeros and are
    not read, so a sparse image of 4 GiB with 100 MiB of data reads 100 MiB."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        pos = 0
        for off, length in list(fs.data_segments(fd, size)) + [(size, 0)]:
            while pos < off:  # a hole
                n = min(len(_ZERO), off - pos)
                h.update(_ZERO[:n])
                pos += n
            end = off + length
            while pos < end:
                data = os.pread(fd, min(8 << 20, end - pos), pos)
                if not data:
                    break
                h.update(data)
                pos += len(data)
                if progress:
                    progress(pos, size)
    if progress:
        progress(size, size)
    return h.hexdigest()
