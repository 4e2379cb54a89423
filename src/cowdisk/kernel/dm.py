"""Device-mapper through the ioctl interface of ``/dev/mapper/control``.

The control side: :class:`Control` (one open control fd and every dm command), the
``/dev/dm-N`` nodes, the kernel's reasons from ``/dev/kmsg``, and the errors.  The
ABI (struct layouts, ioctl numbers, flags, the records, packing and parsing) is in
:mod:`cowdisk.kernel.dm_abi`; the target status parsers in
:mod:`cowdisk.kernel.dm_status`.  No dmsetup, no libdevmapper.  This module has no
policy: it names devices exactly as told, does not retry anything except
:meth:`Control.remove` while the device is briefly busy (the kernel answers EBUSY to
a udev probe that holds the device for a moment), and keeps no state besides the
control fd.

Callers hold their own :class:`Control` (``with Control() as dm: ...``) or use the
one shared per process, :func:`control` (reopened after a fork)::

    info = dm.control().create_device(name, [dm.Target(0, sectors, "zero", "")])

Every kernel failure raises :class:`cowdisk.errors.KernelError` with ``op`` (e.g.
``"dm create"``), ``obj`` (the dm name) and ``errno``.  Table failures carry the
kernel's own reason (the ``device-mapper: ...`` lines printed to ``/dev/kmsg`` during
the call) in the message.  Caller mistakes (a bad name) raise
:class:`cowdisk.errors.InvalidArgument` before any ioctl.

Errnos worth knowing (checked on Debian 6.1, see docs/reference/device-mapper.md section 4):

- ``EBUSY``: create of a name or uuid that exists; remove of an open device.
- ``ENXIO``: no device of that name (:func:`is_gone` tests for it).
- ``EINVAL`` / ``ENODEV`` / constructor errno: a bad table; see the message.

Units are 512-byte sectors.  Devices are handed out as ``/dev/dm-<minor>``
(:func:`device_node`); ``/dev/mapper/<name>`` is never relied on.  Each command that
changes state logs one DEBUG record (``dm create <name>: ...``) with its result.
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
from typing import Callable, Sequence

from ..errors import InvalidArgument, KernelError
from .dm_abi import (
    DATA_BUFFER,
    DM_BUFFER_FULL_FLAG,
    DM_DATA_OUT_FLAG,
    DM_DEFERRED_REMOVE,
    DM_DEV_CREATE,
    DM_DEV_REMOVE,
    DM_DEV_STATUS,
    DM_DEV_WAIT,
    DM_DEV_SUSPEND,
    DM_GET_TARGET_VERSION,
    DM_LIST_DEVICES,
    DM_LIST_VERSIONS,
    DM_NAME_LEN,
    DM_NOFLUSH_FLAG,
    DM_PERSISTENT_DEV_FLAG,
    DM_QUERY_INACTIVE_TABLE_FLAG,
    DM_READONLY_FLAG,
    DM_SKIP_LOCKFS_FLAG,
    DM_STATUS_TABLE_FLAG,
    DM_SUSPEND_FLAG,
    DM_TABLE_CLEAR,
    DM_TABLE_DEPS,
    DM_TABLE_LOAD,
    DM_TABLE_STATUS,
    DM_TARGET_MSG,
    DM_UUID_FLAG,
    DM_VERSION,
    MAX_BUFFER,
    V_BASIC,
    V_GET_TARGET_VERSION,
    V_LIST_VERSIONS,
    DeviceInfo,
    DeviceName,
    Target,
    TargetLine,
    cstr,
    data_range,
    decode_dev,
    pack_dm_ioctl,
    pack_table_load,
    pack_target_msg,
    parse_dm_ioctl,
    parse_name_list,
    parse_target_specs,
    parse_target_versions,
    validate_name,
    validate_uuid,
)

log = logging.getLogger(__name__)

CONTROL_PATH = "/dev/mapper/control"
#: misc char device major:minor of the control node (MAPPER_CTRL_MINOR).
CONTROL_MAJOR = 10
CONTROL_MINOR = 236


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
            log.debug("dm mknod %s: ok (char %d:%d)", path, CONTROL_MAJOR, CONTROL_MINOR)
        except FileExistsError:
            pass  # a concurrent opener (or udev) made it
        except OSError as e:
            raise KernelError("dm open control", path, e.errno or 0, detail="cannot create the node", hint=NoDmHint) from e
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
        raise KernelError("dm open control", path, e.errno or 0, hint=hint) from e


def _errname(err: int) -> str:
    return errno.errorcode.get(err, str(err))


def _log_failure(exc: KernelError) -> None:
    log.debug("%s %s: failed: %s", exc.op, exc.obj, _errname(exc.errno or 0))


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

    def _ioctl(
        self, req: int, buf: bytearray, op: str, obj: str, kmsg: bool = False, changes: bool = False
    ) -> None:
        """Run one ioctl; map OSError to KernelError, with the kernel's reason if asked.

        With ``changes`` (a command that changes state) a failure is logged here; the
        caller logs the success with what the kernel returned.
        """
        fd = self.fileno()
        if kmsg:
            with self._kmsg_lock:
                self._kmsg.mark()
                try:
                    fcntl.ioctl(fd, req, buf, True)
                except OSError as e:
                    exc = KernelError(op, obj, e.errno or 0, detail=self._kmsg.since_mark())
                    if changes:
                        _log_failure(exc)
                    raise exc from None
            return
        try:
            fcntl.ioctl(fd, req, buf, True)
        except OSError as e:
            exc = KernelError(op, obj, e.errno or 0)
            if changes:
                _log_failure(exc)
            raise exc from None

    def _header_cmd(
        self,
        req: int,
        op: str,
        name: str,
        flags: int = 0,
        event_nr: int = 0,
        kmsg: bool = False,
        changes: bool = True,
    ) -> DeviceInfo:
        raw = validate_name(name)
        buf = pack_dm_ioctl(flags=flags, event_nr=event_nr, name=raw)
        self._ioctl(req, buf, op, name, kmsg=kmsg, changes=changes)
        info = parse_dm_ioctl(buf)
        if changes:
            log.debug("%s %s: ok (flags %#x in, %#x out)", op, name, flags, info.flags)
        return info

    def _data_cmd(
        self,
        req: int,
        op: str,
        obj: str,
        *,
        name: bytes = b"",
        flags: int = 0,
        version: tuple[int, int, int] = V_BASIC,
        size: int = DATA_BUFFER,
    ) -> bytearray:
        """Run a command that returns data, doubling the buffer on DM_BUFFER_FULL_FLAG."""
        while True:
            buf = pack_dm_ioctl(data_size=size, flags=flags, name=name, version=version)
            self._ioctl(req, buf, op, obj)
            (out_flags,) = struct.unpack_from("=I", buf, 28)
            if not out_flags & DM_BUFFER_FULL_FLAG:
                return buf
            if size >= MAX_BUFFER:
                raise KernelError(op, obj, errno.ENOBUFS, detail="output larger than 1 GiB")
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
        data_start, data_size = data_range(buf)
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
        self._ioctl(DM_DEV_CREATE, buf, "dm create", name, changes=True)
        info = parse_dm_ioctl(buf)
        log.debug("dm create %s: ok (dev %s, uuid %r)", name, info.devno, info.uuid)
        return info

    def load_table(self, name: str, targets: Sequence[Target], readonly: bool = False) -> DeviceInfo:
        """DM_TABLE_LOAD: stage ``targets`` in the inactive slot (resume makes it live).

        :raises KernelError: ENXIO no such device; EINVAL/ENODEV/... a bad table,
            with the kernel's reason from /dev/kmsg in the message.
        """
        raw = validate_name(name)
        buf = pack_table_load(raw, targets, DM_READONLY_FLAG if readonly else 0)
        self._ioctl(DM_TABLE_LOAD, buf, "dm load table", name, kmsg=True, changes=True)
        log.debug("dm load table %s: ok (%s%s)", name, "; ".join(t.line() for t in targets),
                  ", read-only" if readonly else "")
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
        return self._header_cmd(DM_DEV_STATUS, "dm info", name, changes=False)

    def wait_event(self, name: str, event_nr: int) -> DeviceInfo:
        """DM_DEV_WAIT: block until device ``name``'s event counter differs from ``event_nr``
        (at once when it already does), then return its info (``event_nr`` the new count).
        A target raises an event when its state changes (a thin-pool: past its low-water
        mark, out of data space, a mode change); removing the device raises one too, so a
        waiter is woken and its next wait fails with ENXIO. Call it from a thread of its own:
        the buffer is the bare header (the targets' status, which DEV_WAIT also returns, is
        cut off: DM_BUFFER_FULL_FLAG), because ``fcntl.ioctl`` releases the GIL only for a
        buffer of at most 1024 bytes; with a larger one every thread of the process would
        stand still until the event.

        :raises KernelError: ENXIO when there is no such device; EINTR when a signal
            interrupted the wait.
        """
        buf = pack_dm_ioctl(event_nr=event_nr, name=validate_name(name))
        assert len(buf) <= 1024
        self._ioctl(DM_DEV_WAIT, buf, "dm wait event", name)
        return parse_dm_ioctl(buf)

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
                    log.debug("dm remove %s: already gone", name)
                    _drop_mapper_link(name)
                    return None
                if e.errno == errno.EBUSY and time.monotonic() < end:
                    time.sleep(min(pause, max(0.0, end - time.monotonic())))
                    pause = min(pause * 2, 0.1)
                    continue
                log.debug("dm remove %s: failed: %s", name, _errname(e.errno or 0))
                if e.errno == errno.EBUSY:
                    try:
                        count = str(self.info(name).open_count)
                    except KernelError:
                        count = "unknown"
                    raise KernelError(
                        "dm remove",
                        name,
                        errno.EBUSY,
                        detail=f"device is still open (open_count={count}) after {deadline_s:g}s",
                        hint="close whatever holds it (a VM, a mount, a stacked dm device) or use deferred removal",
                    ) from None
                if e.errno == errno.ENXIO:
                    raise KernelError("dm remove", name, errno.ENXIO, detail="no such device (already gone)") from None
                raise KernelError("dm remove", name, e.errno or 0) from None
            info = parse_dm_ioctl(buf)
            log.debug("dm remove %s: ok%s", name, " (deferred)" if info.deferred_remove else "")
            _drop_mapper_link(name)
            return info

    def _table_status(self, name: str, flags: int, op: str) -> list[TargetLine]:
        raw = validate_name(name)
        buf = self._data_cmd(DM_TABLE_STATUS, op, name, name=raw, flags=flags)
        hdr = parse_dm_ioctl(buf)
        data_start, data_size = data_range(buf)
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
        return [decode_dev(d) for d in devs]

    def message(self, name: str, sector: int, text: str) -> str | None:
        """DM_TARGET_MSG to the target covering ``sector``; the reply text, if any.

        :raises KernelError: the target's errno (thin-pool: EEXIST for an existing
            thin id, EINVAL for bad arguments), with kernel log lines attached.
        """
        raw = validate_name(name)
        size = DATA_BUFFER
        while True:
            buf = pack_target_msg(raw, sector, text, size)
            self._ioctl(DM_TARGET_MSG, buf, "dm message", name, kmsg=True, changes=True)
            log.debug("dm message %s: ok (sector %d, %r)", name, sector, text)
            (out_flags,) = struct.unpack_from("=I", buf, 28)
            if out_flags & DM_BUFFER_FULL_FLAG and size < MAX_BUFFER:
                # The message already ran; only its reply was cut.  Messages that
                # reply (e.g. @stats_list) are read-only, so repeating is harmless.
                size *= 2
                continue
            if not out_flags & DM_DATA_OUT_FLAG:
                return None
            data_start, data_size = data_range(buf)
            return cstr(buf, data_start, data_size)[0]

    def list_target_versions(self) -> dict[str, tuple[int, int, int]]:
        """Registered target types and their versions (DM_LIST_VERSIONS, 4.1.0)."""
        buf = self._data_cmd(DM_LIST_VERSIONS, "dm list versions", "targets", version=V_LIST_VERSIONS)
        data_start, data_size = data_range(buf)
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
        data_start, data_size = data_range(buf)
        versions = parse_target_versions(buf, data_start, data_size)
        if target_type in versions:
            return versions[target_type]
        if len(versions) == 1:
            return next(iter(versions.values()))
        raise KernelError("dm target version", target_type, errno.EINVAL, detail="kernel returned no version")

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
        raise KernelError(
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
            raise KernelError("dm mknod", path, e.errno or 0, detail=f"for {info.name} ({info.devno})") from None
        log.debug("dm mknod %s: ok (block %s for %s)", path, info.devno, info.name)
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
                lst: os.stat_result | None = None
                try:
                    lst = os.lstat(link)
                except FileNotFoundError:
                    pass
                # Keep a block node of the right device (libdevmapper makes those).
                if not (lst and stat.S_ISBLK(lst.st_mode) and lst.st_rdev == rdev):
                    _replace_node(link, lambda p: os.symlink(target, p))
                    log.debug("dm mapper link %s: ok (-> %s)", link, target)
            except OSError as e:
                raise KernelError("dm mapper link", link, e.errno or 0) from None
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
            log.debug("dm unlink mapper link %s: ok", link)
        except FileNotFoundError:
            pass


# ---------------------------------------------------------------------------
# One shared Control per process
# ---------------------------------------------------------------------------

_shared: Control | None = None
_shared_pid = 0
_shared_lock = threading.Lock()


def control() -> Control:
    """The process-wide shared :class:`Control`, opened on first use.

    A forked child gets its own on first use (the parent's, with its locks, is
    dropped in the child), so code that runs both before and after a fork may keep
    calling ``control()``.  Do not close it; :func:`close_shared` does.
    """
    global _shared, _shared_pid
    c = _shared
    if c is not None and c._fd is not None and _shared_pid == os.getpid():
        return c
    with _shared_lock:
        if _shared is None or _shared._fd is None or _shared_pid != os.getpid():
            _shared = Control()
            _shared_pid = os.getpid()
        return _shared


def resume_if_suspended(name: str) -> bool:
    """Resume device ``name`` if it is suspended (a process killed between its suspend and
    its resume leaves every I/O to it waiting); True when it was. A device that is gone is
    not an error."""
    try:
        info = control().info(name)
    except KernelError as e:
        if is_gone(e):
            return False
        raise
    if not info.suspended:
        return False
    control().resume(name)
    log.info("resume %s: it was left suspended", name)
    return True


def target_available(target: str) -> tuple[bool, str]:
    """Whether this kernel has device-mapper and its ``target`` (e.g. "snapshot",
    "thin-pool"), and if not, why."""
    try:
        control().version()
    except (KernelError, OSError) as e:
        return False, f"no device-mapper in this kernel ({e})"
    try:
        control().get_target_version(target)
    except (KernelError, OSError) as e:
        return False, f"device-mapper has no {target} target ({e})"
    return True, f"device-mapper with the {target} target"


def close_shared() -> None:
    """Close the shared control fd (it is reopened on next use)."""
    global _shared
    with _shared_lock:
        if _shared is not None:
            _shared.close()
            _shared = None


def _after_fork_in_child() -> None:
    # The parent's lock may have been held by another thread at fork time: make a new
    # one, and close the inherited control (its kmsg lock has the same problem).
    global _shared, _shared_lock
    _shared_lock = threading.Lock()
    old, _shared = _shared, None
    if old is not None:
        try:
            old.close()
        except OSError:
            pass


os.register_at_fork(after_in_child=_after_fork_in_child)


def device_node(info: DeviceInfo, mapper_link: bool = False) -> str:
    """Return ``/dev/dm-<minor>`` for a device, making the node if it is missing.

    devtmpfs makes the node at the first table load; inside a container whose
    ``/dev`` is not devtmpfs nothing appears, so the node is mknod'ed (0600) with
    the device's major:minor, and a wrong node at that path is replaced.  With
    ``mapper_link`` also make ``/dev/mapper/<name>`` a symlink to ``../dm-<minor>``
    (what udev would make; nothing in cowdisk depends on it).  Takes the
    :class:`DeviceInfo` a command returned, so no ioctl is needed;
    :meth:`Control.device_node` also takes a name.  A node made here is not
    removed with the device (devtmpfs deletes only nodes it made); it is harmless,
    since the next device with that minor is checked and, if needed, replaced.

    :raises KernelError: ENXIO (no table loaded yet) or the mknod/symlink errno.
    :raises TypeError: given a name: use ``Control.device_node(name)``.
    """
    if not isinstance(info, DeviceInfo):
        raise TypeError(f"dm.device_node takes a DeviceInfo, not {type(info).__name__}: "
                        "use Control.device_node(name) to look a name up")
    return _ensure_node(info, mapper_link)


__all__ = [
    "CONTROL_PATH",
    "Control",
    "DeviceInfo",
    "DeviceName",
    "NoDmHint",
    "Target",
    "TargetLine",
    "close_shared",
    "control",
    "device_node",
    "is_gone",
]
