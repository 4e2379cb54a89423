"""Grow the filesystem of a volume made larger than its template (``create_volume(size=)``).

An ext2/3/4 filesystem (the one ``template build`` makes) is grown offline with
``resize2fs`` to the whole device or file, before the volume's link exists (no VM has it
open yet). When ``resize2fs`` asks for a check first (an imported image that was mounted
since its last check), ``e2fsck -f -p`` runs and the resize is tried again. Anything else
(xfs grows only while mounted, a partitioned image, no filesystem) is left as it is: the
extra space is there for the guest to use (``xfs_growfs``, ``growpart``).
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess

from ..cache.mkfs import c_env
from ..errors import KernelError

log = logging.getLogger(__name__)

EXT_MAGIC_OFFSET = 1024 + 0x38
EXT_MAGIC = b"\x53\xef"


def is_ext(path: str) -> bool:
    """True when ``path`` (a block device or an image file) starts with an ext2/3/4 superblock."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, 2, EXT_MAGIC_OFFSET) == EXT_MAGIC
    finally:
        os.close(fd)


def run_tool(argv: list[str], op: str = "grow filesystem") -> subprocess.CompletedProcess[str]:
    """Run an e2fsprogs tool on a volume (its output captured, C locale); a missing tool is
    a KernelError naming ``op``."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, env=c_env(), stdin=subprocess.DEVNULL,
                              timeout=600)
    except FileNotFoundError:
        raise KernelError(op, argv[-1], errno.ENOENT, detail=f"{argv[0]} is missing",
                          hint="install e2fsprogs") from None


def grow(path: str, vid: str) -> bool:
    """Grow the ext filesystem on ``path`` (volume ``vid``'s device or file) to its size;
    False when there is no ext filesystem to grow (left as it is)."""
    if not is_ext(path):
        log.info("volume %s: no ext2/3/4 filesystem on %s; its filesystem is left as it is", vid, path)
        return False
    r = run_tool(["resize2fs", path])
    if r.returncode != 0 and "e2fsck -f" in r.stderr + r.stdout:
        c = run_tool(["e2fsck", "-f", "-p", path])
        if c.returncode not in (0, 1):  # 1: errors corrected
            raise KernelError("grow filesystem", vid, errno.EIO,
                              detail=f"e2fsck -f -p {path} (exit {c.returncode}): {(c.stderr or c.stdout).strip()}")
        r = run_tool(["resize2fs", path])
    if r.returncode != 0:
        raise KernelError("grow filesystem", vid, errno.EIO,
                          detail=f"resize2fs {path} (exit {r.returncode}): {(r.stderr or r.stdout).strip()}")
    return True
