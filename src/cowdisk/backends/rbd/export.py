"""The FUSE export of an attached volume (map=fuse): one ``qemu-storage-daemon`` per
volume, started detached (it outlives cowdisk like a kernel object), exporting the image as
the regular file ``volumes/<id>/disk.img``; stopped by its pidfile, a stale mount dropped."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time

from ...errors import InUse, KernelError
from ...kernel import fs
from ...kernel import mount as kmount
from ...kernel.procfs import process_name, read_pid_file
from .. import VolumeCtx

DISK = "disk.img"
PIDFILE = "qsd.pid"
QSD = "qemu-storage-daemon"


class FuseExport:
    """The FUSE export part of :class:`~cowdisk.backends.rbd.RbdBackend` (mixed into it)."""

    pool: str
    namespace: str
    conf: str
    client: str

    # -- the fuse mapping -----------------------------------------------------------------

    def _map(self, ctx: VolumeCtx, img: str) -> str:
        fs.makedirs_mode(ctx.data_dir, 0o700)
        mnt = os.path.join(ctx.data_dir, DISK)
        pidfile = os.path.join(ctx.data_dir, PIDFILE)
        ctx.record("fuse", mnt)
        if _mounted(mnt):  # a half-made attempt of a killed process
            self._unmap(mnt, pidfile, 5.0, ctx.id)
        with open(mnt, "a"):
            pass
        os.chmod(mnt, 0o600)
        ns = f",namespace={self.namespace}" if self.namespace else ""
        node = f"driver=rbd,node-name=v,pool={self.pool}{ns},image={img},conf={self.conf},user={self.client}," \
               "cache.direct=on"
        argv = [QSD, "--blockdev", node,
                "--export", f"type=fuse,id=e,node-name=v,mountpoint={mnt},writable=on,growable=off",
                "--pidfile", pidfile, "--daemonize"]
        r = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
        if r.returncode != 0:
            raise KernelError("map volume", ctx.id, errno.EIO, detail=f"{QSD}: {r.stderr.strip()}")
        return mnt

    def _unmap(self, mnt: str, pidfile: str, deadline_s: float, vid: str) -> None:
        pid = read_pid_file(pidfile)
        if pid is not None and _is_qsd(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            end = time.monotonic() + max(deadline_s, 5.0)
            while _is_qsd(pid) and time.monotonic() < end:
                time.sleep(0.002)
            if _is_qsd(pid):
                raise InUse(f"unmap volume {vid}: {QSD} PID {pid} does not exit", op="detach volume", obj=vid,
                            hint=f"something still has {mnt} open")
        if _mounted(mnt):  # the daemon died without unmounting (killed): a stale FUSE mount
            with contextlib.suppress(KernelError):
                kmount.umount(mnt, kmount.MNT_DETACH)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pidfile)


def _which(name: str) -> bool:
    import shutil

    return shutil.which(name) is not None


def _is_qsd(pid: int) -> bool:
    """``pid`` runs (not a zombie) and is a qemu-storage-daemon."""
    return process_name(pid).startswith("qemu-storage-d")


def _mounted(path: str) -> bool:
    return kmount.mounted_at(path) is not None
