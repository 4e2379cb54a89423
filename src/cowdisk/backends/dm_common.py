"""What every device-mapper backend does the same way (dm-snapshot, dm-thin).

On both, an attached volume *is* the dm device ``ctx.dm_name``: whether it is attached,
its device node, its open count, thawing it after a killed copy, staging it in a jail
and releasing a leftover dm device found by recovery's scan do not depend on what the
device's table maps to. :class:`DmVolumeBase` holds those methods once; each backend
adds the table (``create``, ``attach``, ``copy_data`` ...).
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Callable, ClassVar, Iterator

from ..errors import KernelError
from ..kernel import blk, dm, loop, nbd
from ..progress import Progress
from . import KernelObject, LazyOrigin, OpenCount, Thaw, VolumeCtx

log = logging.getLogger(__name__)

DEAD_CONN_TIMEOUT = 30
"""Seconds a lazy template's nbd device holds I/O when its server's connection died,
waiting for a new one (an attach or a create reconnects it), before the I/O fails."""


def dm_available() -> bool:
    """True when this kernel has device-mapper (its control node can be opened)."""
    try:
        dm.control().version()
        return True
    except (KernelError, OSError):
        return False


def dm_exists(name: str) -> bool:
    try:
        dm.control().info(name)
        return True
    except KernelError as e:
        if dm.is_gone(e):
            return False
        raise


def copy_device(dev: str, out_path: str, size: int, progress: Progress | None) -> None:
    """Copy a block device into a new sparse file, skipping all-zero blocks."""
    bs = 1 << 20
    zero = bytes(bs)
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(out, size)
            off = 0
            while off < size:
                data = os.pread(fd, min(bs, size - off), off)
                if not data:
                    break
                if data != zero[: len(data)]:
                    os.pwrite(out, data, off)
                off += len(data)
                if progress:
                    progress(off, size)
            os.fsync(out)
        finally:
            os.close(out)
    finally:
        os.close(fd)


class DmVolumeBase(OpenCount, Thaw, LazyOrigin):
    """The methods of the backend protocol that only look at the volume's dm device."""

    block_device: ClassVar[bool] = True
    lazy_origin: ClassVar[bool] = True
    """Volumes over a lazy template: its nbd device is the origin (see ``hold_lazy_origin``)."""

    def is_attached(self, ctx: VolumeCtx) -> bool:
        return dm_exists(ctx.dm_name)

    def device_path(self, ctx: VolumeCtx) -> str | None:
        """``/dev/dm-<minor>`` of the attached volume (one DM_DEV_STATUS), None when detached."""
        try:
            info = dm.control().info(ctx.dm_name)
        except KernelError as e:
            if dm.is_gone(e):
                return None
            raise
        return dm.device_node(info)

    def open_count(self, ctx: VolumeCtx) -> int | None:
        """How many opens the kernel counts on the volume's dm device (None: not attached)."""
        try:
            return dm.control().info(ctx.dm_name).open_count
        except KernelError as e:
            if dm.is_gone(e):
                return None
            raise

    def thaw(self, ctx: VolumeCtx) -> bool:
        """Resume the volume's device if a killed copy left it suspended (recovery calls it
        for attached volumes nobody works on); True when it was."""
        return dm.resume_if_suspended(ctx.dm_name)

    def stage(self, ctx: VolumeCtx, device: str, dest: str, *, uid: int | None, gid: int | None) -> str:
        """A block device node with the dm device's major:minor."""
        ma, mi = blk.devno(device)
        blk.make_node(dest, ma, mi, uid=uid, gid=gid)
        return dest

    def copy_attached(self, ctx: VolumeCtx, out_path: str) -> None:
        """Copy the attached volume's device into a new sparse file (flatten)."""
        copy_device(dm.control().device_node(ctx.dm_name), out_path, ctx.volume_size, ctx.progress)

    def release_dm(self, obj: KernelObject, *, deadline_s: float = 5.0) -> bool:
        """Remove a leftover dm device of this store (recovery); True when ``obj`` is one."""
        if obj.kind != "dm":
            return False
        dm.control().remove(obj.name, deadline_s=deadline_s, missing_ok=True)
        return True


# -- a template's shared read-only loop ---------------------------------------------------

class TemplateLoops:
    """A template's read-only loop, one per template and store, held by the dm tables that
    use it (autoclear: it goes with the last of them, or with the process that made it if
    that dies first) and found again through the store's record of it
    (``BackendEnv.shared_loop_get``/``shared_loop_set``), checked against the loop's own
    status, rather than made twice. dm-snapshot's origin over a template file; both dm
    backends' origin over a whole lazy template's cache file."""

    def __init__(self, get: Callable[[str], tuple[int, str] | None], put: Callable[[str, int, str], None]) -> None:
        self._get = get
        self._put = put

    def hold(self, tid: str, path: str, label: str, *, direct_io: bool) -> tuple[int, str]:
        """An open fd on template ``tid``'s loop over ``path`` (attached if there is none) and
        its major:minor. Call with the template's lock held; keep the fd until a dm table
        holds the loop."""
        st = os.stat(path)
        known = self._get(tid)
        if known is not None:
            n, devno = known
            try:
                fd = loop.open_loop(n)
            except KernelError:
                fd = -1  # gone, or in rundown after its last user left
            if fd >= 0:
                try:
                    s = loop.get_status(fd)
                    if (s.label == label[:63] and s.backing_inode == st.st_ino
                            and s.backing_dev == st.st_dev and s.read_only
                            and s.direct_io == direct_io):
                        return fd, devno
                except KernelError:
                    pass
                os.close(fd)
        lp = loop.attach(path, read_only=True, autoclear=True, label=label, direct_io=direct_io)
        try:
            devno = lp.devno
            self._put(tid, lp.number, devno)
        except BaseException:
            lp.close()  # (autoclear: the loop goes with it)
            raise
        return lp.fd, devno


