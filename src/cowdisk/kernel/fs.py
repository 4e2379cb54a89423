"""Files: FICLONE, statfs filesystem type, FIEMAP usage, sparse files and sparse copies.

Facts in docs/reference/loop-and-files.md section 3. Every failure is a
``KernelError`` naming the operation and the path.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import struct
import threading
from dataclasses import dataclass
from typing import Iterator

from ..errors import KernelError
from ..progress import Progress
from .ioc import IOR, IOW, IOWR
from .libc import errno as _libc_errno
from .libc import libc as _libc

log = logging.getLogger(__name__)

_fiemap_hdr = struct.Struct("=QQIIII")
_fiemap_ext = struct.Struct("=QQQ16xI12x")
_int = struct.Struct("=i")
_long = struct.Struct("l")  # native C long: 8 bytes on 64-bit

FICLONE = IOW(0x94, 9, _int)  # _IOW(0x94, 9, int)
FS_IOC_FIEMAP = IOWR(ord("f"), 11, _fiemap_hdr)  # _IOWR('f', 11, struct fiemap)
FS_IOC_GETFLAGS = IOR(ord("f"), 1, _long)  # _IOR('f', 1, long)
FS_IOC_SETFLAGS = IOW(ord("f"), 2, _long)  # _IOW('f', 2, long)
FS_IMMUTABLE_FL = 0x10

FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_DELALLOC = 0x4
FIEMAP_EXTENT_DATA_INLINE = 0x200
FIEMAP_EXTENT_SHARED = 0x2000

# statfs f_type magics
BTRFS_MAGIC = 0x9123683E
XFS_MAGIC = 0x58465342
EXT4_MAGIC = 0xEF53
TMPFS_MAGIC = 0x01021994
OVERLAY_MAGIC = 0x794C7630
NFS_MAGIC = 0x6969
V9FS_MAGIC = 0x01021997
FUSE_MAGIC = 0x65735546
CIFS_MAGIC = 0xFF534D42
SMB2_MAGIC = 0xFE534D42
CEPH_MAGIC = 0x00C36400

FS_NAMES = {
    BTRFS_MAGIC: "btrfs",
    XFS_MAGIC: "xfs",
    EXT4_MAGIC: "ext4",
    TMPFS_MAGIC: "tmpfs",
    OVERLAY_MAGIC: "overlayfs",
    NFS_MAGIC: "nfs",
    V9FS_MAGIC: "9p",
    FUSE_MAGIC: "fuse",
    CIFS_MAGIC: "cifs",
    SMB2_MAGIC: "smb2",
    CEPH_MAGIC: "ceph",
    0x9FA0: "proc",
    0x62656572: "sysfs",
    0x858458F6: "ramfs",
    0x73717368: "squashfs",
}
REFLINK_FS = {BTRFS_MAGIC, XFS_MAGIC}
REMOTE_LOCK_FS = {NFS_MAGIC, CIFS_MAGIC, SMB2_MAGIC, FUSE_MAGIC, V9FS_MAGIC, CEPH_MAGIC}

_statfs = struct.Struct("=qqqqq")  # f_type, f_bsize, f_blocks, f_bfree, f_bavail: the head of struct statfs
_STATFS_SIZE = 120  # sizeof(struct statfs) on x86-64


@dataclass(frozen=True)
class StatFs:
    """The parts of ``struct statfs`` cowdisk uses (x86-64 layout)."""

    path: str
    f_type: int
    bsize: int
    blocks: int
    bfree: int
    bavail: int

    @property
    def name(self) -> str:
        return FS_NAMES.get(self.f_type, f"0x{self.f_type:x}")

    @property
    def free_bytes(self) -> int:
        return self.bavail * self.bsize

    @property
    def reflink_capable(self) -> bool:
        return self.f_type in REFLINK_FS


def statfs(path: str | os.PathLike[str]) -> StatFs:
    """``statfs(2)`` of ``path``; f_type masked to 32 bits."""
    p = os.fspath(path)
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    if _libc.statfs(os.fsencode(p), buf) != 0:
        raise KernelError("statfs", p, _libc_errno())
    f_type, bsize, blocks, bfree, bavail = _statfs.unpack_from(buf.raw, 0)
    return StatFs(p, f_type & 0xFFFFFFFF, bsize, blocks, bfree, bavail)


def syncfs(path: str | os.PathLike[str]) -> None:
    """syncfs(2) on the filesystem holding ``path``: its dirty data written and, on xfs and
    btrfs, the frees it deferred done (blocks of a file just unlinked are counted free by
    statfs only once its inode is inactivated)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            raise KernelError("syncfs", str(path), _libc_errno())
    finally:
        os.close(fd)


