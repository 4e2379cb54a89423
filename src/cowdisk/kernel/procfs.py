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
