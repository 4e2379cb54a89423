"""Who has a file or a device open, and who holds a lock on it, from /proc/*/fd.

Matching is by what the fd *is*, not by its path: a block device by its device
number (``st_rdev``), any other file by ``(st_dev, st_ino)``, so hard links, symlinks
and bind mounts all count. Best effort: processes in other PID namespaces, or that
exit while we look, are not seen.
"""

from __future__ import annotations

import os
import stat
from typing import Iterator


def _identity(st: os.stat_result) -> tuple[str, int, int]:
    if stat.S_ISBLK(st.st_mode):
        return ("blk", st.st_rdev, 0)
    return ("file", st.st_dev, st.st_ino)


def open_fds(path: str) -> Iterator[tuple[int, str]]:
    """``(pid, "/proc/PID/fd/N")`` for every open fd that refers to ``path``."""
    try:
        want = _identity(os.stat(path))
    except OSError:
        return
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return
    for pid in pids:
        fddir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fddir)
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"{fddir}/{fd}")
            except OSError:
                continue
            if _identity(st) == want:
                yield pid, f"{fddir}/{fd}"


def holders(path: str) -> list[int]:
    """PIDs that have ``path`` (a file or a block device) open."""
    return sorted({pid for pid, _ in open_fds(path)})


def filesystem_users(dev: int) -> list[int]:
    """PIDs with an open file, a working directory or a root on the filesystem whose
    device number is ``dev`` (what keeps a lazily unmounted filesystem alive)."""
    out: set[int] = set()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    for pid in pids:
        base = f"/proc/{pid}"
        try:
            names = [f"fd/{fd}" for fd in os.listdir(f"{base}/fd")] + ["cwd", "root"]
        except OSError:
            continue
        for name in names:
            try:
                if os.stat(f"{base}/{name}").st_dev == dev:
                    out.add(pid)
                    break
            except OSError:
                continue
    return sorted(out)


def lock_holders(path: str) -> list[tuple[int, str]]:
    """``(pid, "READ"|"WRITE")`` of processes whose open files hold a lock on ``path``.

    Reads each matching fd's ``/proc/PID/fdinfo`` ``lock:`` lines (blocked waiters,
    marked ``->``, are skipped). This names the real holder even when the process that
    took a flock handed the fd to a child and exited, where /proc/locks shows a stale
    PID, and on btrfs, whose /proc/locks device numbers do not match st_dev.
    """
    found: dict[int, str] = {}
    for pid, fdpath in open_fds(path):
        try:
            with open(fdpath.replace("/fd/", "/fdinfo/")) as f:
                for line in f:
                    if line.startswith("lock:") and "->" not in line:
                        found[pid] = "WRITE" if " WRITE " in line else "READ"
        except OSError:
            continue
    return sorted(found.items())


# -- process identity ----------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].decode(errors="replace").split()


def read_pid_file(path: str) -> int | None:
    """The PID a server wrote into its PID file, None when the file is missing or holds no PID."""
    try:
        with open(path) as f:
            s = f.read().strip()
    except FileNotFoundError:
        return None
    return int(s) if s.isdigit() else None


def process_name(pid: int) -> str:
    """The command name (``comm``) of a running process; '' when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
    except FileNotFoundError:
        return ""
    comm, _, rest = st.partition("(")[2].rpartition(")")
    return "" if rest.split()[0] == "Z" else comm


_OWN_START: tuple[int, str] = (0, "")
"""This process's (PID, start time): read once (every intent records it); a forked child,
whose PID differs, reads its own."""


def process_start(pid: int) -> str:
    """The start time of a process (field 22 of /proc/PID/stat, clock ticks since boot),
    '' if it is gone. With :func:`boot_id` it names one process for good: a PID is reused,
    a (PID, start, boot) triple never is."""
    global _OWN_START
    own = pid == os.getpid()
    if own and _OWN_START[0] == pid:
        return _OWN_START[1]
    f = _stat_fields(pid)
    start = f[19] if f else ""
    if own and start:
        _OWN_START = (pid, start)
    return start


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def process_alive(pid: int, start: str | int | None = None, boot: str | None = None) -> bool:
    """Is the process recorded as (``pid``, ``start``, ``boot``) still running?

    A zombie counts as dead, and so does a PID reused by a newer process (another start
    time, or another boot). ``start`` None checks the PID only: use it only for records
    that never had a start time."""
    if pid <= 0:
        return False
    if boot and boot != boot_id():
        return False
    f = _stat_fields(pid)
    if f is None:
        return False
    if f[0] in ("Z", "X", "x"):
        return False
    return start is None or str(start) == f[19]


def cmdline(pid: int, limit: int = 120) -> str:
    """The command line of ``pid`` (spaces for NULs, at most ``limit`` characters), '' if gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:limit]
    except OSError:
        return ""
