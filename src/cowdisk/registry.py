"""Durable state of one store in SQLite (WAL): templates, volumes, kernel objects, intents.

All SQL lives here. Only the store writes through this module. One connection per
thread; every write is one ``BEGIN IMMEDIATE`` transaction, so several processes and
threads can share a store. The schema has one version number and an ordered list of
migrations applied on open.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from .errors import AlreadyExists, CowdiskError, KernelError, LockTimeout, NotFound, RegistryDamaged, StateError
from .kernel.procfs import process_alive, process_start
from .locks import describe_holders
from .model import VolumeState as VolumeState
from .operations import (  # the allowed state changes, derived from the operations' declarations
    ATTACHED as ATTACHED,
    CHECKPOINTED as CHECKPOINTED,
    CHECKPOINTING as CHECKPOINTING,
    CREATING as CREATING,
    ERROR as ERROR,
    REMOVING as REMOVING,
    RESTORING as RESTORING,
    TRANSITIONS as TRANSITIONS,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3

MIGRATIONS: list[list[str]] = [
    # version 1
    [
        """CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
        """CREATE TABLE templates (
            id TEXT PRIMARY KEY,
            path TEXT NOT NULL,
            size INTEGER NOT NULL,
            digest TEXT NOT NULL,
            mtime_ns INTEGER NOT NULL,
            ino INTEGER NOT NULL,
            owned INTEGER NOT NULL,
            source TEXT NOT NULL,
            created REAL NOT NULL,
            state TEXT NOT NULL DEFAULT 'ready'
        )""",
        """CREATE TABLE template_names (
            name TEXT PRIMARY KEY,
            template_id TEXT NOT NULL REFERENCES templates(id) ON DELETE CASCADE
        )""",
        """CREATE TABLE template_loops (
            template_id TEXT PRIMARY KEY REFERENCES templates(id) ON DELETE CASCADE,
            loop INTEGER NOT NULL,
            devno TEXT NOT NULL
        )""",
        """CREATE TABLE volumes (
            id TEXT PRIMARY KEY,
            template_id TEXT NOT NULL REFERENCES templates(id),
            backend TEXT NOT NULL,
            state TEXT NOT NULL,
            size INTEGER NOT NULL,
            data_path TEXT NOT NULL,
            device TEXT,
            created REAL NOT NULL,
            updated REAL NOT NULL,
            parent TEXT,
            error TEXT
        )""",
        """CREATE INDEX volumes_template ON volumes(template_id)""",
        """CREATE TABLE objects (
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            volume_id TEXT NOT NULL,
            created REAL NOT NULL,
            PRIMARY KEY (kind, name)
        )""",
        """CREATE TABLE links (
            path TEXT PRIMARY KEY,
            volume_id TEXT NOT NULL,
            target TEXT NOT NULL
        )""",
        """CREATE TABLE intents (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            op TEXT NOT NULL,
            volume_id TEXT,
            template_id TEXT,
            pid INTEGER NOT NULL,
            pid_start TEXT NOT NULL,
            started REAL NOT NULL,
            data TEXT NOT NULL DEFAULT '{}'
        )""",
    ],
    # version 2: a template's change time joins its quick identity check (ctime cannot be
    # set from user space, unlike mtime)
    [
        """ALTER TABLE templates ADD COLUMN ctime_ns INTEGER NOT NULL DEFAULT 0""",
    ],
    # version 3: owners. Every volume and template records the uid that made it (rows of an
    # older store: root, 0); a shared template is usable by every caller
    [
        """ALTER TABLE volumes ADD COLUMN owner INTEGER NOT NULL DEFAULT 0""",
        """ALTER TABLE templates ADD COLUMN owner INTEGER NOT NULL DEFAULT 0""",
        """ALTER TABLE templates ADD COLUMN shared INTEGER NOT NULL DEFAULT 0""",
        """CREATE INDEX volumes_owner ON volumes(owner)""",
    ],
]
assert len(MIGRATIONS) == SCHEMA_VERSION



@dataclass(frozen=True)
class TemplateRow:
    id: str
    path: str
    size: int
    digest: str
    mtime_ns: int
    ino: int
    owned: bool
    source: str
    created: float
    state: str
    names: tuple[str, ...] = ()
    ctime_ns: int = 0
    """0 for rows made before the change time was recorded: then it is not compared."""
    owner: int = 0
    """The uid that made it (root, 0, for rows of a store older than owners)."""
    shared: bool = False
    """Usable by every caller (only its owner and root change it)."""

    def visible_to(self, uid: int | None) -> bool:
        """Whether caller ``uid`` may see and use it (None: every caller, root's view)."""
        return uid is None or self.owner == uid or self.shared


