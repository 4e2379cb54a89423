"""The registry's cross-process writer lock: a blocking flock on ``<registry>.lock`` around
each write transaction, so writers of several processes wait on the kernel (woken at the
holder's release), not on SQLite's sleeping busy handler.

Real processes on one SQLite file; the witnesses are the SQLite file read without the
registry and the kernel's own lock table (/proc/locks). Nothing here is timed: the
figures are in bench/registry.py.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from cowdisk.errors import LockTimeout
from cowdisk.kernel import procfs
from cowdisk.registry import Registry

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")


@pytest.fixture
def db(tmp_path) -> str:
    path = str(tmp_path / "registry.db")
    Registry(path).close()  # made (and migrated) once, before the writers start
    return path


def raw(db: str, sql: str) -> list[tuple]:
    c = sqlite3.connect(db)
    try:
        return c.execute(sql).fetchall()
    finally:
        c.close()


def run_python(code: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(SRC))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


WRITER = """
    import sys
    from cowdisk.registry import Registry
    db, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print("ready", flush=True)
    r = Registry(db)  # opening writes too (the schema check): it takes the lock
    # SQLite must never wait here: a writer that met another one inside SQLite would get
    # "database is locked" at once. Only the flock may make it wait.
    r._conn().execute("PRAGMA busy_timeout=0")
    for i in range(n):
        with r.tx(durable=i % 2 == 0):
            r.record_object(who, "test", f"{who}-{i}")
    r.close()
"""


def test_four_processes_write_at_once_and_never_meet_inside_sqlite(db) -> None:
    n = 150
    procs = [run_python(WRITER, db, f"p{k}", str(n)) for k in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "locked" not in err
    assert raw(db, "SELECT volume_id, count(*) FROM objects GROUP BY volume_id ORDER BY volume_id") == \
        [(f"p{k}", n) for k in range(4)]


def blocked_waiters(path: str) -> int:
    """Blocked flock waiters on ``path``'s inode, from the kernel's own lock table."""
    ino = os.stat(path).st_ino
    with open("/proc/locks") as f:
        return sum(1 for line in f if "->" in line and "FLOCK" in line and
                   line.split()[6 if "->" in line else 5].rsplit(":", 1)[-1] == str(ino))


def test_a_writer_blocks_while_the_lock_is_held_and_proceeds_at_its_release(db) -> None:
    fd = os.open(f"{db}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        p = run_python(WRITER, db, "w", "1")
        try:
            assert p.stdout.readline().strip() == "ready"
            deadline = time.monotonic() + 120
            while blocked_waiters(f"{db}.lock") == 0:  # the kernel shows it waiting on our lock
                assert p.poll() is None, p.stderr.read()
                assert time.monotonic() < deadline, "the writer never waited on the lock"
                time.sleep(0.01)
            assert raw(db, "SELECT count(*) FROM objects") == [(0,)]  # nothing written past the lock
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert raw(db, "SELECT volume_id, name FROM objects") == [("w", "w-0")]
    finally:
        os.close(fd)


def test_a_writer_past_the_timeout_is_told_who_holds_the_lock(db) -> None:
    fd = os.open(f"{db}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    r = Registry(db, timeout=0.3)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another open file: excludes even within this process
        with pytest.raises(LockTimeout) as e:
            with r.tx():
                r.record_object("v", "test", "never")
        assert "database is locked" in str(e.value) and f"PID {os.getpid()}" in str(e.value)
        assert f"{db}.lock" in str(e.value)
        fcntl.flock(fd, fcntl.LOCK_UN)
        with r.tx():  # the abandoned wait lets go once it gets the lock; the next write goes through
            r.record_object("v", "test", "later")
        assert raw(db, "SELECT name FROM objects") == [("later",)]
    finally:
        os.close(fd)
        r.close()


FORKER = """
    import os, sys, time
    from cowdisk.registry import Registry
    r = Registry(sys.argv[1])
    r.record_object("p", "test", "before")  # the lock file is open now
    rfd, wfd = os.pipe()
    child = os.fork()
    if child == 0:  # a child that never writes the registry, and outlives its parent
        os.write(wfd, b"x")  # running (past the fork hooks)
        time.sleep(600)
        os._exit(0)
    os.read(rfd, 1)
    print(child, flush=True)
    with r.tx():
        r.record_object("p", "test", "killed")
        print("in tx", flush=True)
        time.sleep(600)
"""


def test_a_forked_child_does_not_keep_its_parents_lock(db) -> None:
    """flock belongs to the open file description, which fork shares: a parent killed inside a
    transaction must not leave the lock held by a child that inherited the descriptor."""
    p = run_python(FORKER, db)
    child = 0
    try:
        child = int(p.stdout.readline())
        assert p.stdout.readline().strip() == "in tx", p.stderr.read()
        assert [pid for pid, _ in procfs.lock_holders(f"{db}.lock")] == [p.pid]
        p.kill()
        p.wait(timeout=60)
        assert procfs.process_alive(child)
        assert procfs.lock_holders(f"{db}.lock") == []  # the kernel's witness: nobody holds it
        r = Registry(db, timeout=30)
        try:
            r.record_object("t", "test", "after")
        finally:
            r.close()
        assert sorted(n for (n,) in raw(db, "SELECT name FROM objects")) == ["after", "before"]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if child:
            os.kill(child, 9)


def test_a_read_only_registry_takes_no_lock(tmp_path) -> None:
    db = str(tmp_path / "ro.db")
    w = Registry(db)
    w.record_object("v", "test", "x")
    w.close()
    os.unlink(f"{db}.lock")
    r = Registry(db, read_only=True)
    try:
        assert r.objects() == [("test", "x", "v")]
        assert not os.path.exists(f"{db}.lock")
    finally:
        r.close()


def test_the_waiter_thread_serves_every_wait_and_ends_with_close(db) -> None:
    """A contended write waits through one waiter thread per registry (not a thread per
    wait), which ends when the registry closes."""
    def waiters() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "cowdisk-registry-lock"]

    before = set(waiters())
    fd = os.open(f"{db}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    r = Registry(db)
    try:
        for i in range(3):
            fcntl.flock(fd, fcntl.LOCK_EX)
            t = threading.Thread(target=r.record_object, args=("v", "test", f"o{i}"))
            t.start()
            deadline = time.monotonic() + 120
            while blocked_waiters(f"{db}.lock") == 0:
                assert time.monotonic() < deadline, "the write never waited on the lock"
                time.sleep(0.01)
            fcntl.flock(fd, fcntl.LOCK_UN)
            t.join(120)
            assert not t.is_alive()
        assert len(set(waiters()) - before) == 1
        assert sorted(n for (n,) in raw(db, "SELECT name FROM objects")) == ["o0", "o1", "o2"]
    finally:
        r.close()
        os.close(fd)
    for t in set(waiters()) - before:
        t.join(60)
        assert not t.is_alive()
