"""Device-mapper through the ioctl interface of ``/dev/mapper/control``.

Mirrors ``include/uapi/linux/dm-ioctl.h`` (interface 4.x).  Every buffer is packed
by hand with :mod:`struct`; no dmsetup, no libdevmapper.  This module has no policy:
it names devices exactly as told, does not retry anything except :meth:`Control.remove`
while the device is briefly busy (the kernel answers EBUSY to a udev probe that holds
the device for a moment), and keeps no state besides the control fd.

Every kernel failure raises :class:`cowdisk.errors.KernelError` with ``op`` (e.g.
``"dm create"``), ``obj`` (the dm name) and ``errno``.  Table failures carry the
kernel's own reason (the ``device-mapper: ...`` lines printed to ``/dev/kmsg`` during
the call) in the message.  Caller mistakes (a bad name) raise
:class:`cowdisk.errors.InvalidArgument` before any ioctl.

Errnos worth knowing (checked on Debian 6.1, see reference/device-mapper.md):

- ``EBUSY``: create of a name or uuid that exists; remove of an open device.
- ``ENXIO``: no device of that name (:func:`is_gone` tests for it).
- ``EINVAL`` / ``ENODEV`` / constructor errno: a bad table; see the message.

Units are 512-byte sectors.  Devices are handed out as ``/dev/dm-<minor>``
(:func:`device_node`); ``/dev/mapper/<name>`` is never relied on.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from cowdisk.errors import InvalidArgument, KernelError

log = logging.getLogger(__name__)

CONTROL_PATH = "/dev/mapper/control"
#: misc char device major:minor of the control node (MAPPER_CTRL_MINOR).
CONTROL_MAJOR = 10
CONTROL_MINOR = 236

# ---------------------------------------------------------------------------
# Structures
# ---------------------------------------------------------------------------

# struct dm_ioctl {
#     __u32 version[3];        /* in/out */
#     __u32 data_size;         /* total size of data passed in, including this struct */
#     __u32 data_start;        /* offset to start of data relative to start of this struct */
#     __u32 target_count;      /* in/out */
#     __s32 open_count;        /* out */
#     __u32 flags;             /* in/out */
#     __u32 event_nr;          /* in/out */
#     __u32 padding;
#     __u64 dev;               /* in/out */
#     char name[DM_NAME_LEN];  /* device name, 128 */
#     char uuid[DM_UUID_LEN];  /* unique identifier for the block device, 129 */
#     char data[7];            /* padding or data */
# };
dm_ioctl = struct.Struct("=3IIIIiIIIQ128s129s7s")
assert dm_ioctl.size == 312

# struct dm_target_spec {
#     __u64 sector_start;
#     __u64 length;
#     __s32 status;            /* used when reading from kernel only */
#     __u32 next;              /* in: offset from this spec; out: offset from data_start */
#     char target_type[DM_MAX_TYPE_NAME];   /* 16 */
# };  /* followed by the NUL-terminated parameter string */
dm_target_spec = struct.Struct("=QQiI16s")
assert dm_target_spec.size == 40

# struct dm_name_list {
#     __u64 dev;
#     __u32 next;              /* offset to the next record from the _start_ of this */
#     char name[];
#     /* then, 8-aligned: __u32 event_nr; __u32 flags; char uuid[] (if HAS_UUID) */
# };
dm_name_list = struct.Struct("=QI")
dm_name_list_tail = struct.Struct("=II")

# struct dm_target_versions {
#     __u32 next;
#     __u32 version[3];
#     char name[];
# };
dm_target_versions = struct.Struct("=I3I")

# struct dm_target_msg {
#     __u64 sector;            /* device sector */
#     char message[];
# };
dm_target_msg = struct.Struct("=Q")

DM_NAME_LEN = 128
DM_UUID_LEN = 129
DM_MAX_TYPE_NAME = 16
DM_DATA_START = dm_ioctl.size  # payloads always start right after the header

# ioctl numbers: _IOWR(DM_IOCTL, nr, struct dm_ioctl), computed from the Struct size.
_IOC_WRITE = 1
_IOC_READ = 2
DM_IOCTL = 0xFD


def _iowr(nr: int, size: int) -> int:
    return ((_IOC_READ | _IOC_WRITE) << 30) | (size << 16) | (DM_IOCTL << 8) | nr


DM_VERSION = _iowr(0, dm_ioctl.size)
DM_REMOVE_ALL = _iowr(1, dm_ioctl.size)  # never used: it removes every unopened device on the host
DM_LIST_DEVICES = _iowr(2, dm_ioctl.size)
DM_DEV_CREATE = _iowr(3, dm_ioctl.size)
DM_DEV_REMOVE = _iowr(4, dm_ioctl.size)
DM_DEV_RENAME = _iowr(5, dm_ioctl.size)
DM_DEV_SUSPEND = _iowr(6, dm_ioctl.size)
DM_DEV_STATUS = _iowr(7, dm_ioctl.size)
DM_DEV_WAIT = _iowr(8, dm_ioctl.size)
DM_TABLE_LOAD = _iowr(9, dm_ioctl.size)
DM_TABLE_CLEAR = _iowr(10, dm_ioctl.size)
DM_TABLE_DEPS = _iowr(11, dm_ioctl.size)
DM_TABLE_STATUS = _iowr(12, dm_ioctl.size)
DM_LIST_VERSIONS = _iowr(13, dm_ioctl.size)
DM_TARGET_MSG = _iowr(14, dm_ioctl.size)
DM_DEV_SET_GEOMETRY = _iowr(15, dm_ioctl.size)
DM_DEV_ARM_POLL = _iowr(16, dm_ioctl.size)
DM_GET_TARGET_VERSION = _iowr(17, dm_ioctl.size)
assert DM_VERSION == 0xC138FD00 and DM_GET_TARGET_VERSION == 0xC138FD11

# Flags (dm_ioctl.flags).
DM_READONLY_FLAG = 1 << 0
DM_SUSPEND_FLAG = 1 << 1
DM_PERSISTENT_DEV_FLAG = 1 << 3
DM_STATUS_TABLE_FLAG = 1 << 4
DM_ACTIVE_PRESENT_FLAG = 1 << 5
DM_INACTIVE_PRESENT_FLAG = 1 << 6
DM_BUFFER_FULL_FLAG = 1 << 8
DM_SKIP_BDGET_FLAG = 1 << 9
DM_SKIP_LOCKFS_FLAG = 1 << 10
DM_NOFLUSH_FLAG = 1 << 11
DM_QUERY_INACTIVE_TABLE_FLAG = 1 << 12
DM_UEVENT_GENERATED_FLAG = 1 << 13
DM_UUID_FLAG = 1 << 14
DM_SECURE_DATA_FLAG = 1 << 15
DM_DATA_OUT_FLAG = 1 << 16
DM_DEFERRED_REMOVE = 1 << 17
DM_INTERNAL_SUSPEND_FLAG = 1 << 18

# dm_name_list flags (after the name).
DM_NAME_LIST_FLAG_HAS_UUID = 1
DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID = 2

# Lowest interface version each command needs.  Major must equal the kernel's and
# minor be <= the kernel's, so asking for the header's own minor would fail on
# older kernels: ask for the least each command needs (as libdevmapper does).
V_BASIC = (4, 0, 0)
V_LIST_VERSIONS = (4, 1, 0)
V_TARGET_MSG = (4, 2, 0)
V_GET_TARGET_VERSION = (4, 41, 0)
# Kernels from 4.38 put event_nr/flags (and the uuid) after each dm_name_list name.
_V_NAME_LIST_TAIL = (4, 38)

# Starting output buffer for commands that return data (libdevmapper uses 16 KiB),
# doubled on DM_BUFFER_FULL_FLAG up to the kernel's 1 GiB cap.
_DATA_BUFFER = 16 * 1024
_MAX_BUFFER = 1 << 30

_RESERVED_NAMES = frozenset({".", "..", "control"})


def _kernel_error(op: str, obj: str, err: int, detail: str = "", hint: str = "") -> KernelError:
    """Build a KernelError, making sure ``errno`` and ``strerror`` are set.

    Early ``cowdisk.errors`` (before 8b283a0) lost them in ``OSError.__init__``;
    setting them again is harmless and keeps :func:`is_gone` and errno checks true.
    """
    exc = KernelError(op, obj, err, detail=detail, hint=hint)
    exc.errno = err
    exc.strerror = os.strerror(err) if err else ""
    return exc


def _align8(n: int) -> int:
    return (n + 7) & ~7


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One line of a table to load: ``<start> <length> <type> <params>`` (sectors)."""

    start: int
    length: int
    type: str
    params: str

    def line(self) -> str:
        """The line as dmsetup would print or accept it."""
        return f"{self.start} {self.length} {self.type} {self.params}".rstrip()


