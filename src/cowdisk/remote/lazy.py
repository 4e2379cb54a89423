"""Serving a lazy template: one nbdkit per template cache on this host (its Python plugin,
:mod:`cowdisk.remote.nbd_plugin`, over :class:`~cowdisk.remote.cache.ChunkCache`), read-only
on a unix socket (under /run/cowdisk-lazy), many clients at once (multi-conn).

QEMU opens it natively (``nbd+unix:///?socket=...``, e.g. as the backing file of a
qcow2 overlay); Firecracker and Cloud Hypervisor, which take files, get it through a
``qemu-storage-daemon`` FUSE export (:func:`export_file`), as the rbd backend does.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from ..errors import KernelError
from ..kernel import mount as kmount
from ..kernel.procfs import process_name, read_pid_file
from .keeper import ON_RESTART

PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nbd_plugin.py")
KEEPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "keeper.py")
SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PIDFILE, LOG, STATS, KEEPER_PIDFILE = "nbdkit.pid", "nbdkit.log", "stats.json", "keeper.pid"
KEEPER_NAME = "cowdisk-keeper"
QSD = "qemu-storage-daemon"
PLUGIN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
              "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
"""nbdkit's environment: its embedded Python finds its own prefix from ``python3`` on
PATH, so a PATH with another Python first (pyenv, a venv) would give it a foreign standard
library; no AWS files of the caller's either (the keys come from the remote config)."""


@dataclass(frozen=True)
class Served:
    cache: str
    socket: str
    pid: int

    @property
    def url(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"


SOCKET_DIR = "/run/cowdisk-lazy"
"""Where the servers' sockets are: a unix socket's path has at most 107 bytes, which a
store root's own path may use up."""


def socket_path(cache: str) -> str:
    """The server's socket: named by a hash of the cache's path (one per cache)."""
    import hashlib

    return os.path.join(SOCKET_DIR, hashlib.sha256(os.path.abspath(cache).encode()).hexdigest()[:24] + ".sock")


def server(cache: str) -> Served | None:
    """The nbdkit serving ``cache``, when one runs."""
    pid = read_pid_file(os.path.join(cache, PIDFILE))
    if pid is None or process_name(pid) != "nbdkit":
        return None
    return Served(cache, socket_path(cache), pid)


def keeper(cache: str) -> int | None:
    """The PID of the keeper (:mod:`.keeper`) that starts ``cache``'s nbdkit again when it
    dies, when one runs."""
    pid = read_pid_file(os.path.join(cache, KEEPER_PIDFILE))
    return pid if pid is not None and process_name(pid) == KEEPER_NAME else None


def _wait_server(cache: str, deadline_s: float) -> Served | None:
    deadline = time.monotonic() + deadline_s
    while (running := server(cache)) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return running


def serve(cache: str, config: str, location: str, *, bound: float) -> Served:
    """Start nbdkit for ``cache`` under its keeper (which starts it again whenever it dies),
    or find the one serving it; returns once it accepts connections (nbdkit writes its PID
    file then). The kernel's nbd devices connected to a server that died with its keeper
    are the caller's to reconnect (``cowdisk.kernel.nbd.reconnect_noted``)."""
    running = server(cache)
    if running is not None and keeper(cache) is None:
        # its keeper was killed: nbdkit ends with it (nbdkit sets PR_SET_PDEATHSIG to SIGTERM
        # itself), and no one would start it again: a new one under a new keeper
        _end(running.pid, "nbdkit", 10)
        running = None
    if running is not None:
        return running
    if keeper(cache) is not None:  # its server died a moment ago: the keeper is starting it again
        running = _wait_server(cache, 10)
        if running is not None:
            return running
        stop(cache)
    os.makedirs(SOCKET_DIR, mode=0o700, exist_ok=True)
    sock = socket_path(cache)
    for leftover in (sock, os.path.join(cache, PIDFILE)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leftover)
    nbdkit = shutil.which("nbdkit", path=PLUGIN_ENV["PATH"])
    if nbdkit is None:
        raise KernelError("serve lazy template", cache, errno.ENOENT,
                          detail="nbdkit not found (./install.sh installs nbdkit and nbdkit-plugin-python)")
    log = os.path.join(cache, LOG)
    argv = [nbdkit, "--foreground", "--log=stderr", "--unix", sock, "--pidfile", os.path.join(cache, PIDFILE),
            "--readonly", "--threads", "16", "python", PLUGIN, f"cache={cache}", f"config={config}",
            f"location={location}", f"src={SRC}", f"bound={bound:g}", f"stats={os.path.join(cache, STATS)}"]
    # the keeper runs by its path, without site (the standard library alone), and forks away
    reconnect = [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {SRC!r}); import runpy; "
                 "runpy.run_module('cowdisk.kernel.nbd', run_name='__main__')", "reconnect", sock]
    r = subprocess.run([sys.executable, "-I", "-S", KEEPER, cache, log, sock, "--", *argv], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=60,
                       env={**PLUGIN_ENV, ON_RESTART: json.dumps(reconnect)})
    if r.returncode != 0:
        raise KernelError("serve lazy template", cache, errno.EIO, detail=f"its keeper exited {r.returncode}: "
                          f"{r.stderr.strip()[-500:]}")
    deadline = time.monotonic() + 30
    while (running := server(cache)) is None and time.monotonic() < deadline:
        if keeper(cache) is None and time.monotonic() > deadline - 29:  # it gave up: nbdkit never became ready
            break
        time.sleep(0.01)
    if running is None:
        stop(cache)
        with open(log, "rb") as f:
            tail = f.read()[-1500:].decode(errors="replace").strip()
        raise KernelError("serve lazy template", cache, errno.ESRCH,
                          detail=f"nbdkit did not become ready (see {log}): {tail}")
    return running


