"""Loop devices through /dev/loop-control and LOOP_CONFIGURE, no losetup.

Facts in docs/reference/loop-and-files.md section 1:

* ``LOOP_CTL_GET_FREE`` reserves nothing: two callers get the same index and the
  loser's ``LOOP_CONFIGURE`` fails with EBUSY, so :func:`attach` retries with a new
  index.
* With ``LO_FLAGS_AUTOCLEAR`` the kernel detaches the loop at its last close (ours,
  a mount's or a dm table's), so a crash never leaks one.
* ``lo_file_name`` is a free 64-byte label the kernel keeps: cowdisk writes its tag
  there so recovery can tell its loops from anyone else's.
* On 6.11+ ``LOOP_CLR_FD`` only marks the device; the detach happens at the last close.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import time
from dataclasses import dataclass

from ..errors import KernelError
from .ioc import IO

log = logging.getLogger(__name__)

# The UAPI defines these as plain numbers (0x4C00...), which equal _IO('L', nr):
# the argument (an fd, a struct pointer or nothing) is not encoded in the number.
LOOP_IOC_TYPE = ord("L")
LOOP_SET_FD = IO(LOOP_IOC_TYPE, 0x00)
LOOP_CLR_FD = IO(LOOP_IOC_TYPE, 0x01)
LOOP_SET_STATUS64 = IO(LOOP_IOC_TYPE, 0x04)
LOOP_GET_STATUS64 = IO(LOOP_IOC_TYPE, 0x05)
LOOP_SET_CAPACITY = IO(LOOP_IOC_TYPE, 0x07)
LOOP_SET_DIRECT_IO = IO(LOOP_IOC_TYPE, 0x08)
LOOP_SET_BLOCK_SIZE = IO(LOOP_IOC_TYPE, 0x09)
LOOP_CONFIGURE = IO(LOOP_IOC_TYPE, 0x0A)
LOOP_CTL_ADD = IO(LOOP_IOC_TYPE, 0x80)
LOOP_CTL_REMOVE = IO(LOOP_IOC_TYPE, 0x81)
LOOP_CTL_GET_FREE = IO(LOOP_IOC_TYPE, 0x82)

LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_PARTSCAN = 8
LO_FLAGS_DIRECT_IO = 16

LO_NAME_SIZE = 64
LOOP_MAJOR = 7

# struct loop_info64 (232 bytes) and struct loop_config (304 bytes)
loop_info64 = struct.Struct("=5Q4I64s64s32s2Q")
loop_config = struct.Struct("=II5Q4I64s64s32s2Q8Q")
assert loop_info64.size == 232 and loop_config.size == 304

CONTROL = "/dev/loop-control"
ATTACH_ATTEMPTS = 64


@dataclass(frozen=True)
class LoopStatus:
    """What LOOP_GET_STATUS64 says about a bound loop."""

    number: int
    backing_dev: int
    backing_inode: int
    offset: int
    sizelimit: int
    flags: int
    label: str

    @property
    def read_only(self) -> bool:
        return bool(self.flags & LO_FLAGS_READ_ONLY)

    @property
    def autoclear(self) -> bool:
        return bool(self.flags & LO_FLAGS_AUTOCLEAR)

    @property
    def direct_io(self) -> bool:
        return bool(self.flags & LO_FLAGS_DIRECT_IO)

    @property
    def path(self) -> str:
        return f"/dev/loop{self.number}"


@dataclass(frozen=True)
class LoopInfo:
    """A bound loop as sysfs shows it (no open of the device needed)."""

    number: int
    major: int
    minor: int
    backing_file: str
    read_only: bool
    autoclear: bool
    offset: int
    sizelimit: int

    @property
    def path(self) -> str:
        return f"/dev/loop{self.number}"

    @property
    def devno(self) -> str:
        return f"{self.major}:{self.minor}"


class Loop:
    """An attached loop device whose configuring fd we still hold.

    Close it (or leave the ``with`` block) once something else holds the device (a
    dm table, a mount): with autoclear the loop then lives exactly as long as that
    holder. Closing it with no other holder detaches an autoclear loop at once.
    """

    def __init__(self, number: int, fd: int, backing: str) -> None:
        self.number = number
        self.fd = fd
        self.backing = backing

    @property
    def path(self) -> str:
        return f"/dev/loop{self.number}"

    @property
    def devno(self) -> str:
        st = os.fstat(self.fd)
        return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def detach(self) -> None:
        """LOOP_CLR_FD and close: the loop is freed at its last close."""
        if self.fd < 0:
            raise KernelError("loop detach", self.path, errno.EBADF, detail="already closed")
        try:
            fcntl.ioctl(self.fd, LOOP_CLR_FD, 0)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise KernelError.from_oserror("loop detach", self.path, e) from None
            log.debug("loop detach %s: already unbound", self.path)
        else:
            log.debug("loop detach %s: ok", self.path)
        finally:
            self.close()

    def __enter__(self) -> "Loop":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Loop({self.path}, backing={self.backing!r})"


def _label_bytes(label: str) -> bytes:
    b = label.encode()
    if len(b) > LO_NAME_SIZE - 1:
        b = b[: LO_NAME_SIZE - 1]
    return b


def attach(
    backing: str | os.PathLike[str],
    *,
    read_only: bool = False,
    autoclear: bool = True,
    direct_io: bool = False,
    label: str = "",
    block_size: int = 0,
    offset: int = 0,
    sizelimit: int = 0,
) -> Loop:
    """Find a free loop and bind ``backing`` to it in one step.

    Retries on EBUSY (another process took the same free index). Returns a
    :class:`Loop` holding the configuring fd.
    """
    path = os.fspath(backing)
    flags = 0
    if read_only:
        flags |= LO_FLAGS_READ_ONLY
    if autoclear:
        flags |= LO_FLAGS_AUTOCLEAR
    if direct_io:
        flags |= LO_FLAGS_DIRECT_IO
    mode = os.O_RDONLY if read_only else os.O_RDWR
    try:
        bfd = os.open(path, mode | os.O_CLOEXEC)
    except OSError as e:
        raise KernelError.from_oserror("loop attach: open backing file", path, e) from None
    try:
        cfg = loop_config.pack(
            bfd, block_size, 0, 0, 0, offset, sizelimit, 0, 0, 0, flags,
            _label_bytes(label), b"", b"", 0, 0, *([0] * 8),
        )
        try:
            ctl = os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KernelError.from_oserror("loop attach: open", CONTROL, e,
                                           hint="is the loop module loaded?") from None
        try:
            last: OSError | None = None
            for _ in range(ATTACH_ATTEMPTS):
                try:
                    n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
                except OSError as e:
                    raise KernelError.from_oserror("loop attach: LOOP_CTL_GET_FREE", CONTROL, e) from None
                dev = f"/dev/loop{n}"
                dfd = _open_loop_node(n, mode)
                try:
                    fcntl.ioctl(dfd, LOOP_CONFIGURE, cfg)
                except OSError as e:
                    os.close(dfd)
                    if e.errno in (errno.EBUSY, errno.EAGAIN):
                        last = e  # lost the race for this index: ask again
                        continue
                    raise KernelError.from_oserror("loop attach: LOOP_CONFIGURE", f"{dev} <- {path}", e) from None
                log.debug("loop attach %s <- %s: ok (flags %#x, label %r)", dev, path, flags, label)
                return Loop(n, dfd, path)
            assert last is not None
            raise KernelError.from_oserror("loop attach", path, last,
                                           hint=f"every free loop was taken by others {ATTACH_ATTEMPTS} times")
        finally:
            os.close(ctl)
    finally:
        os.close(bfd)


def _open_loop_node(n: int, mode: int) -> int:
    dev = f"/dev/loop{n}"
    for attempt in range(16):
        try:
            return os.open(dev, mode | os.O_CLOEXEC)
        except FileNotFoundError:
            # no devtmpfs node yet (containers, or udev slow): make it ourselves
            try:
                with open(f"/sys/block/loop{n}/dev") as f:
                    maj, mn = (int(x) for x in f.read().split(":"))
                os.mknod(dev, 0o660 | 0o060000, os.makedev(maj, mn))
                log.debug("loop mknod %s: ok (%d:%d)", dev, maj, mn)
            except FileExistsError:
                pass
            except OSError:
                time.sleep(0.025)
        except OSError as e:
            raise KernelError.from_oserror("loop attach: open", dev, e) from None
    raise KernelError("loop attach: open", dev, errno.ENOENT)


def open_loop(number: int, *, read_only: bool = True) -> int:
    """Open /dev/loopN (O_CLOEXEC); the caller closes the fd."""
    dev = f"/dev/loop{number}"
    try:
        return os.open(dev, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as e:
        raise KernelError.from_oserror("loop open", dev, e) from None


def get_status(fd: int, name: str = "loop") -> LoopStatus:
    try:
        out = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(loop_info64.size))
    except OSError as e:
        raise KernelError.from_oserror("loop status", name, e) from None
    f = loop_info64.unpack(out)
    return LoopStatus(
        number=f[5], backing_dev=f[0], backing_inode=f[1], offset=f[3], sizelimit=f[4],
        flags=f[8], label=f[9].split(b"\0", 1)[0].decode(errors="replace"),
    )


def status(number: int) -> LoopStatus:
    """LOOP_GET_STATUS64 of /dev/loopN. Note the open delays a pending autoclear until closed."""
    fd = open_loop(number)
    try:
        return get_status(fd, f"/dev/loop{number}")
    finally:
        os.close(fd)


def detach(number: int, *, missing_ok: bool = False) -> None:
    """LOOP_CLR_FD on /dev/loopN. If others hold it, it goes at their last close."""
    dev = f"/dev/loop{number}"
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if missing_ok and e.errno in (errno.ENOENT, errno.ENXIO):
            log.debug("loop detach %s: no such device", dev)
            return
        raise KernelError.from_oserror("loop detach: open", dev, e) from None
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD, 0)
    except OSError as e:
        if not (missing_ok and e.errno == errno.ENXIO):
            raise KernelError.from_oserror("loop detach", dev, e) from None
        log.debug("loop detach %s: already unbound", dev)
    else:
        log.debug("loop detach %s: ok", dev)
    finally:
        os.close(fd)


def set_autoclear(number: int, on: bool = True) -> None:
    fd = open_loop(number)
    try:
        st = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(loop_info64.size))
        f = list(loop_info64.unpack(st))
        f[8] = (f[8] | LO_FLAGS_AUTOCLEAR) if on else (f[8] & ~LO_FLAGS_AUTOCLEAR)
        fcntl.ioctl(fd, LOOP_SET_STATUS64, loop_info64.pack(*f))
    except OSError as e:
        raise KernelError.from_oserror("loop set autoclear", f"/dev/loop{number}", e) from None
    finally:
        os.close(fd)
    log.debug("loop set autoclear /dev/loop%d: ok (%s)", number, "on" if on else "off")


def set_capacity(number: int) -> None:
    """Re-read the backing file's size (after it grew)."""
    fd = open_loop(number)
    try:
        fcntl.ioctl(fd, LOOP_SET_CAPACITY, 0)
    except OSError as e:
        raise KernelError.from_oserror("loop set capacity", f"/dev/loop{number}", e) from None
    finally:
        os.close(fd)
    log.debug("loop set capacity /dev/loop%d: ok", number)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def info(number: int) -> LoopInfo | None:
    """sysfs view of /dev/loopN, or None when it is not bound."""
    base = f"/sys/block/loop{number}"
    try:
        backing = _read(f"{base}/loop/backing_file")
        maj, mn = (int(x) for x in _read(f"{base}/dev").split(":"))
        ro = _read(f"{base}/ro") == "1"
        ac = _read(f"{base}/loop/autoclear") == "1"
        off = int(_read(f"{base}/loop/offset"))
        lim = int(_read(f"{base}/loop/sizelimit"))
    except ValueError:
        return None  # detached while we read
    except OSError as e:  # unbound (ENOENT), or in rundown while we read (ENODEV, ENXIO)
        if e.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
            return None
        raise
    return LoopInfo(number, maj, mn, backing, ro, ac, off, lim)