@dataclass(frozen=True)
class TargetLine:
    """One target of a live table as TABLE_STATUS returns it.

    ``text`` is the target's parameters (:meth:`Control.table`) or its status line
    (:meth:`Control.status`), exactly as the kernel printed it.
    """

    start: int
    length: int
    type: str
    text: str


@dataclass(frozen=True)
class DeviceName:
    """One entry of DM_LIST_DEVICES.

    ``uuid`` is ``None`` when the kernel (before 4.38) did not say, ``""`` when the
    device has none.  ``event_nr`` is ``None`` on such old kernels.
    """

    name: str
    major: int
    minor: int
    uuid: str | None
    event_nr: int | None = None

    @property
    def dev(self) -> int:
        """The device number as ``os.makedev`` encodes it."""
        return os.makedev(self.major, self.minor)


@dataclass(frozen=True)
class DeviceInfo:
    """The ``struct dm_ioctl`` header the kernel returns for one device (DM_DEV_STATUS).

    ``target_count`` counts the live table's targets.  A device made by
    DM_DEV_CREATE has neither table, and no ``/dev/dm-N`` node until its first
    table load.  ``flags`` keeps the raw word; the booleans decode its output bits.
    """

    name: str
    uuid: str
    major: int
    minor: int
    open_count: int
    event_nr: int
    target_count: int
    flags: int
    version: tuple[int, int, int]

    @property
    def suspended(self) -> bool:
        return bool(self.flags & DM_SUSPEND_FLAG)

    @property
    def readonly(self) -> bool:
        return bool(self.flags & DM_READONLY_FLAG)

    @property
    def active_table(self) -> bool:
        """A live table is present."""
        return bool(self.flags & DM_ACTIVE_PRESENT_FLAG)

    @property
    def inactive_table(self) -> bool:
        """A staged (loaded, not yet resumed) table is present."""
        return bool(self.flags & DM_INACTIVE_PRESENT_FLAG)

    @property
    def deferred_remove(self) -> bool:
        """Removal is pending until the last close."""
        return bool(self.flags & DM_DEFERRED_REMOVE)

    @property
    def internal_suspend(self) -> bool:
        return bool(self.flags & DM_INTERNAL_SUSPEND_FLAG)

    @property
    def dev(self) -> int:
        return os.makedev(self.major, self.minor)

    @property
    def devno(self) -> str:
        """``"MAJ:MIN"``, the form tables accept."""
        return f"{self.major}:{self.minor}"

    @property
    def node(self) -> str:
        """``/dev/dm-<minor>``; see :func:`device_node` to make sure it exists."""
        return f"/dev/dm-{self.minor}"


# ---------------------------------------------------------------------------
# Validation and packing (pure; unit-tested without a kernel)
# ---------------------------------------------------------------------------


def validate_name(name: str) -> bytes:
    """Check a dm device name and return its bytes.

    The kernel rejects ``/`` and the names ``.``, ``..`` and ``control``, but
    silently truncates names longer than 127 bytes, so the length is checked here.

    :raises InvalidArgument: empty, too long, NUL or ``/`` inside, or reserved.
    """
    if not isinstance(name, str):
        raise InvalidArgument(f"dm name must be a str, not {type(name).__name__}", op="dm", obj=repr(name))
    raw = os.fsencode(name)
    if not raw:
        raise InvalidArgument("dm name is empty", op="dm", obj=name)
    if len(raw) > DM_NAME_LEN - 1:
        raise InvalidArgument(
            f"dm name is {len(raw)} bytes, at most {DM_NAME_LEN - 1} allowed", op="dm", obj=name
        )
    if b"/" in raw or b"\0" in raw:
        raise InvalidArgument("dm name must not contain '/' or NUL", op="dm", obj=name)
    if name in _RESERVED_NAMES:
        raise InvalidArgument(f"dm name {name!r} is reserved", op="dm", obj=name)
    return raw


def validate_uuid(uuid: str) -> bytes:
    """Check a dm uuid (at most 128 bytes, no NUL) and return its bytes."""
    raw = os.fsencode(uuid)
    if len(raw) > DM_UUID_LEN - 1 or b"\0" in raw:
        raise InvalidArgument(f"dm uuid must be at most {DM_UUID_LEN - 1} bytes without NUL", op="dm", obj=uuid)
    return raw


