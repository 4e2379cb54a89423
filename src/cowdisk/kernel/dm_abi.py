"""The device-mapper ioctl ABI: ``include/uapi/linux/dm-ioctl.h`` (interface 4.x) in Python.

Struct layouts, ioctl numbers, flags, the records the kernel returns, name
validation, and the pure functions that pack request buffers and parse replies.
Nothing here opens a file or calls the kernel, so all of it is unit-tested against
golden bytes (tests/unit/test_dm_pack.py); :mod:`cowdisk.kernel.dm` sends the
buffers.  Layouts and their quirks are described in docs/reference/device-mapper.md.

Caller mistakes (a bad name, an empty table) raise
:class:`cowdisk.errors.InvalidArgument` before any ioctl.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Sequence

from ..errors import InvalidArgument
from .ioc import IOWR

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
DM_IOCTL = 0xFD
DM_VERSION = IOWR(DM_IOCTL, 0, dm_ioctl)
DM_REMOVE_ALL = IOWR(DM_IOCTL, 1, dm_ioctl)  # never used: it removes every unopened device on the host
DM_LIST_DEVICES = IOWR(DM_IOCTL, 2, dm_ioctl)
DM_DEV_CREATE = IOWR(DM_IOCTL, 3, dm_ioctl)
DM_DEV_REMOVE = IOWR(DM_IOCTL, 4, dm_ioctl)
DM_DEV_RENAME = IOWR(DM_IOCTL, 5, dm_ioctl)
DM_DEV_SUSPEND = IOWR(DM_IOCTL, 6, dm_ioctl)
DM_DEV_STATUS = IOWR(DM_IOCTL, 7, dm_ioctl)
DM_DEV_WAIT = IOWR(DM_IOCTL, 8, dm_ioctl)
DM_TABLE_LOAD = IOWR(DM_IOCTL, 9, dm_ioctl)
DM_TABLE_CLEAR = IOWR(DM_IOCTL, 10, dm_ioctl)
DM_TABLE_DEPS = IOWR(DM_IOCTL, 11, dm_ioctl)
DM_TABLE_STATUS = IOWR(DM_IOCTL, 12, dm_ioctl)
DM_LIST_VERSIONS = IOWR(DM_IOCTL, 13, dm_ioctl)
DM_TARGET_MSG = IOWR(DM_IOCTL, 14, dm_ioctl)
DM_DEV_SET_GEOMETRY = IOWR(DM_IOCTL, 15, dm_ioctl)
DM_DEV_ARM_POLL = IOWR(DM_IOCTL, 16, dm_ioctl)
DM_GET_TARGET_VERSION = IOWR(DM_IOCTL, 17, dm_ioctl)
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
V_NAME_LIST_TAIL = (4, 38)

# Starting output buffer for commands that return data (libdevmapper uses 16 KiB),
# doubled on DM_BUFFER_FULL_FLAG up to the kernel's 1 GiB cap.
DATA_BUFFER = 16 * 1024
MAX_BUFFER = 1 << 30

_RESERVED_NAMES = frozenset({".", "..", "control"})


def align8(n: int) -> int:
    """``n`` rounded up to a multiple of 8 (records in dm buffers are 8-aligned)."""
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
        parts.append((t, ttype, params, align8(dm_target_spec.size + len(params) + 1)))
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
    buf = pack_dm_ioctl(data_size=max(size, align8(need)), name=name, version=V_TARGET_MSG)
    dm_target_msg.pack_into(buf, DM_DATA_START, sector)
    start = DM_DATA_START + dm_target_msg.size
    buf[start : start + len(msg)] = msg
    return buf


def cstr(buf: bytes | bytearray | memoryview, off: int, end: int | None = None) -> tuple[str, int]:
    """Decode the C string at ``off``; return it and the offset of its NUL."""
    b = bytes(buf[off:end]) if end is not None else bytes(buf[off:])
    nul = b.find(b"\0")
    if nul < 0:
        raise ValueError(f"unterminated string at offset {off}")
    return os.fsdecode(b[:nul]), off + nul


def data_range(buf: bytes | bytearray) -> tuple[int, int]:
    """(data_start, data_size) of a returned header: the payload is buf[data_start:data_size]."""
    data_size, data_start = struct.unpack_from("=II", buf, 12)
    return data_start, data_size


def decode_dev(dev: int) -> tuple[int, int]:
    # The kernel's new_encode_dev, equal to glibc's makedev below major 4096 / minor 2^20.
    return (dev >> 8) & 0xFFF, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)


def parse_dm_ioctl(buf: bytes | bytearray) -> DeviceInfo:
    """Decode the header of a returned buffer."""
    (v0, v1, v2, _ds, _dst, target_count, open_count, flags, event_nr, _pad, dev, name, uuid, _d) = (
        dm_ioctl.unpack_from(buf, 0)
    )
    major, minor = decode_dev(dev)
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
    tail = kernel_version[:2] >= V_NAME_LIST_TAIL
    off = data_start
    while True:
        dev, nxt = dm_name_list.unpack_from(buf, off)
        if dev == 0 and nxt == 0 and not out:
            break  # kernels older than the data_size convention: a lone end marker
        name, nul = cstr(buf, off + dm_name_list.size, data_size)
        uuid: str | None = None
        event_nr: int | None = None
        if tail:
            t = off + align8(nul + 1 - off)
            if t + dm_name_list_tail.size <= data_size:
                event_nr, nflags = dm_name_list_tail.unpack_from(buf, t)
                if nflags & DM_NAME_LIST_FLAG_HAS_UUID:
                    uuid, _ = cstr(buf, t + dm_name_list_tail.size, data_size)
                elif nflags & DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID:
                    uuid = ""
        major, minor = decode_dev(dev)
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
        text, _ = cstr(buf, at + dm_target_spec.size, data_size)
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
        name, _ = cstr(buf, off + dm_target_versions.size, data_size)
        out[name] = (a, b, c)
        if nxt == 0:
            break
        off += nxt
        if off >= data_size:
            raise ValueError("dm_target_versions chain runs past data_size")
    return out
