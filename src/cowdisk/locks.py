"""Cross-process file locks (flock) with a deadline whose error names the holder.

flock locks belong to the open file description: two ``open()`` calls exclude each
other even inside one process, so threads that each take a :class:`FileLock` exclude
each other too (reference/loop-and-files.md section 4).
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from types import TracebackType

from .errors import KernelError, LockTimeout
from .kernel import procfs


class FileLock:
    """An exclusive (or shared) flock on ``path`` taken within ``timeout`` seconds."""

    def __init__(self, path: str, *, timeout: float = 30.0, shared: bool = False, what: str = "") -> None:
        self.path = path
        self.timeout = timeout
        self.shared = shared
        self.what = what or path
        self.fd = -1

    def acquire(self) -> "FileLock":
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise KernelError.from_oserror("open lock", self.path, e) from None
        op = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        end = time.monotonic() + self.timeout
        delay = 0.001
        while True:
            try:
                fcntl.flock(self.fd, op)
                return self
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(self.fd)
                    self.fd = -1
                    raise KernelError.from_oserror("lock", self.path, e) from None
            if time.monotonic() >= end:
                holders = [pid for pid, _ in procfs.lock_holders(self.path)]
                os.close(self.fd)
                self.fd = -1
                who = ", ".join(str(p) for p in holders) or "unknown"
                raise LockTimeout(
                    f"lock {self.what}: still held after {self.timeout:g} s by PID {who}",
                    op="lock", obj=self.what,
                    hint="wait for that process, or end it if it hangs")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the description drops the flock
            self.fd = -1

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