def nearest_existing(path: str | os.PathLike[str]) -> str:
    """The path itself if it exists, else its nearest existing ancestor."""
    p = os.path.abspath(os.fspath(path))
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def fs_type(path: str | os.PathLike[str]) -> StatFs:
    """statfs of ``path`` or, when it does not exist yet, of its nearest existing ancestor."""
    return statfs(nearest_existing(path))


def ficlone(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Clone ``src`` into a new file ``dst`` (FICLONE). ``dst`` must not exist.

    On failure the new file is removed, so nothing is left behind.
    """
    s, d = os.fspath(src), os.fspath(dst)
    try:
        sfd = os.open(s, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise KernelError.from_oserror("reflink: open source", s, e) from None
    try:
        try:
            dfd = os.open(d, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise KernelError.from_oserror("reflink: create", d, e) from None
        try:
            fcntl.ioctl(dfd, FICLONE, sfd)
        except OSError as e:
            os.close(dfd)
            dfd = -1
            _unlink_quiet(d)
            hint = ""
            if e.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL):
                hint = "reflink needs source and destination on one btrfs or xfs (reflink=1) filesystem"
            raise KernelError("reflink (FICLONE)", f"{s} -> {d}", e.errno or 0, hint=hint) from None
        else:
            log.debug("reflink (FICLONE) %s -> %s: ok", s, d)
        finally:
            if dfd >= 0:
                os.close(dfd)
    finally:
        os.close(sfd)


def _ficlone_probe(directory: str) -> tuple[str, int]:
    """FICLONE one 4 KiB probe file into another inside ``directory``, removing both.

    :returns: ``("", 0)`` when it worked, else the failed step and its errno.
    """
    tag = f"{os.getpid()}-{threading.get_ident()}-{os.urandom(4).hex()}"
    a = os.path.join(directory, f".cowdisk-reflink-probe-{tag}-a")
    b = os.path.join(directory, f".cowdisk-reflink-probe-{tag}-b")
    step = "create probe file"
    try:
        with open(a, "wb") as f:
            f.write(b"\0" * 4096)
        step = "FICLONE"
        ficlone(a, b)
        return "", 0
    except OSError as e:  # KernelError is an OSError
        return step, e.errno or 0
    finally:
        _unlink_quiet(a)
        _unlink_quiet(b)


@dataclass(frozen=True)
class ReflinkSupport:
    """Whether files under ``path`` can be reflinked, and the facts that decided it.

    ``fs`` is the statfs of ``probed``: ``path`` itself, or its nearest existing
    ancestor when ``path`` does not exist yet.  ``probe_step`` is ``None`` when no
    FICLONE probe ran (``path`` is not an existing directory, or the caller said
    not to), ``""`` when it worked, else the step that failed (``"create probe
    file"`` or ``"FICLONE"``) with its errno in ``probe_errno``.  ``ok`` is the
    probe's result when it ran (it catches xfs made with reflink=0 and accepts
    filesystems that pass FICLONE through, such as overlayfs over btrfs), else
    whether the filesystem type is one that can (btrfs, xfs).
    """

    path: str
    probed: str
    fs: StatFs
    probe_step: str | None = None
    probe_errno: int = 0

    @property
    def fs_can_reflink(self) -> bool:
        return self.fs.reflink_capable

    @property
    def probe_ran(self) -> bool:
        return self.probe_step is not None

    @property
    def ok(self) -> bool:
        if self.probe_step is not None:
            return self.probe_step == ""
        return self.fs_can_reflink

    @property
    def reason(self) -> str:
        """One factual sentence: the filesystem and, if one ran, the probe's outcome."""
        where = self.path if self.probed == self.path else f"{self.path} (nearest existing: {self.probed})"
        text = f"{where} is on {self.fs.name} (statfs f_type 0x{self.fs.f_type:x})"
        if self.probe_step is None:
            return text + (", which can reflink" if self.fs_can_reflink else ", which cannot reflink")
        if self.probe_step == "":
            return text + ", and a FICLONE probe there worked"
        name = errno.errorcode.get(self.probe_errno, str(self.probe_errno))
        return text + f", and a FICLONE probe there failed ({self.probe_step}: {name})"


def reflink_support(path: str | os.PathLike[str], *, probe: bool = True) -> ReflinkSupport:
    """Can files under ``path`` be reflinked here, and why (not)?

    statfs f_type of ``path`` or its nearest existing ancestor first; then, when
    ``path`` is an existing directory and ``probe`` is true, a FICLONE between two
    probe files made (and removed) inside it, which is the final word.  Nothing is
    written into ancestors of a path that does not exist yet.  Returns data only;
    what to do about a "no" is the caller's business.

    :raises KernelError: statfs failed.
    """
    p = os.path.abspath(os.fspath(path))
    probed = nearest_existing(p)
    st = statfs(probed)
    if probe and probed == p and os.path.isdir(p):
        step, err = _ficlone_probe(p)
        return ReflinkSupport(p, probed, st, step, err)
    return ReflinkSupport(p, probed, st)


def open_elsewhere(path: str | os.PathLike[str]) -> bool | None:
    """Whether any other open file (an fd, a mapping, a loop device's backing file) refers
    to the regular file ``path``'s inode, asked of the kernel in three syscalls: a write
    lease (``F_SETLEASE F_WRLCK``) is granted only when the inode's only opener is the
    caller (fs/locks.c ``check_conflicting_open``: its read and write counts must be the
    caller's own), and is dropped at once. None when the kernel cannot say (leases off,
    a filesystem without them, a file the caller neither owns nor has CAP_LEASE for):
    the caller falls back to searching ``/proc``. False does not mean nobody opens it a
    moment later; it answers like the search it replaces, without reading every process."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EWOULDBLOCK:  # someone else holds a lease: it is open elsewhere
            return True
        return None
    try:
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        except OSError as e:
            return True if e.errno == errno.EAGAIN else None
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        # a read-only probe has nothing to lose at close; a FUSE file whose server lost
        # its backend (an rbd export whose client was fenced) fails close with ESHUTDOWN
        try:
            os.close(fd)
        except OSError as e:
            log.debug("open_elsewhere %s: close: %s", os.fspath(path), e)


def makedirs_mode(path: str | os.PathLike[str], mode: int) -> None:
    """``mkdir -p`` where every directory made gets exactly ``mode``, whatever the umask
    (``os.makedirs`` gives intermediate directories the umask's mode). Directories that
    exist are left as they are."""
    missing = []
    p = os.path.abspath(os.fspath(path))
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            continue  # another process made it meanwhile
        except OSError as e:
            raise KernelError.from_oserror("create directory", d, e) from None
        try:
            os.chmod(d, mode)  # the umask may have taken bits
        except OSError as e:
            raise KernelError.from_oserror("chmod directory", d, e) from None


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def create_sparse(path: str | os.PathLike[str], size: int, *, exclusive: bool = True) -> None:
    """Create a sparse file of ``size`` bytes (no blocks allocated)."""
    p = os.fspath(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else 0)
    try:
        fd = os.open(p, flags, 0o600)
    except OSError as e:
        raise KernelError.from_oserror("create sparse file", p, e) from None
    try:
        os.ftruncate(fd, size)
    except OSError as e:
        os.close(fd)
        _unlink_quiet(p)
        raise KernelError.from_oserror("size sparse file", p, e) from None
    os.close(fd)
    log.debug("create sparse file %s: ok (%d bytes)", p, size)


FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2


def punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(PUNCH_HOLE | KEEP_SIZE) ``length`` bytes at ``offset`` of ``fd``."""
    if _libc.fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, offset, length) != 0:
        raise KernelError("punch hole", f"fd {fd}", _libc_errno())
    log.debug("punch hole fd %d: ok (%d bytes at %d)", fd, length, offset)


def data_segments(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """Yield (offset, length) of the data parts of a file, skipping holes."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        end = min(end, size)
        if end > start:
            yield start, end - start
        pos = end


def sparse_copy(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
    chunk: int = 8 << 20,
) -> int:
    """Copy ``src`` to a new file ``dst`` keeping holes; returns bytes of data copied.

    Uses copy_file_range per data segment (which may reflink on btrfs/xfs) and falls
    back to read/write across filesystems. All-zero blocks read in the fallback are
    skipped. ``dst`` is removed again if the copy fails. ``progress`` is called as
    ``progress(done, total)`` in bytes of data (holes not counted).
    """
    s, d = os.fspath(src), os.fspath(dst)
    try:
        sfd = os.open(s, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise KernelError.from_oserror("copy: open source", s, e) from None
    dfd = -1
    try:
        size = os.fstat(sfd).st_size
        try:
            dfd = os.open(d, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise KernelError.from_oserror("copy: create", d, e) from None
        try:
            os.ftruncate(dfd, size)
            segments = list(data_segments(sfd, size))
            total = sum(n for _, n in segments)
            done = 0
            use_cfr = True
            zero = bytes(chunk)
            for off, length in segments:
                end = off + length
                while off < end:
                    n = min(chunk, end - off)
                    if use_cfr:
                        try:
                            w = os.copy_file_range(sfd, dfd, n, off, off)
                        except OSError as e:
                            if e.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                                raise
                            use_cfr = False
                            continue
                        if w == 0:
                            break
                    else:
                        data = os.pread(sfd, n, off)
                        w = len(data)
                        if w == 0:
                            break
                        if data != zero[:w]:
                            os.pwrite(dfd, data, off)
                    off += w
                    done += w
                    if progress:
                        progress(done, total)
            log.debug("copy %s -> %s: ok (%d bytes of data, %s)", s, d, done,
                      "copy_file_range" if use_cfr else "read/write")
            return done
        except OSError as e:
            raise KernelError.from_oserror("copy", f"{s} -> {d}", e) from None
    except BaseException:
        if dfd >= 0:
            os.close(dfd)
            dfd = -1
            _unlink_quiet(d)
        raise
    finally:
        if dfd >= 0:
            os.close(dfd)
        os.close(sfd)


def disk_usage(path: str | os.PathLike[str]) -> int:
    """Bytes really allocated on disk (st_blocks * 512), not the apparent size."""
    return os.stat(os.fspath(path)).st_blocks * 512


@dataclass(frozen=True)
class Extent:
    logical: int
    physical: int
    length: int
    flags: int

    @property
    def shared(self) -> bool:
        return bool(self.flags & FIEMAP_EXTENT_SHARED)


def fiemap(path: str | os.PathLike[str], *, sync: bool = True, batch: int = 512) -> list[Extent]:
    """All extents of a file (FS_IOC_FIEMAP), flushed first unless ``sync`` is False."""
    p = os.fspath(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise KernelError.from_oserror("fiemap: open", p, e) from None
    out: list[Extent] = []
    try:
        start = 0
        while True:
            buf = bytearray(_fiemap_hdr.size + batch * _fiemap_ext.size)
            _fiemap_hdr.pack_into(buf, 0, start, 2**64 - 1 - start, FIEMAP_FLAG_SYNC if sync else 0, 0, batch, 0)
            try:
                fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
            except OSError as e:
                raise KernelError.from_oserror("fiemap", p, e) from None
            mapped = _fiemap_hdr.unpack_from(buf, 0)[3]
            if mapped == 0:
                break
            last = False
            for i in range(mapped):
                lg, ph, ln, fl = _fiemap_ext.unpack_from(buf, _fiemap_hdr.size + i * _fiemap_ext.size)
                out.append(Extent(lg, ph, ln, fl))
                last = bool(fl & FIEMAP_EXTENT_LAST)
            if last:
                break
            start = out[-1].logical + out[-1].length
    finally:
        os.close(fd)
    return out


@dataclass(frozen=True)
class SharedUsage:
    """Bytes of a file on disk split by whether another file shares them right now."""

    exclusive: int
    shared: int


def shared_usage(path: str | os.PathLike[str]) -> SharedUsage:
    """Exclusive vs shared bytes from FIEMAP extent flags (as ``btrfs filesystem du``)."""
    ex = sh = 0
    skip = FIEMAP_EXTENT_UNKNOWN | FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_DATA_INLINE
    for e in fiemap(path):
        if e.flags & skip:
            continue
        if e.shared:
            sh += e.length
        else:
            ex += e.length
    return SharedUsage(ex, sh)


def get_flags(fd: int) -> int:
    buf = fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0\0\0\0")
    return int(struct.unpack("=i", buf)[0])


def set_immutable(path: str | os.PathLike[str], on: bool = True) -> bool:
    """Set or clear FS_IMMUTABLE_FL (chattr +i). Returns False where the fs cannot."""
    p = os.fspath(path)
    fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return set_immutable_fd(fd, on, p)
    finally:
        os.close(fd)


def set_immutable_fd(fd: int, on: bool = True, name: str = "") -> bool:
    """:func:`set_immutable` on an open file (``name`` for messages only): it works after
    the file's name is gone or renamed, e.g. to set the flag again on an inode that
    keeps another hard link after one was unlinked."""
    p = name or f"fd {fd}"
    try:
        flags = get_flags(fd)
    except OSError:
        return False
    new = (flags | FS_IMMUTABLE_FL) if on else (flags & ~FS_IMMUTABLE_FL)
    if new == flags:
        return True
    try:
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("=i", new))
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
            return False
        raise KernelError.from_oserror("set immutable flag", p, e) from None
    log.debug("set immutable flag %s: ok (%s)", p, "on" if on else "off")
    return True


def is_immutable(path: str | os.PathLike[str]) -> bool:
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_CLOEXEC)
    try:
        return bool(get_flags(fd) & FS_IMMUTABLE_FL)
    except OSError:
        return False
    finally:
        os.close(fd)