def _validate_target(t: Target) -> tuple[bytes, bytes]:
    ttype = t.type.encode()
    if not ttype or len(ttype) > DM_MAX_TYPE_NAME - 1 or b"\0" in ttype:
        raise InvalidArgument(f"bad dm target type {t.type!r}", op="dm", obj=t.type)
    if t.start < 0 or t.length <= 0:
        raise InvalidArgument(f"bad dm target extent {t.start}+{t.length}", op="dm", obj=t.type)
    params = os.fsencode(t.params)
    if b"\0" in params:
        raise InvalidArgument("dm target parameters contain NUL", op="dm", obj=t.type)
    return ttype, params


def pack_dm_ioctl(
    buf: bytearray | None = None,
    *,
    version: tuple[int, int, int] = V_BASIC,
    data_size: int = DM_DATA_START,
    data_start: int = DM_DATA_START,
    target_count: int = 0,
    flags: int = 0,
    event_nr: int = 0,
    dev: int = 0,
    name: bytes = b"",
    uuid: bytes = b"",
) -> bytearray:
    """Build (or write into ``buf``) a zeroed buffer of ``data_size`` bytes with a header."""
    if buf is None:
        buf = bytearray(data_size)
    dm_ioctl.pack_into(
        buf, 0, *version, data_size, data_start, target_count, 0, flags, event_nr, 0, dev, name, uuid, b""
    )
    return buf


def pack_table_load(
    name: bytes, targets: Sequence[Target], flags: int = 0, version: tuple[int, int, int] = V_BASIC
) -> bytearray:
    """Build the DM_TABLE_LOAD buffer: header, then per target a spec and its params.

    Each spec's ``next`` is ``align8(40 + len(params) + 1)``, the distance to the
    following spec (libdevmapper's layout; the last one's is never read).
    """
    if not targets:
        raise InvalidArgument("a dm table needs at least one target", op="dm load table", obj=os.fsdecode(name))
    parts = []
    for t in targets:
        ttype, params = _validate_target(t)
        parts.append((t, ttype, params, _align8(dm_target_spec.size + len(params) + 1)))
    size = DM_DATA_START + sum(p[3] for p in parts)
    buf = pack_dm_ioctl(data_size=size, target_count=len(parts), flags=flags, name=name, version=version)
    off = DM_DATA_START
    for t, ttype, params, step in parts:
        dm_target_spec.pack_into(buf, off, t.start, t.length, 0, step, ttype)
        start = off + dm_target_spec.size
        buf[start : start + len(params)] = params
        off += step
    return buf


def pack_target_msg(name: bytes, sector: int, text: str, size: int) -> bytearray:
    """Build a DM_TARGET_MSG buffer of ``size`` bytes (room for the reply)."""
    msg = os.fsencode(text)
    need = DM_DATA_START + dm_target_msg.size + len(msg) + 1
    buf = pack_dm_ioctl(data_size=max(size, _align8(need)), name=name, version=V_TARGET_MSG)
    dm_target_msg.pack_into(buf, DM_DATA_START, sector)
    start = DM_DATA_START + dm_target_msg.size
    buf[start : start + len(msg)] = msg
    return buf


def _cstr(buf: bytes | bytearray | memoryview, off: int, end: int | None = None) -> tuple[str, int]:
    """Decode the C string at ``off``; return it and the offset of its NUL."""
    b = bytes(buf[off:end]) if end is not None else bytes(buf[off:])
    nul = b.find(b"\0")
    if nul < 0:
        raise ValueError(f"unterminated string at offset {off}")
    return os.fsdecode(b[:nul]), off + nul


def _data_range(buf: bytes | bytearray) -> tuple[int, int]:
    """(data_start, data_size) of a returned header: the payload is buf[data_start:data_size]."""
    data_size, data_start = struct.unpack_from("=II", buf, 12)
    return data_start, data_size


def _decode_dev(dev: int) -> tuple[int, int]:
    # The kernel's new_encode_dev, equal to glibc's makedev below major 4096 / minor 2^20.
    return (dev >> 8) & 0xFFF, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)


def parse_dm_ioctl(buf: bytes | bytearray) -> DeviceInfo:
    """Decode the header of a returned buffer."""
    (v0, v1, v2, _ds, _dst, target_count, open_count, flags, event_nr, _pad, dev, name, uuid, _d) = (
        dm_ioctl.unpack_from(buf, 0)
    )
    major, minor = _decode_dev(dev)
    return DeviceInfo(
        name=os.fsdecode(name.split(b"\0", 1)[0]),
        uuid=os.fsdecode(uuid.split(b"\0", 1)[0]),
        major=major,
        minor=minor,
        open_count=open_count,
        event_nr=event_nr,
        target_count=target_count,
        flags=flags,
        version=(v0, v1, v2),
    )


def parse_name_list(
    buf: bytes | bytearray, data_start: int, data_size: int, kernel_version: tuple[int, int, int] = (4, 38, 0)
) -> list[DeviceName]:
    """Decode the ``dm_name_list`` chain DM_LIST_DEVICES wrote at ``data_start``.

    An empty list comes back as ``data_size == data_start`` (the kernel's ``dev == 0``
    end marker is not copied back).  From interface 4.38 each name is followed, at
    the next 8-byte offset from the record start, by ``event_nr``, ``flags`` and,
    with DM_NAME_LIST_FLAG_HAS_UUID, the uuid.
    """
    out: list[DeviceName] = []
    if data_size <= data_start:
        return out
    tail = kernel_version[:2] >= _V_NAME_LIST_TAIL
    off = data_start
    while True:
        dev, nxt = dm_name_list.unpack_from(buf, off)
        if dev == 0 and nxt == 0 and not out:
            break  # kernels older than the data_size convention: a lone end marker
        name, nul = _cstr(buf, off + dm_name_list.size, data_size)
        uuid: str | None = None
        event_nr: int | None = None
        if tail:
            t = off + _align8(nul + 1 - off)
            if t + dm_name_list_tail.size <= data_size:
                event_nr, nflags = dm_name_list_tail.unpack_from(buf, t)
                if nflags & DM_NAME_LIST_FLAG_HAS_UUID:
                    uuid, _ = _cstr(buf, t + dm_name_list_tail.size, data_size)
                elif nflags & DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID:
                    uuid = ""
        major, minor = _decode_dev(dev)
        out.append(DeviceName(name=name, major=major, minor=minor, uuid=uuid, event_nr=event_nr))
        if nxt == 0:
            break
        off += nxt
        if off >= data_size:
            raise ValueError("dm_name_list chain runs past data_size")
    return out


