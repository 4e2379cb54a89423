"""What every device-mapper backend does the same way (dm-snapshot, dm-thin).

On both, an attached volume *is* the dm device ``ctx.dm_name``: whether it is attached,
its device node, its open count, thawing it after a killed copy, staging it in a jail
and releasing a leftover dm device found by recovery's scan do not depend on what the
device's table maps to. :class:`DmVolumeBase` holds those methods once; each backend
adds the table (``create``, ``attach``, ``copy_data`` ...).
"""

from __future__ import annotations

import os
from typing import ClassVar

from ..errors import KernelError
from ..kernel import blk, dm
from ..progress import Progress
from . import KernelObject, OpenCount, Thaw, VolumeCtx


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


class DmVolumeBase(OpenCount, Thaw):
    """The methods of the backend protocol that only look at the volume's dm device."""

    block_device: ClassVar[bool] = True

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
