"""Opening a path beneath a directory without following symlinks (``openat2``), and this
thread's filesystem identity (``setfsuid``, ``setfsgid``, ``setgroups``).

Both are mechanisms without policy: which directory a path must stay beneath and whose
rights a read is made with is decided above (``store/sources.py``).

**Per-thread identity.** The kernel keeps credentials per thread. ``setfsuid(2)``,
``setfsgid(2)`` and the raw ``setgroups(2)`` system call change only the calling thread's
(glibc's ``setgroups`` and Python's ``os.setgroups`` change every thread of the process:
they are not used here). Moving the filesystem uid from 0 to another drops the
capabilities that bypass file permissions (``CAP_DAC_OVERRIDE``, ``CAP_DAC_READ_SEARCH``,
``CAP_FOWNER`` ...) from the thread's effective set, and moving it back to 0 restores them
(capabilities(7), "Effect of user ID changes on capabilities"): while
:func:`fs_identity` holds, every path this thread looks up and every file it opens is
checked as that uid, its gid and its groups, by the kernel's own rules. No thread and no
subprocess may be started inside it: a new task inherits its creator's credentials.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from dataclasses import dataclass
from typing import Iterator

from ..errors import KernelError
from .libc import errno as _libc_errno
from .libc import libc as _libc

# x86_64 system call numbers (the only architecture cowdisk runs on: see doctor)
SYS_SETGROUPS = 116
SYS_SETFSUID = 122
SYS_SETFSGID = 123
SYS_OPENAT2 = 437

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """``openat2(2)``: open ``path`` relative to ``dirfd`` with ``flags`` (O_CLOEXEC is
    always added) under the ``resolve`` restrictions (RESOLVE_BENEATH: never leaves
    ``dirfd``, neither by '..' nor by an absolute symlink; RESOLVE_NO_SYMLINKS: no symlink
    in any component). Where the kernel lacks openat2 (ENOSYS, before 5.6), the path is
    walked one component at a time with O_PATH|O_NOFOLLOW, refusing '..', which gives the
    same answer for RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS. Raises :class:`KernelError`
    ("openat2", path, errno): ELOOP for a symlink, EXDEV for an escape, EACCES..."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    raw = os.fsencode(path)
    fd = _syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_long(dirfd), ctypes.c_char_p(raw),
                  ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd >= 0:
        return int(fd)
    err = _libc_errno()
    if err == 38 and resolve & (RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS):  # ENOSYS
        return _walk_nofollow(dirfd, path, flags | os.O_CLOEXEC, mode)
    raise KernelError("openat2", path, err)


def _walk_nofollow(dirfd: int, path: str, flags: int, mode: int) -> int:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if path.startswith("/") or ".." in parts:
        raise KernelError("openat2", path, 18)  # EXDEV, as RESOLVE_BENEATH says
    cur = dirfd
    try:
        for i, p in enumerate(parts):
            last = i == len(parts) - 1
            try:
                nxt = os.open(p, (flags if last else os.O_PATH | os.O_DIRECTORY) | os.O_NOFOLLOW | os.O_CLOEXEC,
                              mode, dir_fd=cur)
            except OSError as e:
                raise KernelError("openat2", path, e.errno or 0) from None
            if cur != dirfd:
                os.close(cur)
            cur = nxt
        if cur == dirfd:
            return os.open(".", flags | os.O_CLOEXEC, dir_fd=dirfd)
        return cur
    except BaseException:
        if cur != dirfd:
            os.close(cur)
        raise


@dataclass(frozen=True)
class Identity:
    """Whose rights a read is made with: uid, primary gid, supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def __str__(self) -> str:
        return f"uid {self.uid} gid {self.gid}" + (f" groups {','.join(map(str, self.groups))}"
                                                  if self.groups else "")


def _setgroups(groups: tuple[int, ...] | list[int]) -> None:
    arr = (ctypes.c_uint32 * max(1, len(groups)))(*groups)
    if _syscall(ctypes.c_long(SYS_SETGROUPS), ctypes.c_long(len(groups)), arr) != 0:
        raise KernelError("setgroups (this thread)", ",".join(map(str, groups)) or "(none)", _libc_errno())


def _setfs(nr: int, value: int, what: str) -> int:
    """set the thread's fs uid/gid to ``value``; returns the old one, raises if it did not take."""
    old = int(_syscall(ctypes.c_long(nr), ctypes.c_long(value)))
    now = int(_syscall(ctypes.c_long(nr), ctypes.c_long(-1)))  # -1 changes nothing, returns the current
    if now != value:
        raise KernelError(f"{what} (this thread)", str(value), 1)  # EPERM
    return old


@contextlib.contextmanager
def fs_identity(ident: Identity | None) -> Iterator[None]:
    """This thread's filesystem uid, gid and groups set to ``ident`` while the block runs
    (None, or the identity the process already has: nothing changes). Needs root."""
    if ident is None or (ident.uid == os.geteuid() and ident.gid == os.getegid()
                         and set(ident.groups) == set(os.getgroups())):
        yield
        return
    groups = os.getgroups()  # this thread's (getgroups(2) is per thread)
    _setgroups(ident.groups)
    old_gid = old_uid = None
    try:
        old_gid = _setfs(SYS_SETFSGID, ident.gid, "setfsgid")
        old_uid = _setfs(SYS_SETFSUID, ident.uid, "setfsuid")
        yield
    finally:
        if old_uid is not None:
            _setfs(SYS_SETFSUID, old_uid, "setfsuid")
        if old_gid is not None:
            _setfs(SYS_SETFSGID, old_gid, "setfsgid")
        _setgroups(groups)


__all__ = ["openat2", "Identity", "fs_identity", "RESOLVE_BENEATH", "RESOLVE_NO_SYMLINKS", "RESOLVE_NO_XDEV",
           "RESOLVE_NO_MAGICLINKS", "RESOLVE_IN_ROOT"]