def parse_target_specs(buf: bytes | bytearray, data_start: int, target_count: int, data_size: int) -> list[TargetLine]:
    """Decode TABLE_STATUS output: ``target_count`` specs, each followed by its text.

    In output the ``next`` field is relative to ``data_start`` (the first spec),
    unlike on input where it is relative to the spec itself.
    """
    out: list[TargetLine] = []
    off = 0
    for _ in range(target_count):
        at = data_start + off
        if at + dm_target_spec.size > data_size:
            raise ValueError("dm_target_spec runs past data_size")
        start, length, _status, nxt, ttype = dm_target_spec.unpack_from(buf, at)
        text, _ = _cstr(buf, at + dm_target_spec.size, data_size)
        out.append(TargetLine(start, length, ttype.split(b"\0", 1)[0].decode(), text))
        off = nxt
    return out


def parse_target_versions(buf: bytes | bytearray, data_start: int, data_size: int) -> dict[str, tuple[int, int, int]]:
    """Decode the ``dm_target_versions`` chain of DM_LIST_VERSIONS / GET_TARGET_VERSION."""
    out: dict[str, tuple[int, int, int]] = {}
    if data_size <= data_start:
        return out
    off = data_start
    while True:
        nxt, a, b, c = dm_target_versions.unpack_from(buf, off)
        name, _ = _cstr(buf, off + dm_target_versions.size, data_size)
        out[name] = (a, b, c)
        if nxt == 0:
            break
        off += nxt
        if off >= data_size:
            raise ValueError("dm_target_versions chain runs past data_size")
    return out


# ---------------------------------------------------------------------------
# Status lines
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotStatus:
    """A ``snapshot`` target's status line.

    ``state`` is ``"valid"`` (with the three numbers), ``"invalid"`` (COW full
    without overflow reporting, or an I/O error: permanent, kept in the COW header),
    ``"overflow"`` (``PO`` and full), ``"merge_failed"`` or ``"unknown"``.
    ``allocated_sectors`` and ``total_sectors`` both include metadata.
    """

    state: str
    allocated_sectors: int | None = None
    total_sectors: int | None = None
    metadata_sectors: int | None = None

    @property
    def valid(self) -> bool:
        return self.state == "valid"

    @property
    def data_sectors(self) -> int | None:
        """Sectors of COW used for data (allocated minus metadata)."""
        if self.allocated_sectors is None or self.metadata_sectors is None:
            return None
        return self.allocated_sectors - self.metadata_sectors


_SNAPSHOT_WORDS = {"Invalid": "invalid", "Overflow": "overflow", "Merge failed": "merge_failed", "Unknown": "unknown"}


def parse_snapshot_status(text: str) -> SnapshotStatus:
    """Parse ``<allocated>/<total> <metadata>`` or one of the state words.

    :raises ValueError: anything else.
    """
    s = text.strip()
    if s in _SNAPSHOT_WORDS:
        return SnapshotStatus(_SNAPSHOT_WORDS[s])
    words = s.split()
    if len(words) == 2 and words[0].count("/") == 1:
        alloc, total = words[0].split("/")
        try:
            return SnapshotStatus("valid", int(alloc), int(total), int(words[1]))
        except ValueError:
            pass
    raise ValueError(f"unrecognised snapshot status {text!r}")


@dataclass(frozen=True)
class ThinPoolStatus:
    """A ``thin-pool`` target's status line.

    ``state`` is ``"ok"`` (all fields set), ``"fail"`` or ``"error"``.  Metadata
    counts are 4 KiB blocks, data counts pool blocks.  ``mode`` is ``"rw"``, ``"ro"``
    or ``"out_of_data_space"``.  ``metadata_low_watermark`` is ``None`` on kernels
    that do not print it.
    """

    state: str
    transaction_id: int | None = None
    used_metadata_blocks: int | None = None
    total_metadata_blocks: int | None = None
    used_data_blocks: int | None = None
    total_data_blocks: int | None = None
    held_metadata_root: int | None = None
    mode: str | None = None
    discards: str | None = None
    no_space: str | None = None
    needs_check: bool = False
    metadata_low_watermark: int | None = None


def _ratio(word: str) -> tuple[int, int]:
    a, b = word.split("/")
    return int(a), int(b)


def parse_thin_pool_status(text: str) -> ThinPoolStatus:
    """Parse ``<tid> <um>/<tm> <ud>/<td> <held|-> <mode> <discards> <no_space> <needs_check|-> [<lw>]``.

    :raises ValueError: an unknown word or a malformed line.
    """
    words = text.split()
    if words == ["Fail"]:
        return ThinPoolStatus("fail")
    if words == ["Error"]:
        return ThinPoolStatus("error")
    if len(words) < 8:
        raise ValueError(f"unrecognised thin-pool status {text!r}")
    try:
        tid = int(words[0])
        um, tm = _ratio(words[1])
        ud, td = _ratio(words[2])
        held = None if words[3] == "-" else int(words[3])
    except ValueError:
        raise ValueError(f"unrecognised thin-pool status {text!r}") from None
    mode, discards, no_space, check = words[4:8]
    if mode not in ("rw", "ro", "out_of_data_space"):
        raise ValueError(f"unknown thin-pool mode {mode!r} in {text!r}")
    if discards not in ("discard_passdown", "no_discard_passdown", "ignore_discard"):
        raise ValueError(f"unknown thin-pool discard word {discards!r} in {text!r}")
    if no_space not in ("queue_if_no_space", "error_if_no_space"):
        raise ValueError(f"unknown thin-pool no-space word {no_space!r} in {text!r}")
    if check not in ("needs_check", "-"):
        raise ValueError(f"unknown thin-pool check word {check!r} in {text!r}")
    lw = None
    if len(words) >= 9:
        try:
            lw = int(words[8])
        except ValueError:
            raise ValueError(f"unrecognised thin-pool low watermark in {text!r}") from None
    return ThinPoolStatus("ok", tid, um, tm, ud, td, held, mode, discards, no_space, check == "needs_check", lw)


@dataclass(frozen=True)
class ThinStatus:
    """A ``thin`` target's status line.

    ``state`` is ``"ok"``, ``"fail"`` (pool failed) or ``"unknown"`` (a lone ``-``).
    ``highest_mapped_sector`` is ``None`` when nothing is mapped yet.
    """

    state: str
    mapped_sectors: int | None = None
    highest_mapped_sector: int | None = None


