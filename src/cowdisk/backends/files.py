"""File-backed volumes: a volume is one file, the VMM opens it directly.

* ``reflink``: the file is a FICLONE of the template on the same btrfs or xfs
  filesystem: O(1) in time and space, blocks shared until written.
* ``copy``: a sparse-aware copy (holes kept), the honest slow baseline for
  filesystems without reflink.
* ``pool``: ``reflink`` inside the store's embedded xfs pool (see pool.py).

Checkpoint keeps the file and attach hands the same file back: there is nothing in
the kernel to hold, so a file-backed volume cannot leak a kernel object.
"""

from __future__ import annotations

import os
from typing import Iterator

from ..kernel import fs
from . import KernelObject, Usage, VolumeCtx

DISK = "disk.img"


def disk_path(ctx: VolumeCtx) -> str:
    return os.path.join(ctx.data_dir, DISK)


class FileBackend:
    block_device = False

    def __init__(self, name: str, *, reflink: bool) -> None:
        self.name = name
        self.reflink = reflink

    def _clone(self, src: str, dst: str, ctx: VolumeCtx) -> None:
        if self.reflink:
            fs.ficlone(src, dst)
        else:
            fs.sparse_copy(src, dst, progress=ctx.progress)

    def create(self, ctx: VolumeCtx) -> str:
        os.makedirs(ctx.data_dir, exist_ok=True)
        ctx.record("file", disk_path(ctx))
        self._clone(ctx.template.path, disk_path(ctx), ctx)
        os.chmod(disk_path(ctx), 0o600)
        ctx.step("data")
        return disk_path(ctx)

    def attach(self, ctx: VolumeCtx) -> str:
        p = disk_path(ctx)
        if not os.path.exists(p):
            raise FileNotFoundError(p)
        return p

    def detach(self, ctx: VolumeCtx, *, deadline_s: float = 5.0) -> None:
        return None  # nothing to release in the kernel

    def destroy(self, ctx: VolumeCtx) -> None:
        p = disk_path(ctx)
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
        ctx.forget("file", p)

    def copy_data(self, src: VolumeCtx, dst: VolumeCtx, *, src_attached: bool) -> None:
        os.makedirs(dst.data_dir, exist_ok=True)
        dst.record("file", disk_path(dst))
        self._clone(disk_path(src), disk_path(dst), dst)
        os.chmod(disk_path(dst), 0o600)

    def flatten(self, ctx: VolumeCtx, out_path: str, *, attached: bool) -> None:
        self._clone(disk_path(ctx), out_path, ctx)

    def usage(self, ctx: VolumeCtx, *, attached: bool) -> Usage:
        p = disk_path(ctx)
        st = os.stat(p)
        ex = sh = None
        if self.reflink:
            su = fs.shared_usage(p)
            ex, sh = su.exclusive, su.shared
        return Usage(disk_bytes=st.st_blocks * 512, apparent_bytes=st.st_size, exclusive_bytes=ex,
                     shared_bytes=sh)

    def is_attached(self, ctx: VolumeCtx) -> bool:
        return os.path.exists(disk_path(ctx))

    def device_path(self, ctx: VolumeCtx) -> str | None:
        p = disk_path(ctx)
        return p if os.path.exists(p) else None

    def scan(self, tag: str) -> Iterator[KernelObject]:
        return iter(())

    def release(self, obj: KernelObject, *, deadline_s: float = 5.0) -> None:
        return None
