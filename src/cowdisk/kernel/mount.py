"""Mounts: ``mount(2)``, ``umount2(2)``, and who is mounted where (``/proc/self/mountinfo``).

No policy: the caller says what to mount where and with which flags; a failure is a
:class:`~cowdisk.errors.KernelError` naming the operation, the object and the errno.
"""

from __future__ import annotations

import logging
import os

from ..errors import KernelError
from .libc import errno as _errno
from .libc import libc

log = logging.getLogger(__name__)

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8

MNT_FORCE = 1
MNT_DETACH = 2


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str | None = None) -> None:
    """``mount(2)`` ``source`` (a device) on the directory ``target``.

    :raises KernelError: op ``"mount"``, obj ``"<source> on <target>"``, the errno.
    """
    obj = f"{source} on {target}"
    opts = data.encode() if data is not None else None
    if libc.mount(os.fsencode(source), os.fsencode(target), fstype.encode(), flags, opts) != 0:
        err = _errno()
        log.debug("mount %s: failed: errno %d", obj, err)
        raise KernelError("mount", obj, err, detail=f"type {fstype}")
    log.debug("mount %s: ok (type %s, flags %#x)", obj, fstype, flags)


def umount(target: str, flags: int = 0) -> None:
    """``umount2(2)`` ``target`` (``flags``: :data:`MNT_DETACH`, :data:`MNT_FORCE`).

    :raises KernelError: op ``"umount"``, obj ``target``; EBUSY while something in
        the mount is open, EINVAL when nothing is mounted there.
    """
    if libc.umount2(os.fsencode(target), flags) != 0:
        err = _errno()
        log.debug("umount %s: failed: errno %d", target, err)
        raise KernelError("umount", target, err)
    log.debug("umount %s: ok", target)


def mounted_at(path: str) -> str | None:
    """The source (device) of the mount whose mount point is ``path``, or None.

    Read from ``/proc/self/mountinfo`` (the mount point is field 5, the source the
    second field after ``-``); ``path`` is resolved with realpath first.  Mount
    points containing spaces are not matched (mountinfo escapes them).
    """
    p = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                if parts[4] == p:
                    sep = parts.index("-")
                    return parts[sep + 2]
    except OSError:
        pass
    return None


def mount_id(path: str) -> int | None:
    """The id of the mount ``path`` is on (``mnt_id`` of ``/proc/self/fdinfo``), or None.

    Two paths on one filesystem may still be on two mounts (a bind mount); a
    rename(2) between them fails with EXDEV.  None when ``path`` cannot be opened
    (O_PATH) or the kernel does not say.
    """
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("mnt_id:"):
                    return int(line.split()[1])
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


__all__ = ["MNT_DETACH", "MNT_FORCE", "MS_NODEV", "MS_NOEXEC", "MS_NOSUID", "MS_RDONLY",
           "mount", "mount_id", "mounted_at", "umount"]