def parse_thin_status(text: str) -> ThinStatus:
    """Parse ``<mapped_sectors> <highest_mapped_sector|->``, ``Fail`` or ``-``."""
    words = text.split()
    if words == ["Fail"]:
        return ThinStatus("fail")
    if words == ["-"]:
        return ThinStatus("unknown")
    if len(words) == 2:
        try:
            return ThinStatus("ok", int(words[0]), None if words[1] == "-" else int(words[1]))
        except ValueError:
            pass
    raise ValueError(f"unrecognised thin status {text!r}")


# ---------------------------------------------------------------------------
# Kernel log
# ---------------------------------------------------------------------------


class _Kmsg:
    """Best-effort reader of the device-mapper lines ``/dev/kmsg`` gets during a call.

    One fd, opened non-blocking on first use.  :meth:`mark` seeks to the end before
    a call; :meth:`since_mark` returns the ``device-mapper:`` lines logged after it.
    Any failure (no /dev/kmsg, not permitted) yields no text, never an error.
    """

    def __init__(self) -> None:
        self._fd: int | None = None
        self._broken = False

    def mark(self) -> None:
        if self._broken:
            return
        try:
            if self._fd is None:
                self._fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.lseek(self._fd, 0, os.SEEK_END)
        except OSError:
            self._broken = True
            self.close()

    def since_mark(self) -> str:
        if self._fd is None:
            return ""
        lines: list[str] = []
        for _ in range(1000):
            try:
                rec = os.read(self._fd, 8192)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EPIPE:  # ring overwritten; next read resumes
                    continue
                break
            if not rec:
                break
            text = rec.decode(errors="replace").split(";", 1)[-1].split("\n", 1)[0]
            if text.startswith("device-mapper:"):
                lines.append(text)
        # The table's own reason first: "device-mapper: table: 254:3: snapshot: Cannot get COW device"
        lines.sort(key=lambda s: not s.startswith("device-mapper: table:"))
        return "; ".join(lines)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ---------------------------------------------------------------------------
# Control
# ---------------------------------------------------------------------------

NoDmHint = "device-mapper is not available in this kernel (modprobe dm-mod, or use the kernel lab)"


def is_gone(exc: BaseException) -> bool:
    """True when ``exc`` says the named dm device does not exist (ENXIO)."""
    return isinstance(exc, OSError) and exc.errno == errno.ENXIO


def _open_control(path: str) -> int:
    """Open the control node O_RDWR|O_CLOEXEC, making it (10:236) if missing."""
    made: list[str] = []
    if not os.path.exists(path):
        parent = os.path.dirname(path)
        try:
            if not os.path.isdir(parent):
                os.mkdir(parent, 0o755)
                made.append(parent)
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(CONTROL_MAJOR, CONTROL_MINOR))
            made.append(path)
        except FileExistsError:
            pass  # a concurrent opener (or udev) made it
        except OSError as e:
            raise _kernel_error("dm open control", path, e.errno or 0, detail="cannot create the node", hint=NoDmHint) from e
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        # Opening a misc node with no driver behind it (dm-mod absent) gives ENODEV.
        # Undo the nodes we made so a host without dm is left as found.
        for p in reversed(made):
            try:
                os.rmdir(p) if os.path.isdir(p) else os.unlink(p)
            except OSError:
                pass
        hint = NoDmHint if e.errno in (errno.ENODEV, errno.ENXIO, errno.ENOENT) else ""
        raise _kernel_error("dm open control", path, e.errno or 0, hint=hint) from e


