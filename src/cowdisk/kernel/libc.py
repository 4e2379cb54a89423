"""The C library, loaded once for the whole kernel layer, with typed prototypes.

Only the calls Python's :mod:`os` does not offer are declared here: ``statfs``,
``fallocate``, ``mount``, ``umount2`` and ``syncfs``.  The library is loaded with
``use_errno=True``; after a call returns -1, :func:`errno` is its errno (ctypes keeps
a private copy per thread, so no other call can overwrite it first).
"""

from __future__ import annotations

import ctypes
import ctypes.util

libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)

# int statfs(const char *path, struct statfs *buf);
libc.statfs.argtypes = (ctypes.c_char_p, ctypes.c_void_p)
libc.statfs.restype = ctypes.c_int
# int fallocate(int fd, int mode, off_t offset, off_t len);
libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
libc.fallocate.restype = ctypes.c_int
# int mount(const char *source, const char *target, const char *fstype,
#           unsigned long flags, const void *data);
libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p)
libc.mount.restype = ctypes.c_int
# int umount2(const char *target, int flags);
libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
libc.umount2.restype = ctypes.c_int
# int syncfs(int fd);
libc.syncfs.argtypes = (ctypes.c_int,)
libc.syncfs.restype = ctypes.c_int


def errno() -> int:
    """The errno the last failed libc call of this thread left."""
    return ctypes.get_errno()


__all__ = ["errno", "libc"]