def list_loops() -> list[LoopInfo]:
    """Every bound loop on the host, with its backing file, from sysfs."""
    out = []
    try:
        names = os.listdir("/sys/block")
    except FileNotFoundError:
        return []
    for name in names:
        if not name.startswith("loop") or not name[4:].isdigit():
            continue
        li = info(int(name[4:]))
        if li is not None:
            out.append(li)
    out.sort(key=lambda x: x.number)
    return out


def holders(number: int) -> list[str]:
    """Stacked devices (dm-N) holding /dev/loopN. Mounts do not show here."""
    try:
        return sorted(os.listdir(f"/sys/block/loop{number}/holders"))
    except FileNotFoundError:
        return []


def find_by_backing(path: str | os.PathLike[str]) -> list[LoopInfo]:
    """Bound loops whose backing file is ``path`` (compared by device and inode)."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return []
    out = []
    for li in list_loops():
        bf = li.backing_file
        if bf.endswith(" (deleted)"):
            continue
        try:
            bst = os.stat(bf)
        except OSError:
            continue
        if (bst.st_dev, bst.st_ino) == (st.st_dev, st.st_ino):
            out.append(li)
    return out


def number_from_path(dev: str) -> int:
    """3 for '/dev/loop3' (or 'loop3')."""
    base = os.path.basename(dev)
    if not base.startswith("loop") or not base[4:].isdigit():
        raise ValueError(f"not a loop device: {dev}")
    return int(base[4:])
