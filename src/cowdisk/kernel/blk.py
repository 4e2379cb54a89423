"""Block devices and files: sizes, device numbers, device nodes (for jails)."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct

from ..errors import KernelError
from .ioc import IO, IOR

log = logging.getLogger(__name__)

_u64 = struct.Struct("=Q")

BLKGETSIZE64 = IOR(0x12, 114, 8)  # _IOR(0x12, 114, size_t)
BLKSSZGET = IO(0x12, 104)
BLKFLSBUF = IO(0x12, 97)
BLKDISCARD = IO(0x12, 119)  # _IO(0x12, 119), arg: uint64_t[2] (offset, length)

SECTOR = 512


def size_bytes(path: str | os.PathLike[str]) -> int:
    """Size in bytes of a block device (BLKGETSIZE64) or a regular file (st_size)."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except OSError as e:
        raise KernelError.from_oserror("size", p, e) from None
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if not stat.S_ISBLK(st.st_mode):
        raise KernelError("size", p, errno.ENOTBLK, detail="neither a block device nor a file")
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise KernelError.from_oserror("size: open", p, e) from None
    try:
        out = fcntl.ioctl(fd, BLKGETSIZE64, bytes(_u64.size))
        return int(_u64.unpack(out)[0])
    except OSError as e:
        raise KernelError.from_oserror("size (BLKGETSIZE64)", p, e) from None
    finally:
        os.close(fd)


def discard(fd: int, offset: int, length: int) -> None:
    """BLKDISCARD ``length`` bytes at ``offset`` of the block device open on ``fd`` (a thin
    device unmaps them; a loop punches holes in its file)."""
    arg = struct.pack("=QQ", offset, length)
    try:
        fcntl.ioctl(fd, BLKDISCARD, arg)
    except OSError as e:
        raise KernelError("block discard", f"fd {fd}", e.errno or 0,
                          detail=f"{length} bytes at {offset}") from None
    log.debug("block discard fd %d: ok (%d bytes at %d)", fd, length, offset)


def size_sectors(path: str | os.PathLike[str]) -> int:
    """Size in 512-byte sectors (a file's tail under 512 bytes is not counted, as a loop does)."""
    return size_bytes(path) // SECTOR


def devno(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(major, minor) of a block device node."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except OSError as e:
        raise KernelError.from_oserror("device number", p, e) from None
    if not stat.S_ISBLK(st.st_mode):
        raise KernelError("device number", p, errno.ENOTBLK)
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def devno_str(path: str | os.PathLike[str]) -> str:
    ma, mi = devno(path)
    return f"{ma}:{mi}"


def make_node(path: str | os.PathLike[str], major: int, minor: int, *, mode: int = 0o600,
              uid: int | None = None, gid: int | None = None) -> None:
    """Create (or replace) a block device node ``path`` with major:minor.

    A stale node or file at ``path`` is replaced atomically: the new node is made
    under a temporary name in the same directory and renamed over it.
    """
    p = os.fspath(path)
    d = os.path.dirname(os.path.abspath(p))
    tmp = os.path.join(d, f".{os.path.basename(p)}.cowdisk-{os.getpid()}")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    try:
        os.mknod(tmp, stat.S_IFBLK | mode, os.makedev(major, minor))
        os.chmod(tmp, mode)
        if uid is not None or gid is not None:
            os.chown(tmp, -1 if uid is None else uid, -1 if gid is None else gid)
        os.replace(tmp, p)
        log.debug("make device node %s: ok (%d:%d, mode %o)", p, major, minor, mode)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise KernelError.from_oserror("make device node", p, e) from None


def is_block(path: str | os.PathLike[str]) -> bool:
    try:
        return stat.S_ISBLK(os.stat(os.fspath(path)).st_mode)
    except OSError:
        return False