def stop(cache: str, deadline_s: float = 10.0) -> bool:
    """End the nbdkit serving ``cache`` and its keeper (the keeper first, so that it does
    not start it again; SIGTERM, then SIGKILL); True when either ran."""
    k = keeper(cache)
    if k is not None:
        _end(k, KEEPER_NAME, deadline_s)  # it passes the SIGTERM on to nbdkit
    s = server(cache)
    if s is not None:
        _end(s.pid, "nbdkit", deadline_s)
    import glob

    notes = glob.glob(glob.escape(socket_path(cache)) + ".nbd*")  # which server an nbd device used (dm_common)
    for leftover in (socket_path(cache), os.path.join(cache, PIDFILE), os.path.join(cache, KEEPER_PIDFILE), *notes):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leftover)
    return k is not None or s is not None


def _end(pid: int, comm: str, deadline_s: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + deadline_s
    while process_name(pid) == comm and time.monotonic() < end:
        time.sleep(0.01)
    if process_name(pid) == comm:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while process_name(pid) == comm:
            time.sleep(0.01)


def stats(cache: str) -> dict[str, Any]:
    """The serving process's counters (:mod:`.nbd_plugin`), {} before its first read."""
    try:
        with open(os.path.join(cache, STATS)) as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except (FileNotFoundError, ValueError):
        return {}


def export_file(served: Served, mountpoint: str, pidfile: str) -> int:
    """Export the served template as the regular file ``mountpoint`` (FUSE, read-only, by a
    qemu-storage-daemon that is an NBD client of the server): for VMMs that take files.
    Returns the daemon's PID."""
    if kmount.mounted_at(mountpoint) is not None:
        unexport_file(mountpoint, pidfile)
    with open(mountpoint, "a"):
        pass
    node = f"driver=nbd,node-name=t,server.type=unix,server.path={served.socket},read-only=on,reconnect-delay=5"
    argv = [QSD, "--blockdev", node, "--export", f"type=fuse,id=e,node-name=t,mountpoint={mountpoint},writable=off",
            "--pidfile", pidfile, "--daemonize"]
    r = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    if r.returncode != 0:
        raise KernelError("export lazy template", mountpoint, errno.EIO, detail=f"{QSD}: {r.stderr.strip()}")
    pid = read_pid_file(pidfile)
    if pid is None:
        raise KernelError("export lazy template", mountpoint, errno.ESRCH, detail=f"{QSD} wrote no PID")
    return pid


def unexport_file(mountpoint: str, pidfile: str, deadline_s: float = 10.0) -> None:
    pid = read_pid_file(pidfile)
    if pid is not None and process_name(pid).startswith("qemu-storage-d"):
        _end(pid, process_name(pid), deadline_s)
    if kmount.mounted_at(mountpoint) is not None:
        with contextlib.suppress(KernelError):
            kmount.umount(mountpoint, kmount.MNT_DETACH)
    for p in (pidfile, mountpoint):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
