"""Cross-process file locks (flock) with a deadline whose error names the holders.

One class serves every lock of the project: the store's per-object locks and the
template cache's per-key locks. flock locks belong to the open file description: two
``open()`` calls exclude each other even inside one process, so threads that each take
a :class:`FileLock` exclude each other too (docs/reference/loop-and-files.md section 4).

An exclusive holder writes its PID into the lock file. That is a hint for humans only
(it goes stale when the fd is handed to a child); the holders named in errors come from
``/proc/*/fdinfo`` (:func:`cowdisk.kernel.procfs.lock_holders`). Lock files are never
deleted: deleting one lets two processes lock two different inodes.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from types import TracebackType
from typing import Callable

from .errors import KernelError, LockTimeout
from .kernel import procfs

log = logging.getLogger(__name__)

WAIT_NOTICE = 1.0  # seconds of waiting before ``on_wait`` is told who holds the lock


def describe_holders(path: str) -> str:
    """``PID 123 (cmdline) WRITE, ...`` for the processes holding a lock on ``path``."""
    holders = procfs.lock_holders(path)
    if holders:
        me = os.getpid()
        return ", ".join(f"PID {p}" + (" (this process)" if p == me else f" ({procfs.cmdline(p) or '?'})")
                         + f" {m}" for p, m in holders)
    hint = ""
    try:
        with open(path) as f:
            txt = f.read(32).strip()
        if txt.isdigit():
            hint = f"; the lock file names PID {txt}, a hint that may be stale"
    except OSError:
        pass
    return "a process not visible in /proc (another PID namespace, or no permission)" + hint


class FileLock:
    """An exclusive (or shared) flock on ``path`` taken within ``timeout`` seconds.

    ``with FileLock(...)`` or :meth:`acquire` waits up to ``timeout`` seconds (0: one
    try) and raises :class:`LockTimeout` naming the holders with their PIDs and command
    lines; :meth:`try_acquire` takes it only if it is free. ``on_wait``, if given, is
    called once with a text naming the holders when the wait passes
    :data:`WAIT_NOTICE` seconds. ``mode`` is the lock file's mode when it is created.
    ``pid_hint`` writes the exclusive holder's PID into the lock file (two syscalls per
    acquisition, worth it for long holds such as a cache build; the /proc holder search
    is the proof either way).
    """

    def __init__(self, path: str, *, timeout: float = 30.0, shared: bool = False, what: str = "",
                 on_wait: Callable[[str], None] | None = None, mode: int = 0o600, pid_hint: bool = False) -> None:
        self.path = path
        self.timeout = timeout
        self.shared = shared
        self.what = what or path
        self.on_wait = on_wait
        self.mode = mode
        self.pid_hint = pid_hint
        self.fd = -1

    def try_acquire(self) -> bool:
        """Take the lock if it is free now; False if another open file holds it.

        The lock file may be removed by its holder when the object it guards goes
        (:meth:`unlink`): a lock taken on a file that is no longer at ``path`` is let go
        and taken again on the file that is, so two processes never hold "the" lock on
        two different inodes."""
        for _ in range(100):
            if self.fd < 0:
                try:
                    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, self.mode)
                except OSError as e:
                    raise KernelError.from_oserror("open lock", self.path, e) from None
            op = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
            try:
                fcntl.flock(self.fd, op)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return False
                self.release()
                raise KernelError.from_oserror("lock", self.path, e) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(self.fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            self.release()  # unlinked (and maybe made again) while we waited: take the one at path
        else:
            raise KernelError("lock", self.path, errno.EAGAIN, detail="the lock file keeps being replaced")
        if self.pid_hint and not self.shared:
            try:  # a hint for humans: the holder search in /proc is the proof
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
            except OSError:
                pass
        return True

    def acquire(self) -> "FileLock":
        timeout = max(0.0, self.timeout)
        start = time.monotonic()
        end = start + timeout
        delay = 0.001
        told = False
        try:
            while not self.try_acquire():
                now = time.monotonic()
                if now >= end:
                    where = f"lock {self.path}" if self.what == self.path else f"{self.what}: lock {self.path}"
                    raise LockTimeout(
                        f"{where} still held after {timeout:g} s by {describe_holders(self.path)}",
                        op="lock", obj=self.what,
                        hint="wait for that process to finish, or end it if it hangs")
                if self.on_wait is not None and not told and now - start >= WAIT_NOTICE:
                    told = True
                    self.on_wait(f"waiting for {self.what}: held by {describe_holders(self.path)}")
                time.sleep(min(delay, max(0.0, end - now)))
                delay = min(delay * 2, 0.05)
        except BaseException:
            self.release()
            raise
        waited = time.monotonic() - start
        if waited >= WAIT_NOTICE:
            log.debug("lock %s: acquired after %.1f s", self.what, waited)
        return self

    def unlink(self) -> None:
        """Remove the lock file while holding it (its object is gone): a waiter then finds the
        file gone or replaced and takes the new one (see :meth:`try_acquire`)."""
        if self.fd >= 0 and not self.shared:
            try:
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the description drops the flock
            self.fd = -1

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