class Control:
    """One open fd of ``/dev/mapper/control`` and the device-mapper commands.

    Use as a context manager (or call :meth:`close`).  Opening creates the control
    node (char 10:236) if it is missing, as libdevmapper does, and removes it again
    if the kernel has no device-mapper; then it raises :class:`KernelError` with a
    hint.  Methods are safe to call from several threads.

    Example::

        with Control() as dm:
            info = dm.create_device("vm1", [Target(0, size, "snapshot", f"{o} {c} P 8")])
            path = device_node(info)
    """

    def __init__(self, path: str = CONTROL_PATH) -> None:
        self.path = path
        self._fd: int | None = _open_control(path)
        self._kmsg = _Kmsg()
        self._kmsg_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("dm control is closed")
        return self._fd

    def close(self) -> None:
        """Close the control fd (and the kmsg reader).  Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        self._kmsg.close()

    def __enter__(self) -> "Control":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------

    def _ioctl(self, req: int, buf: bytearray, op: str, obj: str, kmsg: bool = False) -> None:
        """Run one ioctl; map OSError to KernelError, with the kernel's reason if asked."""
        fd = self.fileno()
        if kmsg:
            with self._kmsg_lock:
                self._kmsg.mark()
                try:
                    fcntl.ioctl(fd, req, buf, True)
                except OSError as e:
                    raise _kernel_error(op, obj, e.errno or 0, detail=self._kmsg.since_mark()) from None
            return
        try:
            fcntl.ioctl(fd, req, buf, True)
        except OSError as e:
            raise _kernel_error(op, obj, e.errno or 0) from None

    def _header_cmd(
        self, req: int, op: str, name: str, flags: int = 0, event_nr: int = 0, kmsg: bool = False
    ) -> DeviceInfo:
        raw = validate_name(name)
        buf = pack_dm_ioctl(flags=flags, event_nr=event_nr, name=raw)
        log.debug("%s name=%s flags=%#x", op, name, flags)
        self._ioctl(req, buf, op, name, kmsg=kmsg)
        return parse_dm_ioctl(buf)

    def _data_cmd(
        self,
        req: int,
        op: str,
        obj: str,
        *,
        name: bytes = b"",
        flags: int = 0,
        version: tuple[int, int, int] = V_BASIC,
        size: int = _DATA_BUFFER,
    ) -> bytearray:
        """Run a command that returns data, doubling the buffer on DM_BUFFER_FULL_FLAG."""
        while True:
            buf = pack_dm_ioctl(data_size=size, flags=flags, name=name, version=version)
            self._ioctl(req, buf, op, obj)
            (out_flags,) = struct.unpack_from("=I", buf, 28)
            if not out_flags & DM_BUFFER_FULL_FLAG:
                return buf
            if size >= _MAX_BUFFER:
                raise _kernel_error(op, obj, errno.ENOBUFS, detail="output larger than 1 GiB")
            size *= 2

    # -- commands ----------------------------------------------------------

    def version(self) -> tuple[int, int, int]:
        """The kernel's device-mapper interface version (DM_VERSION sent as 4.0.0)."""
        buf = pack_dm_ioctl()
        self._ioctl(DM_VERSION, buf, "dm version", self.path)
        return parse_dm_ioctl(buf).version

    def list_devices(self) -> list[DeviceName]:
        """Every dm device on the host (DM_LIST_DEVICES with uuids), sorted by name by current kernels."""
        buf = self._data_cmd(DM_LIST_DEVICES, "dm list", "devices", flags=DM_UUID_FLAG)
        hdr = parse_dm_ioctl(buf)
        data_start, data_size = _data_range(buf)
        return parse_name_list(buf, data_start, data_size, hdr.version)

    def create(self, name: str, uuid: str | None = None, minor: int | None = None) -> DeviceInfo:
        """DM_DEV_CREATE: a device with no table (and no /dev/dm-N until a load).

        :param minor: ask for this minor (DM_PERSISTENT_DEV_FLAG); EBUSY if taken.
        :raises KernelError: EBUSY when the name or uuid exists; EINVAL for a name
            the kernel refuses.
        """
        raw = validate_name(name)
        flags, dev = 0, 0
        if minor is not None:
            flags, dev = DM_PERSISTENT_DEV_FLAG, os.makedev(0, minor)
        buf = pack_dm_ioctl(name=raw, uuid=validate_uuid(uuid) if uuid else b"", flags=flags, dev=dev)
        log.debug("dm create name=%s uuid=%s", name, uuid)
        self._ioctl(DM_DEV_CREATE, buf, "dm create", name)
        return parse_dm_ioctl(buf)

    def load_table(self, name: str, targets: Sequence[Target], readonly: bool = False) -> DeviceInfo:
        """DM_TABLE_LOAD: stage ``targets`` in the inactive slot (resume makes it live).

        :raises KernelError: ENXIO no such device; EINVAL/ENODEV/... a bad table,
            with the kernel's reason from /dev/kmsg in the message.
        """
        raw = validate_name(name)
        buf = pack_table_load(raw, targets, DM_READONLY_FLAG if readonly else 0)
        log.debug("dm load table name=%s table=%s", name, [t.line() for t in targets])
        self._ioctl(DM_TABLE_LOAD, buf, "dm load table", name, kmsg=True)
        return parse_dm_ioctl(buf)

    def clear_table(self, name: str) -> DeviceInfo:
        """DM_TABLE_CLEAR: drop the staged (inactive) table."""
        return self._header_cmd(DM_TABLE_CLEAR, "dm clear table", name)

    def resume(self, name: str) -> DeviceInfo:
        """DM_DEV_SUSPEND without DM_SUSPEND_FLAG: make a staged table live and resume.

        Sends no udev cookie.
        """
        return self._header_cmd(DM_DEV_SUSPEND, "dm resume", name, kmsg=True)

    def suspend(self, name: str, noflush: bool = False, skip_lockfs: bool = False) -> DeviceInfo:
        """DM_DEV_SUSPEND with DM_SUSPEND_FLAG (optionally NOFLUSH / SKIP_LOCKFS)."""
        flags = DM_SUSPEND_FLAG
        if noflush:
            flags |= DM_NOFLUSH_FLAG
        if skip_lockfs:
            flags |= DM_SKIP_LOCKFS_FLAG
        return self._header_cmd(DM_DEV_SUSPEND, "dm suspend", name, flags=flags)

    def info(self, name: str) -> DeviceInfo:
        """DM_DEV_STATUS: open count, flags, device number, event and target counts.

        :raises KernelError: ENXIO when there is no such device.
        """
        return self._header_cmd(DM_DEV_STATUS, "dm info", name)

    def info_by_devno(self, major: int, minor: int) -> DeviceInfo:
        """DM_DEV_STATUS looked up by device number (name and uuid empty)."""
        buf = pack_dm_ioctl(dev=os.makedev(major, minor))
        self._ioctl(DM_DEV_STATUS, buf, "dm info", f"{major}:{minor}")
        return parse_dm_ioctl(buf)

    def devno(self, name: str) -> tuple[int, int]:
        """(major, minor) of the named device."""
        i = self.info(name)
        return i.major, i.minor

    def remove(
        self, name: str, deadline_s: float = 5.0, missing_ok: bool = False, deferred: bool = False
    ) -> DeviceInfo | None:
        """DM_DEV_REMOVE, retrying while the device is busy until ``deadline_s`` passes.

        A udev worker may hold a fresh device open for a moment, so EBUSY is retried
        (10 ms growing to 100 ms between tries).  Once the deadline passes the error
        says the device is still open and its open count.  With ``deferred`` the
        kernel removes a busy device at its last close instead (no retry needed; the
        returned info has ``deferred_remove`` set).  A ``/dev/mapper/<name>`` symlink
        to ``../dm-N`` left behind (see :func:`device_node`) is unlinked.

        :returns: the kernel's last header, or ``None`` if the device was already
            gone and ``missing_ok``.
        :raises KernelError: EBUSY (still open at the deadline); ENXIO (no such
            device, unless ``missing_ok``; :func:`is_gone` tests for it).
        """
        raw = validate_name(name)
        flags = DM_DEFERRED_REMOVE if deferred else 0
        end = time.monotonic() + deadline_s
        pause = 0.01
        while True:
            buf = pack_dm_ioctl(name=raw, flags=flags)
            try:
                fcntl.ioctl(self.fileno(), DM_DEV_REMOVE, buf, True)
            except OSError as e:
                if e.errno == errno.ENXIO and missing_ok:
                    _drop_mapper_link(name)
                    return None
                if e.errno == errno.EBUSY and time.monotonic() < end:
                    time.sleep(min(pause, max(0.0, end - time.monotonic())))
                    pause = min(pause * 2, 0.1)
                    continue
                if e.errno == errno.EBUSY:
                    try:
                        count = str(self.info(name).open_count)
                    except KernelError:
                        count = "unknown"
                    raise _kernel_error(
                        "dm remove",
                        name,
                        errno.EBUSY,
                        detail=f"device is still open (open_count={count}) after {deadline_s:g}s",
                        hint="close whatever holds it (a VM, a mount, a stacked dm device) or use deferred removal",
                    ) from None
                if e.errno == errno.ENXIO:
                    raise _kernel_error("dm remove", name, errno.ENXIO, detail="no such device (already gone)") from None
                raise _kernel_error("dm remove", name, e.errno or 0) from None
            log.debug("dm remove name=%s deferred=%s", name, deferred)
            _drop_mapper_link(name)
            return parse_dm_ioctl(buf)

    def _table_status(self, name: str, flags: int, op: str) -> list[TargetLine]:
        raw = validate_name(name)
        buf = self._data_cmd(DM_TABLE_STATUS, op, name, name=raw, flags=flags)
        hdr = parse_dm_ioctl(buf)
        data_start, data_size = _data_range(buf)
        return parse_target_specs(buf, data_start, hdr.target_count, data_size)

    def table(self, name: str, inactive: bool = False) -> list[TargetLine]:
        """The live (or staged) table: TABLE_STATUS with DM_STATUS_TABLE_FLAG.

        Devices print as ``MAJ:MIN`` whatever the loaded line said.
        """
        flags = DM_STATUS_TABLE_FLAG | (DM_QUERY_INACTIVE_TABLE_FLAG if inactive else 0)
        return self._table_status(name, flags, "dm table")

    def status(self, name: str, noflush: bool = False, inactive: bool = False) -> list[TargetLine]:
        """Each target's status line: TABLE_STATUS without DM_STATUS_TABLE_FLAG.

        :param noflush: thin-pool: report without committing metadata first.
        """
        flags = (DM_NOFLUSH_FLAG if noflush else 0) | (DM_QUERY_INACTIVE_TABLE_FLAG if inactive else 0)
        return self._table_status(name, flags, "dm status")

    def deps(self, name: str) -> list[tuple[int, int]]:
        """DM_TABLE_DEPS: (major, minor) of every device the live table uses."""
        raw = validate_name(name)
        buf = self._data_cmd(DM_TABLE_DEPS, "dm deps", name, name=raw)
        data_start = struct.unpack_from("=I", buf, 16)[0]
        (count,) = struct.unpack_from("=I", buf, data_start)
        devs = struct.unpack_from(f"={count}Q", buf, data_start + 8)
        return [_decode_dev(d) for d in devs]

    def message(self, name: str, sector: int, text: str) -> str | None:
        """DM_TARGET_MSG to the target covering ``sector``; the reply text, if any.

        :raises KernelError: the target's errno (thin-pool: EEXIST for an existing
            thin id, EINVAL for bad arguments), with kernel log lines attached.
        """
        raw = validate_name(name)
        size = _DATA_BUFFER
        while True:
            buf = pack_target_msg(raw, sector, text, size)
            log.debug("dm message name=%s sector=%d text=%s", name, sector, text)
            self._ioctl(DM_TARGET_MSG, buf, "dm message", name, kmsg=True)
            (out_flags,) = struct.unpack_from("=I", buf, 28)
            if out_flags & DM_BUFFER_FULL_FLAG and size < _MAX_BUFFER:
                # The message already ran; only its reply was cut.  Messages that
                # reply (e.g. @stats_list) are read-only, so repeating is harmless.
                size *= 2
                continue
            if not out_flags & DM_DATA_OUT_FLAG:
                return None
            data_start, data_size = _data_range(buf)
            return _cstr(buf, data_start, data_size)[0]

    def list_target_versions(self) -> dict[str, tuple[int, int, int]]:
        """Registered target types and their versions (DM_LIST_VERSIONS, 4.1.0)."""
        buf = self._data_cmd(DM_LIST_VERSIONS, "dm list versions", "targets", version=V_LIST_VERSIONS)
        data_start, data_size = _data_range(buf)
        return parse_target_versions(buf, data_start, data_size)

    def get_target_version(self, target_type: str) -> tuple[int, int, int]:
        """DM_GET_TARGET_VERSION (4.41.0): loads ``dm-<type>`` if needed.

        :raises KernelError: EINVAL for an unknown type (or a kernel before 4.41).
        """
        raw = target_type.encode()
        if not raw or len(raw) > DM_NAME_LEN - 1 or b"\0" in raw:
            raise InvalidArgument(f"bad dm target type {target_type!r}", op="dm target version", obj=target_type)
        buf = self._data_cmd(
            DM_GET_TARGET_VERSION, "dm target version", target_type, name=raw, version=V_GET_TARGET_VERSION, size=2048
        )
        data_start, data_size = _data_range(buf)
        versions = parse_target_versions(buf, data_start, data_size)
        if target_type in versions:
            return versions[target_type]
        if len(versions) == 1:
            return next(iter(versions.values()))
        raise _kernel_error("dm target version", target_type, errno.EINVAL, detail="kernel returned no version")

    def create_device(
        self, name: str, targets: Sequence[Target], readonly: bool = False, uuid: str | None = None
    ) -> DeviceInfo:
        """Create, load and resume a device; remove it again if load or resume fails.

        :returns: the header after resume (live table present).
        :raises KernelError: from whichever step failed; a failure of the cleanup
            remove is attached to it as a note, never raised instead.
        """
        self.create(name, uuid=uuid)
        try:
            self.load_table(name, targets, readonly=readonly)
            return self.resume(name)
        except BaseException as exc:
            try:
                self.remove(name, deadline_s=2.0, missing_ok=True)
            except KernelError as undo:
                exc.add_note(f"cleanup failed: {undo}")
            raise

    def device_node(self, name_or_info: str | DeviceInfo, mapper_link: bool = False) -> str:
        """Return ``/dev/dm-<minor>``, making the node if devtmpfs did not.

        See module-level :func:`device_node`.
        """
        info = self.info(name_or_info) if isinstance(name_or_info, str) else name_or_info
        return _ensure_node(info, mapper_link)