# -- lazy templates: the template through a read-only loop or nbd device (docs/remote.md) --

def template_label(tag: str, template_id: str) -> str:
    """The label of this store's loop of a template (``lo_file_name``), and the backend
    identifier of its nbd device of a lazy one (sysfs ``/sys/block/nbdN/backend``): how the
    store finds its own devices, never another's."""
    return f"{tag}:t:{template_id}"


def hold_lazy_origin(ctx: VolumeCtx, loops: TemplateLoops, *, direct_io: bool) -> tuple[int, str]:
    """An open read-only fd on the device a volume over ``ctx.template`` (a lazy template)
    reads the template through, and its major:minor. Call with the template's lock held;
    keep the fd until a dm table holds the device.

    A whole cache (``TemplateRef.whole``: every data chunk held, each checked) gives a
    read-only loop over its data file, the template's loop (``loops``; autoclear): no
    server, no NBD. The cache's eviction refuses while a loop is bound to the file, and the
    look at the cache and the loop's setup are under the lock evictions take, so the loop
    never reads a hole an eviction punched. Otherwise: this store's nbd device of the
    template, connected to its server (started when it is not running; a dead connection
    replaced); the kernel disconnects it at the last close of its last opener
    (DISCONNECT_ON_CLOSE), so no device outlives the volumes that use it. A volume keeps the
    device it was attached with until its next attach."""
    t = ctx.template
    if t.whole is not None:
        with t.whole() as data:
            if data is not None:
                size = os.stat(data).st_size
                if size != t.size:
                    raise KernelError("use lazy template", t.id, errno.EIO,
                                      detail=f"its cache file {data} is {size} bytes, the template has {t.size}")
                return loops.hold(t.id, data, template_label(ctx.tag, t.id), direct_io=direct_io)
    if t.serve is None:
        raise KernelError("use lazy template", t.id, errno.EINVAL, detail="no server for it")
    sock = t.serve()
    name = template_label(ctx.tag, t.id)
    for _ in range(3):  # a device whose last opener (udev's probe) closed just now is disconnected
        found = nbd.find(name, first=nbd.noted(sock))
        dev = found[0] if found else nbd.connect(sock, name, dead_conn_timeout=DEAD_CONN_TIMEOUT)
        try:
            fd = os.open(dev.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in (errno.ENXIO, errno.ENOENT):
                continue
            raise KernelError.from_oserror("open nbd device", dev.path, e) from None
        cur = nbd.device(dev.index)  # opened by us now: no close of another can disconnect it
        if cur.connected and cur.backend == name:
            if cur.size != t.size:
                os.close(fd)
                raise KernelError("use lazy template", t.id, errno.EIO,
                                  detail=f"{dev.path} serves {cur.size} bytes, the template has {t.size}")
            if not found or nbd.server_changed(sock, dev.index):
                if found:  # the server was started again since: a new connection for the dead one
                    nbd.reconnect(dev.index, sock, name)
                nbd.note_server(sock, dev.index)
            return fd, cur.devno
        os.close(fd)
    raise KernelError("connect nbd device", name, errno.EBUSY, detail="disconnected again three times as it was "
                      "opened (something else opens and closes nbd devices)")


def lazy_origins(tag: str) -> Iterator[KernelObject]:
    """This store's nbd devices that nothing holds (a kill between connecting one and a
    dm table opening it): recovery disconnects them under the template's lock."""
    prefix = f"{tag}:t:"
    for d in nbd.devices() if nbd.available()[0] else []:
        if d.connected and d.backend.startswith(prefix) and not d.holders:
            yield KernelObject("nbd", str(d.index), None, detail=d.backend, template_id=d.backend[len(prefix):])


def release_lazy_origin(obj: KernelObject) -> bool:
    """Disconnect a leftover nbd device of this store (``lazy_origins``), unless something
    holds it now; True when ``obj`` is one."""
    if obj.kind != "nbd":
        return False
    try:
        d = nbd.device(int(obj.name))
    except KernelError:
        return True
    if d.connected and d.backend == obj.detail and not d.holders:
        try:
            fd = os.open(d.path, os.O_RDONLY | os.O_CLOEXEC | os.O_EXCL)  # EBUSY while any opener has it
        except OSError as e:
            if e.errno == errno.EBUSY:
                return True
            raise KernelError.from_oserror("release nbd device", d.path, e) from None
        try:
            nbd.disconnect(d.index)
        finally:
            os.close(fd)
        log.info("nbd%d (%s) disconnected: nothing held it", d.index, d.backend)
    return True


def check_lazy_size(ctx: VolumeCtx, block_bytes: int, backend: str) -> None:
    """Refuse a lazy template whose size is not a multiple of ``block_bytes`` (dm-thin's
    pool block: the external origin's rule here)."""
    if ctx.template.size % block_bytes:
        from ..errors import Unsupported

        raise Unsupported(f"create volume {ctx.id}: lazy template {ctx.template.id} is {ctx.template.size} bytes, "
                          f"not a multiple of the {backend} pool's block size ({block_bytes} bytes): it cannot be "
                          "the thin volume's external origin", op="create volume", obj=ctx.id,
                          hint="push the template with a size that is a multiple of the pool's block size, or pull "
                               "it whole (`cowdisk template pull` without --lazy)")
