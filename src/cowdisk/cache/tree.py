"""Copying a file tree the way mkfs will see it (owners, modes, xattrs, times, symlinks,
device nodes and hard links within the copy kept), and removing one."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import sys
from typing import Any

from ..errors import KernelError
from ..kernel import fs as kfs


def xattrs(path: bytes) -> list[tuple[str, bytes]]:
    """The extended attributes of ``path`` (not followed if a symlink), sorted by name;
    [] where the filesystem has none."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return []
        raise KernelError.from_oserror("list xattrs", os.fsdecode(path), e) from None
    out = []
    for n in sorted(names):
        try:
            out.append((n, os.getxattr(path, n, follow_symlinks=False)))
        except OSError as e:
            if e.errno == errno.ENODATA:
                continue
            raise KernelError.from_oserror("read xattr", f"{os.fsdecode(path)} {n}", e) from None
    return out


def copy_node(src: str, dst: str, links: dict[tuple[int, int], str]) -> None:
    """Copy one node (recursively for directories) keeping mode, owner, xattrs, times,
    symlinks, device nodes and hardlinks within the copy (``links`` maps a source inode
    to its first copy). Existing directories merge, other existing destinations are
    replaced."""
    st = os.lstat(src)
    m = st.st_mode
    if os.path.lexists(dst) and not (stat.S_ISDIR(m) and os.path.isdir(dst) and not os.path.islink(dst)):
        if os.path.isdir(dst) and not os.path.islink(dst):
            shutil.rmtree(dst)
        else:
            os.unlink(dst)
    if stat.S_ISDIR(m):
        os.makedirs(dst, exist_ok=True)
        for name in sorted(os.listdir(src)):
            copy_node(os.path.join(src, name), os.path.join(dst, name), links)
    elif stat.S_ISLNK(m):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISREG(m):
        ident = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and ident in links:
            os.link(links[ident], dst)
            return
        kfs.sparse_copy(src, dst)
        if st.st_nlink > 1:
            links[ident] = dst
    elif stat.S_ISFIFO(m):
        os.mkfifo(dst)
    else:  # char, block, socket
        os.mknod(dst, m, st.st_rdev)
    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(m):
        for name, value in xattrs(os.fsencode(src)):
            try:
                os.setxattr(dst, name, value)
            except OSError:
                pass
        os.chmod(dst, stat.S_IMODE(m))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def makedirs_owned(path: str, top: str) -> None:
    """mkdir -p below ``top`` with 0755 (owned by the builder)."""
    if os.path.isdir(path):
        return
    makedirs_owned(os.path.dirname(path), top)
    if os.path.lexists(path):
        os.unlink(path)  # a file where a directory must go: later entries win
    os.mkdir(path, 0o755)
    os.chmod(path, 0o755)


def remove_tree(path: str, op: str) -> None:
    """rm -r ``path``; what is already gone is fine, any other failure raises naming ``op``."""
    errors: list[OSError] = []

    def onerror(func: Any, p: str, exc: Any) -> None:
        e = exc[1]
        if isinstance(e, FileNotFoundError):
            return
        errors.append(e)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=lambda f, p, e: onerror(f, p, (type(e), e, None)))
    else:
        shutil.rmtree(path, onerror=onerror)
    if errors:
        e = errors[0]
        raise KernelError.from_oserror(op, getattr(e, "filename", None) or path, e) from None