@dataclass(frozen=True)
class VolumeRow:
    id: str
    template_id: str
    backend: str
    state: VolumeState
    size: int
    data_path: str
    device: str | None
    created: float
    updated: float
    parent: str | None
    error: str | None
    owner: int = 0
    """The uid that made it (root, 0, for rows of a store older than owners)."""


@dataclass(frozen=True)
class Intent:
    id: int
    op: str
    volume_id: str | None
    template_id: str | None
    pid: int
    pid_start: str
    started: float
    data: dict[str, Any] = field(default_factory=dict)


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


_OPEN: "weakref.WeakSet[Registry]" = weakref.WeakSet()


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


class Registry:
    """The SQLite registry at ``path``.

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

    # -- meta --------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        rows = self._q("SELECT value FROM meta WHERE key=?", (key,))
        return rows[0][0] if rows else None

    def set_meta_default(self, key: str, value: str) -> str:
        """Set ``key`` unless it is set; return the value in force."""
        with self.tx() as c:
            c.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (key, value))
            return str(c.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()[0])

    def set_meta(self, key: str, value: str) -> None:
        with self.tx() as c:
            c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # -- templates ---------------------------------------------------------------

    _T = ("SELECT t.*, (SELECT json_group_array(name) FROM template_names WHERE template_id=t.id) AS names_json"
          " FROM templates t")
    """A template's row with its names, in one statement."""

    def _template(self, r: sqlite3.Row) -> TemplateRow:
        names = tuple(sorted(json.loads(r["names_json"])))
        return TemplateRow(r["id"], r["path"], r["size"], r["digest"], r["mtime_ns"], r["ino"],
                           bool(r["owned"]), r["source"], r["created"], r["state"], names, r["ctime_ns"],
                           r["owner"], bool(r["shared"]))

    def add_template(self, t: TemplateRow, *, visible_to: int | None = None) -> None:
        with self.tx() as c:
            try:
                c.execute(
                    "INSERT INTO templates(id, path, size, digest, mtime_ns, ino, owned, source, created, state,"
                    " ctime_ns, owner, shared) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (t.id, t.path, t.size, t.digest, t.mtime_ns, t.ino, int(t.owned), t.source, t.created,
                     t.state, t.ctime_ns, t.owner, int(t.shared)))
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"template {t.id} already exists", op="add template", obj=t.id) from None
            for n in t.names:
                self.add_template_name(t.id, n, visible_to=visible_to)

    def add_template_name(self, template_id: str, name: str, *, visible_to: int | None = None) -> None:
        """Name a template; a name another template has is refused (naming that template only
        when caller ``visible_to`` may see it)."""
        with self.tx() as c:
            row = c.execute("SELECT n.template_id, t.owner, t.shared FROM template_names n JOIN templates t"
                            " ON t.id=n.template_id WHERE n.name=?", (name,)).fetchone()
            if row and row[0] != template_id:
                seen = visible_to is None or row[1] == visible_to or row[2]
                raise AlreadyExists(f"template name {name!r} is already used"
                                    + (f" by template {row[0]}" if seen else " (template names are one namespace "
                                                                               "for every owner)"),
                                    op="name template", obj=name)
            c.execute("INSERT OR IGNORE INTO template_names(name, template_id) VALUES (?, ?)",
                      (name, template_id))

    def find_template(self, ref: str, *, visible_to: int | None = None) -> TemplateRow | None:
        """The template ``ref`` names (id, name, id or digest prefix); with ``visible_to``:
        only among the ones that caller may see (its own and the shared ones)."""
        def seen(rows: list[sqlite3.Row]) -> list[TemplateRow]:
            return [t for t in map(self._template, rows) if t.visible_to(visible_to)]

        found = seen(self._q(f"{self._T} WHERE t.id=?", (ref,)))
        if not found:
            found = seen(self._q(f"{self._T} JOIN template_names n ON n.template_id=t.id WHERE n.name=?", (ref,)))
        if not found and len(ref) >= 6:
            found = seen(self._q(f"{self._T} WHERE t.id LIKE ? OR t.digest LIKE ?", (ref + "%", ref + "%")))
            if len(found) > 1:
                return None
        return found[0] if found else None

    def get_template(self, ref: str, *, visible_to: int | None = None) -> TemplateRow:
        """The template ``ref`` names; NotFound (the same words for one the caller may not
        see as for one that does not exist) otherwise."""
        t = self.find_template(ref, visible_to=visible_to)
        if t is None:
            raise NotFound(f"template {ref!r} not found", op="find template", obj=ref,
                           hint="`cowdisk template ls` lists templates")
        return t

    def templates(self, *, visible_to: int | None = None) -> list[TemplateRow]:
        return [t for t in map(self._template, self._q(f"{self._T} ORDER BY t.created")) if t.visible_to(visible_to)]

    def set_template_owner(self, template_id: str, *, owner: int | None = None, shared: bool | None = None) -> None:
        """Hand a template to another owner and/or mark it shared or not."""
        with self.tx() as c:
            if owner is not None:
                c.execute("UPDATE templates SET owner=? WHERE id=?", (owner, template_id))
            if shared is not None:
                c.execute("UPDATE templates SET shared=? WHERE id=?", (int(shared), template_id))

    def set_template_state(self, template_id: str, state: str) -> None:
        with self.tx() as c:
            c.execute("UPDATE templates SET state=? WHERE id=?", (state, template_id))

    def set_template_identity(self, template_id: str, size: int, mtime_ns: int, ino: int, ctime_ns: int) -> None:
        """Record the template file's quick identity again (after a full digest found the
        content unchanged) and mark it ready."""
        with self.tx() as c:
            c.execute("UPDATE templates SET size=?, mtime_ns=?, ino=?, ctime_ns=?, state='ready' WHERE id=?",
                      (size, mtime_ns, ino, ctime_ns, template_id))

    def adopt_volume(self, v: VolumeRow) -> None:
        """Insert a volume row as it is (any state): only for rebuilding rows from manifests,
        where the volume's history already happened."""
        with self.tx() as c:
            c.execute(
                "INSERT INTO volumes(id, template_id, backend, state, size, data_path, device, created,"
                " updated, parent, error, owner) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (v.id, v.template_id, v.backend, v.state, v.size, v.data_path, v.device, v.created,
                 v.updated, v.parent, v.error, v.owner))

    def find_template_by_source(self, source: str) -> TemplateRow | None:
        rows = self._q(f"{self._T} WHERE t.source=? ORDER BY t.created LIMIT 1", (source,))
        return self._template(rows[0]) if rows else None

    def delete_template(self, template_id: str) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM template_names WHERE template_id=?", (template_id,))
            c.execute("DELETE FROM template_loops WHERE template_id=?", (template_id,))
            c.execute("DELETE FROM templates WHERE id=?", (template_id,))

    def template_users(self, template_id: str, *, besides: str | None = None, owner: int | None = None) -> list[str]:
        """The volumes over a template; with ``besides``: other than that one, and not being
        removed themselves; with ``owner``: only that uid's."""
        if owner is not None:
            return [r[0] for r in self._q("SELECT id FROM volumes WHERE template_id=? AND owner=? ORDER BY id",
                                          (template_id, owner))]
        if besides is None:
            return [r[0] for r in self._q("SELECT id FROM volumes WHERE template_id=? ORDER BY id", (template_id,))]
        return [r[0] for r in self._q("SELECT id FROM volumes WHERE template_id=? AND id!=? AND state!=? ORDER BY id",
                                      (template_id, besides, REMOVING.value))]

    # -- template loops ----------------------------------------------------------

    def template_loop(self, template_id: str) -> tuple[int, str] | None:
        rows = self._q("SELECT loop, devno FROM template_loops WHERE template_id=?", (template_id,))
        return (rows[0][0], rows[0][1]) if rows else None

    def set_template_loop(self, template_id: str, loop: int, devno: str) -> None:
        with self.tx() as c:
            c.execute("INSERT OR REPLACE INTO template_loops(template_id, loop, devno) VALUES (?,?,?)",
                      (template_id, loop, devno))

    def clear_template_loop(self, template_id: str) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM template_loops WHERE template_id=?", (template_id,))

    # -- volumes -----------------------------------------------------------------

    @staticmethod
    def _volume(r: sqlite3.Row) -> VolumeRow:
        return VolumeRow(r["id"], r["template_id"], r["backend"], VolumeState(r["state"]), r["size"], r["data_path"],
                         r["device"], r["created"], r["updated"], r["parent"], r["error"], r["owner"])

    def add_volume(self, v: VolumeRow) -> None:
        if v.state != CREATING:
            raise StateError(f"add volume {v.id}: a volume is born {CREATING.value}, not {v.state}",
                             op="add volume", obj=v.id)
        with self.tx() as c:
            try:  # the primary key and the template's foreign key check it (no reads first)
                c.execute(
                    "INSERT INTO volumes(id, template_id, backend, state, size, data_path, device, created,"
                    " updated, parent, error, owner) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (v.id, v.template_id, v.backend, v.state, v.size, v.data_path, v.device, v.created,
                     v.updated, v.parent, v.error, v.owner))
            except sqlite3.IntegrityError as e:
                if c.execute("SELECT 1 FROM volumes WHERE id=?", (v.id,)).fetchone():
                    raise AlreadyExists(f"volume {v.id!r} already exists", op="create volume", obj=v.id,
                                        hint="pick another id or remove the old volume") from None
                if not c.execute("SELECT 1 FROM templates WHERE id=?", (v.template_id,)).fetchone():
                    raise NotFound(f"add volume {v.id}: template {v.template_id!r} not found", op="add volume",
                                   obj=v.template_id) from None
                raise CowdiskError(f"add volume {v.id}: {e}", op="add volume", obj=v.id) from e

    def find_volume(self, vid: str) -> VolumeRow | None:
        rows = self._q("SELECT * FROM volumes WHERE id=?", (vid,))
        return self._volume(rows[0]) if rows else None

    def get_volume(self, vid: str, *, owner: int | None = None) -> VolumeRow:
        """Volume ``vid``; with ``owner``: only if that uid owns it. NotFound otherwise, in the
        same words whether it does not exist or is another owner's (ids do not leak)."""
        v = self.find_volume(vid)
        if v is None or (owner is not None and v.owner != owner):
            raise NotFound(f"volume {vid!r} not found", op="find volume", obj=vid,
                           hint="`cowdisk volume ls` lists volumes")
        return v

    def volumes(self, *, owner: int | None = None) -> list[VolumeRow]:
        if owner is None:
            return [self._volume(r) for r in self._q("SELECT * FROM volumes ORDER BY created, id")]
        return [self._volume(r) for r in self._q("SELECT * FROM volumes WHERE owner=? ORDER BY created, id",
                                                 (owner,))]

    def count_volumes(self, owner: int) -> int:
        return int(self._q("SELECT count(*) FROM volumes WHERE owner=?", (owner,))[0][0])

    def set_volume_owner(self, vid: str, owner: int) -> None:
        with self.tx() as c:
            if c.execute("UPDATE volumes SET owner=?, updated=? WHERE id=?", (owner, time.time(), vid)).rowcount != 1:
                raise NotFound(f"volume {vid!r} not found", op="chown volume", obj=vid)

    _MUTABLE = frozenset({"device", "error"})

    def update_volume(self, vid: str, **fields: Any) -> None:
        """Change a volume's device path or error text; the state only through :meth:`set_state`,
        identity fields (id, template, backend, data path) never."""
        bad = set(fields) - self._MUTABLE
        if bad:
            raise TypeError(f"update_volume({vid!r}): {', '.join(sorted(bad))} cannot be updated here")
        if not fields:
            return
        fields["updated"] = time.time()
        cols = ", ".join(f"{k}=?" for k in fields)
        with self.tx() as c:
            c.execute(f"UPDATE volumes SET {cols} WHERE id=?", (*fields.values(), vid))

    def set_state(self, vid: str, to: VolumeState, **fields: Any) -> VolumeState:
        """Move volume ``vid`` to state ``to`` (and set ``fields``: device, error) if the
        transition table allows it; returns the state it left. Raises StateError otherwise."""
        with self.tx() as c:
            row = c.execute("SELECT state FROM volumes WHERE id=?", (vid,)).fetchone()
            if row is None:
                raise NotFound(f"volume {vid!r} not found", op="set volume state", obj=vid)
            cur = VolumeState(row[0])
            if (cur, to) not in TRANSITIONS:
                raise StateError(f"volume {vid}: {cur.value} -> {to.value} is not an allowed transition",
                                 op="set volume state", obj=vid)
            bad = set(fields) - self._MUTABLE
            if bad:
                raise TypeError(f"set_state({vid!r}): {', '.join(sorted(bad))} cannot be updated here")
            cols = "".join(f", {k}=?" for k in fields)
            c.execute(f"UPDATE volumes SET state=?, updated=?{cols} WHERE id=?",
                      (to.value, time.time(), *fields.values(), vid))
        log.debug("volume %s: %s -> %s", vid, cur.value, to.value)
        return cur

    def delete_volume(self, vid: str) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM objects WHERE volume_id=?", (vid,))
            c.execute("DELETE FROM links WHERE volume_id=?", (vid,))
            c.execute("DELETE FROM volumes WHERE id=?", (vid,))

    # -- kernel objects and links ---------------------------------------------------

    def record_object(self, volume_id: str, kind: str, name: str) -> None:
        with self.tx(durable=False) as c:
            c.execute("INSERT OR REPLACE INTO objects(kind, name, volume_id, created) VALUES (?,?,?,?)",
                      (kind, name, volume_id, time.time()))

    def forget_object(self, kind: str, name: str, *, volume_id: str | None = None) -> None:
        """Forget a kernel object that is gone (of ``volume_id``: deferred inside :meth:`deferring`)."""
        self._delete_soon("DELETE FROM objects WHERE kind=? AND name=?", (kind, name), volume_id)

    def objects(self, volume_id: str | None = None) -> list[tuple[str, str, str]]:
        if volume_id is None:
            rows = self._q("SELECT kind, name, volume_id FROM objects ORDER BY created")
        else:
            rows = self._q("SELECT kind, name, volume_id FROM objects WHERE volume_id=? ORDER BY created",
                           (volume_id,))
        return [(r[0], r[1], r[2]) for r in rows]

    def set_link(self, path: str, volume_id: str, target: str) -> None:
        """Record a stable link. Not durable on its own (see ``tx``): a link is made or dropped
        inside an operation, between its intent's durable commit and its done state's, which
        makes it durable; after a power loss in between, recovery acts on the intent, drops
        link rows whose owner is not attached and removes link directories of no volume."""
        with self.tx(durable=False) as c:
            c.execute("INSERT OR REPLACE INTO links(path, volume_id, target) VALUES (?,?,?)",
                      (path, volume_id, target))

    def drop_link(self, path: str, *, volume_id: str | None = None) -> None:
        """Drop the row of a link that is gone (of ``volume_id``: deferred inside :meth:`deferring`)."""
        self._delete_soon("DELETE FROM links WHERE path=?", (path,), volume_id)

    def link(self, path: str) -> tuple[str, str, str] | None:
        """The row of the link at ``path`` (a primary-key lookup), or None."""
        rows = self._q("SELECT path, volume_id, target FROM links WHERE path=?", (path,))
        return (rows[0][0], rows[0][1], rows[0][2]) if rows else None

    def links_in(self, directory: str) -> list[tuple[str, str, str]]:
        """The rows of the links directly inside ``directory`` (a range of the primary key:
        paths after ``directory/`` and before ``directory0``, '0' following '/'), without
        reading every link of the store."""
        d = directory.rstrip("/")
        rows = self._q("SELECT path, volume_id, target FROM links WHERE path > ? AND path < ? ORDER BY path",
                       (d + "/", d + "0"))
        return [(r[0], r[1], r[2]) for r in rows if "/" not in r[0][len(d) + 1:]]

    def links(self, volume_id: str | None = None) -> list[tuple[str, str, str]]:
        if volume_id is None:
            rows = self._q("SELECT path, volume_id, target FROM links ORDER BY path")
        else:
            rows = self._q("SELECT path, volume_id, target FROM links WHERE volume_id=? ORDER BY path",
                           (volume_id,))
        return [(r[0], r[1], r[2]) for r in rows]

    # -- intents -----------------------------------------------------------------

    def begin_intent(self, op: str, *, volume_id: str | None = None, template_id: str | None = None,
                     data: dict[str, Any] | None = None) -> int:
        pid = os.getpid()
        with self.tx() as c:
            cur = c.execute(
                "INSERT INTO intents(op, volume_id, template_id, pid, pid_start, started, data)"
                " VALUES (?,?,?,?,?,?,?)",
                (op, volume_id, template_id, pid, process_start(pid), time.time(), json.dumps(data or {})))
            return int(cur.lastrowid or 0)

    def update_intent(self, intent_id: int, data: dict[str, Any]) -> None:
        with self.tx() as c:
            c.execute("UPDATE intents SET data=? WHERE id=?", (json.dumps(data), intent_id))

    def end_intent(self, intent_id: int) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM intents WHERE id=?", (intent_id,))

    def intents(self) -> list[Intent]:
        return [Intent(r["id"], r["op"], r["volume_id"], r["template_id"], r["pid"], r["pid_start"],
                       r["started"], json.loads(r["data"]))
                for r in self._q("SELECT * FROM intents ORDER BY id")]

    def live_intent_volumes(self) -> set[str]:
        """Volumes (and template ids) that a running process is working on right now."""
        out: set[str] = set()
        for i in self.intents():
            if process_alive(i.pid, i.pid_start):
                if i.volume_id:
                    out.add(i.volume_id)
                if i.template_id:
                    out.add(i.template_id)
        return out
