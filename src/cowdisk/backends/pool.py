"""The embedded pool: a sparse xfs (reflink=1) image under the store, loop-mounted.

Used where the store's own filesystem cannot reflink and device-mapper is absent, so
that every host with loop and xfs still gets O(1) copy-on-write volumes. The loop is
configured with autoclear and held only by the mount: unmounting frees it. After a
reboot the store mounts the pool again on open. It grows when asked (sparse file
grown, loop capacity re-read, ``xfs_growfs``).
"""

from __future__ import annotations

import os
import shutil
import subprocess

from ..errors import CowdiskError, InUse, KernelError, Unsupported
from ..kernel import fs, loop
from ..kernel import mount as kmount
from ..kernel.mount import mounted_at
from ..kernel import procfs
from ..locks import FileLock
from . import BackendEnv, GrowsPool, check_options
from .files import FileBackend

DEFAULT_SIZE = 64 << 30  # sparse: costs nothing until written


class Pool:
    def __init__(self, root: str, label: str) -> None:
        self.dir = os.path.join(root, "pool")
        self.image = os.path.join(self.dir, "pool.img")
        self.mnt = os.path.join(self.dir, "mnt")
        self.label = label
        self.lock_path = os.path.join(root, "locks", "pool.lock")

    @property
    def exists(self) -> bool:
        return os.path.exists(self.image)

    @property
    def mounted(self) -> bool:
        return mounted_at(self.mnt) is not None

    def ensure(self, size: int = DEFAULT_SIZE) -> str:
        """Create the pool if needed and make sure it is mounted; return its mount point.
        Several processes opening the store at once (the first commands after a reboot, two
        creators of a new store) take turns under the pool's lock: one creates or mounts,
        the others find it done."""
        if self.exists and self.mounted:
            return self.mnt
        with FileLock(self.lock_path, timeout=120, what=f"pool {self.image}"):
            if not self.exists:
                self._create(size)
            if not self.mounted:
                self.mount()
        return self.mnt

    def _create(self, size: int) -> None:
        fs.makedirs_mode(self.dir, 0o700)
        tmp = self.image + ".new"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        fs.create_sparse(tmp, size)
        try:
            r = subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", "-L", "cowdisk-pool", tmp],
                               capture_output=True, text=True)
        except FileNotFoundError:
            os.unlink(tmp)
            raise Unsupported("create pool: mkfs.xfs not found", op="create pool", obj=self.image,
                              hint="install xfsprogs") from None
        if r.returncode != 0:
            os.unlink(tmp)
            raise CowdiskError(f"create pool {self.image}: mkfs.xfs failed: {r.stderr.strip()}",
                               op="create pool", obj=self.image)
        os.rename(tmp, self.image)

    def mount(self) -> None:
        fs.makedirs_mode(self.mnt, 0o700)
        stale = loop.find_by_backing(self.image)
        if stale:  # a lazily unmounted pool still held open: a second mount of it would corrupt it
            held = sorted({p for li in stale for p in procfs.filesystem_users(os.makedev(li.major, li.minor))})
            raise InUse(f"mount pool {self.image}: it is still attached as {', '.join(li.path for li in stale)} "
                        f"but not mounted at {self.mnt} (unmounted lazily while in use?)"
                        + (f"; held by PID {', '.join(map(str, held))}" if held else ""),
                        op="mount pool", obj=self.image,
                        hint="stop what still uses the old pool mount (a VM, a shell in it); the loop goes "
                             "with its last user")
        lp = loop.attach(self.image, autoclear=True, label=self.label)
        try:
            try:
                kmount.mount(lp.path, self.mnt, "xfs", kmount.MS_NODEV)
            except KernelError as e:
                raise KernelError("mount pool", f"{lp.path} on {self.mnt}", e.errno or 0) from None
            os.chmod(self.mnt, 0o700)  # the pool's own root directory: root's alone, like the store's
        finally:
            lp.close()  # the mount holds the loop now; unmount frees it

    def unmount(self) -> None:
        if not self.mounted:
            return
        try:
            kmount.umount(self.mnt)
        except KernelError as e:
            raise KernelError("unmount pool", self.mnt, e.errno or 0,
                              hint="a volume of the pool is still open (a running VM?)") from None

    def grow(self, size: int) -> None:
        """Grow the pool image to ``size`` bytes and the filesystem with it."""
        cur = os.stat(self.image).st_size
        if size <= cur:
            return
        os.truncate(self.image, size)
        src = mounted_at(self.mnt)
        if src and src.startswith("/dev/loop"):
            loop.set_capacity(loop.number_from_path(src))
            r = subprocess.run(["xfs_growfs", self.mnt], capture_output=True, text=True)
            if r.returncode != 0:
                raise CowdiskError(f"grow pool {self.image}: xfs_growfs failed: {r.stderr.strip()}",
                                   op="grow pool", obj=self.image)

    def destroy(self) -> None:
        """Unmount and delete the pool image (everything in it is lost)."""
        self.unmount()
        try:
            os.unlink(self.image)
        except FileNotFoundError:
            pass


class PoolBackend(FileBackend, GrowsPool):
    """``pool``: reflinked volume files inside the store's embedded xfs pool."""

    name = "pool"
    reflink = True

    def __init__(self, data_root: str, pool: Pool) -> None:
        super().__init__(data_root)
        self.pool = pool

    @classmethod
    def available(cls, root: str) -> tuple[bool, str]:
        if os.path.exists("/dev/loop-control") and shutil.which("mkfs.xfs"):
            return True, "pool: loop devices and mkfs.xfs are here: an embedded xfs pool under the store"
        return False, "pool: needs /dev/loop-control and mkfs.xfs"

    @classmethod
    def open(cls, env: BackendEnv) -> "PoolBackend":
        check_options(cls.name, env)
        pool = Pool(env.root, f"{env.tag}:pool")
        return cls(pool.ensure(), pool)

    def grow_pool(self, size: int) -> int:
        """Grow the pool to ``size`` bytes; returns its free bytes."""
        self.pool.grow(size)
        return fs.statfs(self.pool.mnt).free_bytes

    def destroy_store(self) -> None:
        self.pool.destroy()