# ---------------------------------------------------------------------------
# Nodes
# ---------------------------------------------------------------------------


def _replace_node(path: str, make: Callable[[str], None]) -> None:
    """Make ``path`` via a temporary name and rename(2), replacing what was there."""
    tmp = f"{path}.cowdisk-{os.getpid()}-{threading.get_ident()}"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    make(tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _ensure_node(info: DeviceInfo, mapper_link: bool) -> str:
    if not (info.active_table or info.inactive_table):
        # The gendisk (and so dm-N) exists only from the first table load on (5.15+);
        # a node made now would open with ENXIO.
        raise _kernel_error(
            "dm device node", info.name, errno.ENXIO, detail="device has no table yet: load one first"
        )
    path = info.node
    rdev = os.makedev(info.major, info.minor)
    try:
        st = os.lstat(path)
        ok = stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev
    except FileNotFoundError:
        ok = False
    if not ok:
        # /dev is not devtmpfs (a container) or the node is stale: make it atomically.
        def mk(p: str) -> None:
            old = os.umask(0)
            try:
                os.mknod(p, stat.S_IFBLK | 0o600, rdev)
            finally:
                os.umask(old)

        try:
            _replace_node(path, mk)
        except OSError as e:
            raise _kernel_error("dm mknod", path, e.errno or 0, detail=f"for {info.name} ({info.devno})") from None
    if mapper_link:
        link = os.path.join(os.path.dirname(CONTROL_PATH), info.name)
        target = f"../dm-{info.minor}"
        try:
            cur = os.readlink(link)
        except OSError:
            cur = None
        if cur != target:
            try:
                os.makedirs(os.path.dirname(link), mode=0o755, exist_ok=True)
                st = None
                try:
                    st = os.lstat(link)
                except FileNotFoundError:
                    pass
                # Keep a block node of the right device (libdevmapper makes those).
                if not (st and stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev):
                    _replace_node(link, lambda p: os.symlink(target, p))
            except OSError as e:
                raise _kernel_error("dm mapper link", link, e.errno or 0) from None
    return path


def _drop_mapper_link(name: str) -> None:
    """Unlink ``/dev/mapper/<name>`` if it is a ``../dm-N`` symlink (the name is gone)."""
    link = os.path.join(os.path.dirname(CONTROL_PATH), name)
    try:
        target = os.readlink(link)
    except OSError:
        return
    if target.startswith("../dm-") and target[6:].isdigit():
        try:
            os.unlink(link)
        except FileNotFoundError:
            pass


# ---------------------------------------------------------------------------
# Module-level convenience over one lazily opened, shared Control
# ---------------------------------------------------------------------------

_shared: Control | None = None
_shared_lock = threading.Lock()


def control() -> Control:
    """The process-wide shared :class:`Control`, opened on first use."""
    global _shared
    c = _shared
    if c is not None and c._fd is not None:
        return c
    with _shared_lock:
        if _shared is None or _shared._fd is None:
            _shared = Control()
        return _shared


def close_shared() -> None:
    """Close the shared control fd (it is reopened on next use)."""
    global _shared
    with _shared_lock:
        if _shared is not None:
            _shared.close()
            _shared = None


def version() -> tuple[int, int, int]:
    """See :meth:`Control.version`."""
    return control().version()


def list_devices() -> list[DeviceName]:
    """See :meth:`Control.list_devices`."""
    return control().list_devices()


def create(name: str, uuid: str | None = None, minor: int | None = None) -> DeviceInfo:
    """See :meth:`Control.create`."""
    return control().create(name, uuid=uuid, minor=minor)


def load_table(name: str, targets: Sequence[Target], readonly: bool = False) -> DeviceInfo:
    """See :meth:`Control.load_table`."""
    return control().load_table(name, targets, readonly=readonly)


def clear_table(name: str) -> DeviceInfo:
    """See :meth:`Control.clear_table`."""
    return control().clear_table(name)


def resume(name: str) -> DeviceInfo:
    """See :meth:`Control.resume`."""
    return control().resume(name)


def suspend(name: str, noflush: bool = False, skip_lockfs: bool = False) -> DeviceInfo:
    """See :meth:`Control.suspend`."""
    return control().suspend(name, noflush=noflush, skip_lockfs=skip_lockfs)


def remove(name: str, deadline_s: float = 5.0, missing_ok: bool = False, deferred: bool = False) -> DeviceInfo | None:
    """See :meth:`Control.remove`."""
    return control().remove(name, deadline_s=deadline_s, missing_ok=missing_ok, deferred=deferred)


def info(name: str) -> DeviceInfo:
    """See :meth:`Control.info`."""
    return control().info(name)


def info_by_devno(major: int, minor: int) -> DeviceInfo:
    """See :meth:`Control.info_by_devno`."""
    return control().info_by_devno(major, minor)


def devno(name: str) -> tuple[int, int]:
    """See :meth:`Control.devno`."""
    return control().devno(name)


def table(name: str, inactive: bool = False) -> list[TargetLine]:
    """See :meth:`Control.table`."""
    return control().table(name, inactive=inactive)


def status(name: str, noflush: bool = False, inactive: bool = False) -> list[TargetLine]:
    """See :meth:`Control.status`."""
    return control().status(name, noflush=noflush, inactive=inactive)


def deps(name: str) -> list[tuple[int, int]]:
    """See :meth:`Control.deps`."""
    return control().deps(name)


def message(name: str, sector: int, text: str) -> str | None:
    """See :meth:`Control.message`."""
    return control().message(name, sector, text)


def list_target_versions() -> dict[str, tuple[int, int, int]]:
    """See :meth:`Control.list_target_versions`."""
    return control().list_target_versions()


def get_target_version(target_type: str) -> tuple[int, int, int]:
    """See :meth:`Control.get_target_version`."""
    return control().get_target_version(target_type)


def create_device(
    name: str, targets: Sequence[Target], readonly: bool = False, uuid: str | None = None
) -> DeviceInfo:
    """See :meth:`Control.create_device`."""
    return control().create_device(name, targets, readonly=readonly, uuid=uuid)


def device_node(name_or_info: str | DeviceInfo, mapper_link: bool = False) -> str:
    """Return ``/dev/dm-<minor>`` for a device, making the node if it is missing.

    devtmpfs makes the node at the first table load; inside a container whose
    ``/dev`` is not devtmpfs nothing appears, so the node is mknod'ed (0600) with
    the device's major:minor, and a wrong node at that path is replaced.  With
    ``mapper_link`` also make ``/dev/mapper/<name>`` a symlink to ``../dm-<minor>``
    (what udev would make; nothing in cowdisk depends on it).  Passing a
    :class:`DeviceInfo` skips the DM_DEV_STATUS lookup.  A node made here is not
    removed with the device (devtmpfs deletes only nodes it made); it is harmless,
    since the next device with that minor is checked and, if needed, replaced.

    :raises KernelError: ENXIO (no such device, or no table loaded yet) or the
        mknod/symlink errno.
    """
    if isinstance(name_or_info, DeviceInfo):
        return _ensure_node(name_or_info, mapper_link)
    return control().device_node(name_or_info, mapper_link=mapper_link)


__all__ = [
    "CONTROL_PATH",
    "Control",
    "DeviceInfo",
    "DeviceName",
    "SnapshotStatus",
    "Target",
    "TargetLine",
    "ThinPoolStatus",
    "ThinStatus",
    "clear_table",
    "close_shared",
    "control",
    "create",
    "create_device",
    "deps",
    "device_node",
    "devno",
    "get_target_version",
    "info",
    "info_by_devno",
    "is_gone",
    "list_devices",
    "list_target_versions",
    "load_table",
    "message",
    "parse_snapshot_status",
    "parse_thin_pool_status",
    "parse_thin_status",
    "remove",
    "resume",
    "status",
    "suspend",
    "table",
    "validate_name",
    "version",
]
