"""The registry's transaction engine: connections (one per thread, and per process after a
fork), the writer locks (a thread lock, then a blocking flock across processes, waited for
with a deadline), one ``BEGIN IMMEDIATE`` transaction per write, the group commit (the
WAL's fdatasync after the locks are let go), deferred writes of gone things' records,
SQLite errors classified by their codes, and the schema migrated on open."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import sqlite3
import threading
import weakref
from contextlib import contextmanager
from typing import Any, Iterator

from ..errors import CowdiskError, KernelError, LockTimeout, RegistryDamaged
from ..locks import describe_holders
from .schema import MIGRATIONS, SCHEMA_VERSION

log = logging.getLogger("cowdisk.registry")


class QuickCheckFailed(sqlite3.DatabaseError):
    """``PRAGMA quick_check`` found damage (the registry's own error: SQLite gives no code)."""


_KINDS = {sqlite3.SQLITE_BUSY: "busy", sqlite3.SQLITE_LOCKED: "busy", sqlite3.SQLITE_FULL: "full",
          sqlite3.SQLITE_READONLY: "readonly", sqlite3.SQLITE_IOERR: "ioerr", sqlite3.SQLITE_CORRUPT: "corrupt",
          sqlite3.SQLITE_NOTADB: "corrupt", sqlite3.SQLITE_CANTOPEN: "cantopen"}


def sqlite_kind(e: sqlite3.Error) -> str:
    """What an SQLite error is, from its result code (``sqlite_errorcode``; the primary code
    of an extended one), never from its message: ``busy`` (another writer holds the
    database), ``full``, ``readonly``, ``ioerr``, ``corrupt`` (damaged, or not a
    database), ``cantopen``, or ``other`` (a bad statement, a constraint...)."""
    if isinstance(e, QuickCheckFailed):
        return "corrupt"
    code = getattr(e, "sqlite_errorcode", None)
    return "other" if code is None else _KINDS.get(code & 0xFF, "other")


def _corrupt(e: sqlite3.Error) -> bool:
    """SQLite says the file is damaged or not a database (not busy, full or read-only)."""
    return sqlite_kind(e) == "corrupt"


_OPEN: "weakref.WeakSet[Engine]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child shares its parent's writer-lock file description: were the parent to die
    inside a transaction, the child's copy would keep the lock held. The child lets go of
    its copy (closing it does not unlock the parent: only the last close of a description
    drops a flock) and opens its own at its first write."""
    for r in list(_OPEN):
        r._drop_inherited_flock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _FlockWaiter:
    """A thread that takes a blocking flock for another thread, which waits for it with a
    deadline (started once per registry and process: a thread per wait costs twice as much)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._fd = -1
        self._asked = 0
        self._answered = 0
        self._error: OSError | None = None
        self._stop = False
        self.abandoned = False
        threading.Thread(target=self._run, name="cowdisk-registry-lock", daemon=True).start()

    def wait(self, fd: int, timeout: float, path: str) -> bool:
        """Take the flock on ``fd`` within ``timeout`` seconds; False (and this waiter
        abandoned, closing ``fd`` once it gets the lock) past it."""
        with self._cv:
            self._fd = fd
            self._asked += 1
            ask = self._asked
            self._cv.notify_all()
            if not self._cv.wait_for(lambda: self._answered == ask, timeout):
                self.abandoned = True
                return False
            err, self._error = self._error, None
        if err is not None:
            raise KernelError.from_oserror("lock", path, err) from None
        return True

    def stop(self) -> None:
        """End the thread (it is idle: its registry is closing, no thread of it writes)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._asked > self._answered or self._stop)
                if self._asked == self._answered:
                    return  # stopped
                fd, ask = self._fd, self._asked
            err = None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:
                err = e
            with self._cv:
                if self.abandoned:  # the asker gave up: let go, and end
                    os.close(fd)
                    return
                self._error = err
                self._answered = ask
                self._cv.notify_all()


class Engine:
    """The transaction engine of the SQLite registry at ``path`` (its tables:
    :class:`~cowdisk.registry.tables.Registry`).

    Writers are serialised by a lock that wakes the next one at once: a thread lock inside
    one process, then a blocking ``flock`` on ``<path>.lock`` across processes (the
    kernel wakes the next waiter at the holder's release), around each ``BEGIN IMMEDIATE``
    ... ``COMMIT``. SQLite's own busy handler sleeps 1, 2, 5, 10 ... 100 ms between tries,
    which turns several processes writing at once (the daemon's workers, the CLI beside
    them) into mostly sleeping. A writer that waits more than ``timeout`` seconds gets a
    :class:`LockTimeout` naming the holders."""

    def __init__(self, path: str, *, read_only: bool = False, timeout: float = 60.0) -> None:
        self.path = path
        self.read_only = read_only
        """On a read-only filesystem: opened immutable (no WAL or shm files can be made);
        every write raises KernelError(EROFS)."""
        self.timeout = timeout
        self.lock_path = f"{path}.lock"
        """The cross-process writer lock: never deleted (deleting a lock file lets two
        processes lock two different inodes)."""
        self._local = threading.local()
        self._all: list[tuple[int, sqlite3.Connection]] = []
        self._all_lock = threading.Lock()
        self._writer: tuple[int, threading.Lock] = (os.getpid(), threading.Lock())
        self._flock: tuple[int, int] = (os.getpid(), -1)  # (pid, fd) of the writer lock file
        self._waiter: tuple[int, _FlockWaiter | None] = (os.getpid(), None)
        _OPEN.add(self)
        try:
            if read_only:
                self._check_version()
            else:
                self._migrate()
        except (KernelError, LockTimeout):
            self.close()
            raise
        except sqlite3.DatabaseError as e:
            kind = sqlite_kind(e)
            if kind == "busy":
                raise
            self.close()
            if kind in ("full", "readonly", "ioerr", "cantopen"):  # the filesystem's fault, not the file's
                raise self._os_error("open registry", e) from e
            raise RegistryDamaged(f"open registry {path}: {e}", op="open registry", obj=path,
                                  hint="`cowdisk recover --rebuild-registry` rebuilds it from the volumes' and "
                                       "templates' manifests (the damaged file is kept aside)") from e

    # -- connections -------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None or getattr(self._local, "pid", None) != os.getpid():
            if self.read_only:
                c = sqlite3.connect(f"file:{self.path}?mode=ro&immutable=1", uri=True, timeout=60,
                                    isolation_level=None, check_same_thread=False)
                c.row_factory = sqlite3.Row
            else:
                try:
                    c = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                        check_same_thread=False)
                    c.row_factory = sqlite3.Row
                    c.execute("PRAGMA journal_mode=WAL")
                except sqlite3.OperationalError as e:
                    raise self._os_error("open registry", e) from e
            # every commit is written without an fsync; a durable one is made durable by
            # the WAL's fdatasync after the locks are let go (tx: the group commit)
            c.execute("PRAGMA synchronous=NORMAL")
            c.execute("PRAGMA foreign_keys=ON")
            c.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            self._local.conn = c
            self._local.pid = os.getpid()
            with self._all_lock:
                self._all.append((os.getpid(), c))
        return c

    def close(self) -> None:
        """Close every thread's connection (no file of the store stays open)."""
        me = os.getpid()
        with self._all_lock:
            conns = [c for pid, c in self._all if pid == me]  # never close a parent's, after fork
            self._all = []
        for c in conns:
            try:
                c.close()
            except sqlite3.ProgrammingError:
                pass  # made in another thread that is still using it; it closes with that thread
        self._local.conn = None
        pid, fd = self._flock
        if pid == me and fd >= 0 and self._writer_lock().acquire(blocking=False):
            try:  # not while one of this process's threads is inside a transaction
                self._flock = (me, -1)
                os.close(fd)
                wpid, waiter = self._waiter
                if waiter is not None and wpid == me and not waiter.abandoned:
                    waiter.stop()
                    self._waiter = (me, None)
            finally:
                self._writer_lock().release()

    def _os_error(self, op: str, e: sqlite3.Error) -> KernelError:
        """The errno behind an SQLite failure to write (a full or read-only filesystem), as a
        KernelError naming the registry: SQLite itself reports only "disk I/O error"."""
        try:
            st = os.statvfs(os.path.dirname(self.path) or ".")
            if st.f_flag & os.ST_RDONLY:
                err = errno.EROFS
            elif st.f_bavail * st.f_frsize < (1 << 20) or sqlite_kind(e) == "full":
                err = errno.ENOSPC
            else:
                err = errno.EIO
        except OSError:
            err = errno.EIO
        return KernelError(op, self.path, err, detail=f"SQLite: {e}")

    @contextmanager
    def tx(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error). A full or
        read-only filesystem raises KernelError(ENOSPC or EROFS) naming the registry.

        Every commit is written to the WAL without an fsync (synchronous=NORMAL). A durable
        one (the default) then waits for the WAL's ``fdatasync`` *after* the writer locks
        are let go, before it returns: the WAL is one file written in order, so that one
        fdatasync makes this commit and every earlier one durable, and writers of other
        processes and threads commit meanwhile (a group commit: their fdatasyncs overlap and
        the filesystem's log serves several at once). Under ``synchronous=FULL`` each
        commit held the writer lock through its own fsync. What the caller is promised is
        the same: when ``tx`` returns, the commit survives a power loss. Another writer may
        *see* it a moment before it is durable; anything that writer does to the kernel or
        files waits for its own durable intent first, whose fdatasync covers this commit.

        ``durable=False`` skips the fdatasync: the commit survives the process being killed
        but not a power loss, and the next durable commit makes it durable too. Used for
        the kernel object records: a power loss takes the loops and dm devices with it, and
        files it leaves behind are found by recovery's directory scan, so those records
        need only outlive the process."""
        if self.read_only:
            raise KernelError("write registry", self.path, errno.EROFS,
                              hint="the store's filesystem is read-only: only reading commands work")
        c = self._conn()
        if c.in_transaction:  # nested: join the outer transaction
            yield c
            return
        # One writer at a time per process (a thread lock), then per store (the flock):
        # both wake the next writer at once (see the class docstring).
        writer = self._writer_lock()
        if not writer.acquire(timeout=self.timeout):
            raise LockTimeout(f"write registry {self.path}: database is locked: another thread of this process "
                              f"kept the registry's write lock for {self.timeout:g} s",
                              op="write registry", obj=self.path)
        try:
            fd = self._lock_across_processes()
            try:
                try:
                    c.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError as e:
                    if sqlite_kind(e) == "busy":
                        raise
                    raise self._os_error("write registry", e) from e
                pending = getattr(self._local, "deferred", None)
                flushed = 0
                if pending:
                    try:
                        for sql, args in pending:
                            c.execute(sql, args)
                            flushed += 1
                    except BaseException:
                        if c.in_transaction:
                            c.execute("ROLLBACK")
                        raise
                yield from self._run_tx(c)
                if flushed and pending is not None:
                    del pending[:flushed]  # committed
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            writer.release()
        if durable:  # committed (an error above has left already): now wait for the disk
            self._sync_wal()

    def _sync_wal(self) -> None:
        """fdatasync the registry's WAL (opened afresh: SQLite may have made it anew after a
        checkpoint). No WAL: everything was checkpointed into the database, and synced."""
        wal = self.path + "-wal"
        try:
            fd = os.open(wal, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        except OSError as e:
            raise KernelError.from_oserror("sync registry", wal, e) from None
        try:
            os.fdatasync(fd)
        except OSError as e:
            raise KernelError.from_oserror("sync registry", wal, e) from None
        finally:
            os.close(fd)

    @contextmanager
    def deferring(self) -> Iterator[None]:
        """Inside this block (this thread), the records of things already gone
        (:meth:`forget_object`, :meth:`drop_link` naming their volume) are not committed on their own: they are
        written at the start of this thread's next write transaction (an operation's done
        state), or at the end of the block. A kill before that leaves the record of an
        object or link that is gone, which is what a kill just before the record's own
        commit leaves too: the operation's intent is still there, and its handler releases
        a gone object or link without complaint. Ordering is kept: a record made after a
        forget (its own transaction) writes the forget first."""
        if getattr(self._local, "deferred", None) is not None:
            yield  # nested: the outer block writes them
            return
        self._local.deferred = []
        try:
            yield
        except BaseException:
            try:
                self._flush_deferred()
            except Exception as e:  # keep the first error; the records stay, as after a kill
                log.warning("registry %s: deferred records not written: %s", self.path, e)
            raise
        self._flush_deferred()

    def _flush_deferred(self) -> None:
        try:
            if self._local.deferred:
                with self.tx(durable=False):
                    pass  # the transaction writes the pending statements first
        finally:
            self._local.deferred = None

    def _delete_soon(self, sql: str, args: tuple[Any, ...], volume_id: str | None) -> None:
        """A non-durable delete of a gone thing's record. Deferred inside :meth:`deferring` when
        the record's volume is named: the deferred delete takes only that volume's record, so
        a record another process made meanwhile under the same name (a loop number the
        kernel gave out again, a link path a restore took over) is kept."""
        pending = getattr(self._local, "deferred", None)
        if volume_id is not None and pending is not None and not self._conn().in_transaction:
            item = (sql + " AND volume_id=?", (*args, volume_id))
            if item not in pending:
                pending.append(item)
            return
        with self.tx(durable=False) as c:
            c.execute(sql, args)

    def _writer_lock(self) -> threading.Lock:
        pid, lock = self._writer
        if pid != os.getpid():  # a forked child: the parent's lock may have been held at fork
            self._writer = (os.getpid(), threading.Lock())
            lock = self._writer[1]
        return lock

    def _drop_inherited_flock(self) -> None:
        pid, fd = self._flock
        if pid != os.getpid():
            self._flock = (os.getpid(), -1)
            if fd >= 0:
                try:
                    os.close(fd)  # our copy only: the parent's lock stays (see _after_fork_in_child)
                except OSError:
                    pass

    def _lock_across_processes(self) -> int:
        """Take the writer flock (the caller holds the thread lock); return its fd."""
        self._drop_inherited_flock()
        fd = self._flock[1]
        if fd < 0:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise KernelError.from_oserror("open registry lock", self.lock_path, e) from None
            self._flock = (os.getpid(), fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            pass
        except OSError as e:
            raise KernelError.from_oserror("lock", self.lock_path, e) from None
        if self._wait_flock(fd):
            return fd
        self._flock = (os.getpid(), -1)  # the abandoned waiter closes that fd when it wakes
        raise LockTimeout(f"write registry {self.path}: database is locked: its writer lock {self.lock_path} "
                          f"still held after {self.timeout:g} s by {describe_holders(self.lock_path)}",
                          op="write registry", obj=self.path,
                          hint="wait for that process to finish, or end it if it hangs")

    def _wait_flock(self, fd: int) -> bool:
        """A blocking flock, woken by the kernel at the holder's release, bounded by
        ``timeout``: the blocking call runs in this process's waiter thread (no flock call
        takes a deadline, and a library cannot aim a signal at one thread) while this
        thread waits for it. On time-out that waiter is abandoned: it closes ``fd``
        (dropping the lock) once it gets it, and the next wait starts a new one."""
        pid, waiter = self._waiter
        if waiter is None or pid != os.getpid() or waiter.abandoned:
            waiter = _FlockWaiter()
            self._waiter = (os.getpid(), waiter)
        return waiter.wait(fd, self.timeout, self.lock_path)

    def _run_tx(self, c: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        try:
            yield c
        except sqlite3.DatabaseError as e:
            if c.in_transaction:
                c.execute("ROLLBACK")
            if _corrupt(e):
                raise self._damaged(e) from e
            raise
        except BaseException:
            if c.in_transaction:  # SQLite already rolled back on SQLITE_FULL and the like
                c.execute("ROLLBACK")
            raise
        try:
            c.execute("COMMIT")
        except sqlite3.OperationalError as e:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise self._os_error("write registry", e) from e
        # One read right after the commit moves this connection's WAL read mark to it while
        # the -shm page is still dirty. Else the next read writes the mark into that page,
        # maybe after it was written back: on a full btrfs (copy on write) that write fault
        # finds no space and the kernel kills the process with SIGBUS. The commit stands
        # whatever this read says.
        try:
            c.execute("SELECT 1 FROM meta LIMIT 1").fetchall()
        except sqlite3.Error as e:
            log.debug("registry %s: read after commit: %s", self.path, e)

    def _q(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        try:
            return self._conn().execute(sql, args).fetchall()
        except sqlite3.DatabaseError as e:
            if _corrupt(e):
                raise self._damaged(e) from e
            raise

    def _damaged(self, e: sqlite3.Error) -> RegistryDamaged:
        return RegistryDamaged(f"read registry {self.path}: {e}", op="read registry", obj=self.path,
                               hint="`cowdisk recover --rebuild-registry` rebuilds it from the volumes' and "
                                    "templates' manifests (the damaged file is kept aside)")

    def _check_version(self) -> None:
        version = self._q("PRAGMA user_version")[0][0]
        if version != SCHEMA_VERSION:
            raise CowdiskError(f"open registry {self.path}: schema version {version}, this cowdisk reads "
                               f"{SCHEMA_VERSION}, and the read-only filesystem forbids a migration",
                               op="open registry", obj=self.path)

    def _migrate(self) -> None:
        with self.tx() as c:
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise CowdiskError(
                    f"open registry {self.path}: schema version {version} is newer than this cowdisk "
                    f"({SCHEMA_VERSION})", op="open registry", obj=self.path,
                    hint="upgrade cowdisk")
            for v in range(version, SCHEMA_VERSION):
                for stmt in MIGRATIONS[v]:
                    c.execute(stmt)
                c.execute(f"PRAGMA user_version={v + 1}")
            # a damaged page anywhere (the header and schema may still read fine) is found
            # now, at open, not in the middle of some later command: a few ms on any store
            problems = [r[0] for r in c.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise QuickCheckFailed("quick_check: " + "; ".join(problems[:3]))

    @property
    def schema_version(self) -> int:
        return int(self._q("PRAGMA user_version")[0][0])
