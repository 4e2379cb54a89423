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

import contextlib
import os
from typing import ClassVar, Iterator, Mapping, Self

from ..errors import KernelError, Unsupported
from ..kernel import fs
from . import BackendEnv, CopiesData, KernelObject, RecordsAhead, Usage, VolumeCtx, check_options

DISK = "disk.img"


def disk_path(ctx: VolumeCtx) -> str:
    return os.path.join(ctx.data_dir, DISK)


class FileBackend(RecordsAhead):
    """A volume is one file; ``reflink`` says whether it is cloned or copied."""

    name: ClassVar[str] = "copy"
    block_device: ClassVar[bool] = False
    larger_volumes: ClassVar[bool] = True
    """A larger volume is its copy of the template extended (sparse) to its size."""
    reflink: ClassVar[bool] = False
    steps: ClassVar[Mapping[str, tuple[str, ...]]] = {"create": ("data",)}

    def __init__(self, data_root: str) -> None:
        self.data_root = data_root

    @classmethod
    def open(cls, env: BackendEnv) -> Self:
        check_options(cls.name, env)
        return cls(env.root)

    def destroy_store(self) -> None:
        return None

    def _clone(self, src: str, dst: str, ctx: VolumeCtx) -> None:
        if self.reflink:
            fs.ficlone(src, dst)
        else:
            fs.sparse_copy(src, dst, progress=ctx.progress)

    def records_ahead(self, ctx: VolumeCtx) -> tuple[tuple[str, str], ...]:
        return (("file", disk_path(ctx)),)

    def create(self, ctx: VolumeCtx) -> str:
        fs.makedirs_mode(ctx.data_dir, 0o700)
        ctx.record("file", disk_path(ctx))
        self._clone(ctx.template.path, disk_path(ctx), ctx)
        os.chmod(disk_path(ctx), 0o600)
        if ctx.volume_size > ctx.template.size:
            os.truncate(disk_path(ctx), ctx.volume_size)
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

    def copy_data(self, src: VolumeCtx, dst: VolumeCtx, *, src_attached: bool,
                  like: VolumeCtx | None = None) -> None:
        """A clone (reflink: FICLONE, which writes the source's dirty pages back and holds
        its inode's I/O lock for the instant of the clone) or a sparse copy of the source's
        file; with ``like``, of ``like``'s file (the same instant, the source not touched)."""
        fs.makedirs_mode(dst.data_dir, 0o700)
        dst.record("file", disk_path(dst))
        self._clone(disk_path(like or src), disk_path(dst), dst)
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

    def stage(self, ctx: VolumeCtx, device: str, dest: str, *, uid: int | None, gid: int | None) -> str:
        """A hard link to the volume file (a jail cannot follow a symlink out of itself)."""
        jail_dir = os.path.dirname(dest)
        if os.stat(jail_dir).st_dev != os.stat(device).st_dev:
            raise Unsupported(f"jail volume {ctx.id}: {jail_dir} is on another filesystem than the volume file",
                              op="jail", obj=ctx.id,
                              hint="put the jail on the store's filesystem, so that a hard link can be used")
        tmp = dest + f".cowdisk-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        try:
            os.link(device, tmp)
            os.replace(tmp, dest)
            # rename(2) of two links to one inode (a re-jail) does nothing: drop the temporary
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise KernelError.from_oserror("jail: hard link", dest, e) from None
        # exactly the owner asked for (root's where not given: a re-jail without --uid takes the
        # file back from an earlier jail's uid) and 0600
        os.chown(dest, os.geteuid() if uid is None else uid, os.getegid() if gid is None else gid)
        os.chmod(dest, 0o600)
        return dest

    def scan(self) -> Iterator[KernelObject]:
        return iter(())

    def release(self, obj: KernelObject, *, deadline_s: float = 5.0) -> None:
        return None


class CopyBackend(FileBackend, CopiesData):
    """``copy``: a sparse copy of the template per volume; works on every filesystem."""

    name = "copy"
    copies_data: ClassVar[bool] = True
    """A new volume allocates its template's bytes at once (the store's admission control
    counts them before a create, fork or restore-as)."""

    @classmethod
    def available(cls, root: str) -> tuple[bool, str]:
        return True, "copy: always works, one full sparse copy per volume"


class ReflinkBackend(FileBackend):
    """``reflink``: a FICLONE of the template on the store's own btrfs or xfs."""

    name = "reflink"
    reflink = True

    @classmethod
    def available(cls, root: str) -> tuple[bool, str]:
        st = fs.reflink_support(root, probe=False).fs
        if st.reflink_capable:
            return True, f"{st.path} is on {st.name}, which can reflink"
        return False, f"reflink: {st.path} is on {st.name}, which cannot reflink"

    @classmethod
    def open(cls, env: BackendEnv) -> Self:
        check_options(cls.name, env)
        r = fs.reflink_support(env.root)  # the store root exists: a FICLONE probe decides
        if not r.ok:
            raise Unsupported(
                f"reflink backend: {r.fs.path} is on {r.fs.name}, which cannot reflink"
                + (f" (FICLONE probe: {r.probe_step} failed)" if r.probe_step else ""), op="open store",
                obj=env.root, hint="put the store on btrfs or xfs (reflink=1), or use --backend pool or copy")
        return cls(env.root)
