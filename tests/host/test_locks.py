"""cowdisk.locks.FileLock: the one lock class (store locks, cache key locks), with real
flock between real processes. Children are started with subprocess and ended by PID."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from cowdisk.errors import LockTimeout
from cowdisk.kernel import procfs
from cowdisk.locks import FileLock

pytestmark = pytest.mark.root

SRC = str(Path(__file__).resolve().parents[2] / "src")

HOLD = """
import sys, time
from cowdisk.locks import FileLock
lk = FileLock(sys.argv[1], shared=sys.argv[2] == "shared", timeout=5, pid_hint=True)
lk.acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holders() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=10)


def hold(procs: list[subprocess.Popen[str]], path: Path, mode: str = "exclusive") -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLD), str(path), mode], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    procs.append(p)
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    assert line == "held", p.stderr.read() if p.stderr else ""
    return p


def test_exclusive_writes_pid_hint_and_releases(tmp_path: Path):
    path = tmp_path / "a.lock"
    with FileLock(str(path), timeout=1):  # the store's locks: no hint (two syscalls saved)
        assert path.read_text() == ""
    with FileLock(str(path), timeout=1, pid_hint=True) as lk:
        assert lk.fd >= 0
        assert path.read_text() == f"{os.getpid()}\n"
        assert procfs.lock_holders(str(path)) == [(os.getpid(), "WRITE")]
    assert lk.fd == -1 and procfs.lock_holders(str(path)) == []
    assert path.exists()  # lock files are never deleted


def test_shared_holders_coexist_and_write_no_hint(tmp_path: Path):
    path = tmp_path / "s.lock"
    a = FileLock(str(path), shared=True, timeout=0)
    b = FileLock(str(path), shared=True, timeout=0)
    with a, b:
        assert path.read_text() == ""
        assert not FileLock(str(path), timeout=0).try_acquire()
    assert FileLock(str(path), timeout=0).try_acquire()


def test_lock_file_mode(tmp_path: Path):
    old = os.umask(0)
    try:
        with FileLock(str(tmp_path / "store.lock")):
            pass
        with FileLock(str(tmp_path / "cache.lock"), mode=0o644):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "store.lock").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "cache.lock").stat().st_mode & 0o777 == 0o644


def test_timeout_names_holder_pid_and_command_line(tmp_path: Path, holders: list[subprocess.Popen[str]]):
    path = tmp_path / "t.lock"
    child = hold(holders, path)
    t0 = time.monotonic()
    with pytest.raises(LockTimeout) as ei:
        FileLock(str(path), timeout=0.5, what="volume v1").acquire()
    assert 0.4 <= time.monotonic() - t0 < 5
    msg = str(ei.value)
    assert f"PID {child.pid}" in msg and "WRITE" in msg and "cowdisk.locks" in msg, msg  # cmdline shown
    assert "volume v1" in msg and "0.5 s" in msg
    assert ei.value.exit_code == LockTimeout.exit_code


def test_shared_holder_blocks_exclusive_not_shared(tmp_path: Path, holders: list[subprocess.Popen[str]]):
    path = tmp_path / "sh.lock"
    child = hold(holders, path, "shared")
    with FileLock(str(path), shared=True, timeout=0):
        pass
    with pytest.raises(LockTimeout, match=f"(?s)PID {child.pid} .* READ"):
        FileLock(str(path), timeout=0).acquire()


def test_zero_timeout_is_one_try(tmp_path: Path, holders: list[subprocess.Popen[str]]):
    path = tmp_path / "z.lock"
    hold(holders, path)
    t0 = time.monotonic()
    lk = FileLock(str(path), timeout=0)
    with pytest.raises(LockTimeout):
        lk.acquire()
    assert time.monotonic() - t0 < 1 and lk.fd == -1


def test_try_acquire(tmp_path: Path, holders: list[subprocess.Popen[str]]):
    path = tmp_path / "n.lock"
    child = hold(holders, path)
    lk = FileLock(str(path), pid_hint=True)
    assert not lk.try_acquire()
    lk.release()
    child.kill()
    child.wait(10)
    assert lk.try_acquire()
    assert path.read_text() == f"{os.getpid()}\n"
    lk.release()


def test_on_wait_called_once_with_holder(tmp_path: Path, holders: list[subprocess.Popen[str]]):
    path = tmp_path / "w.lock"
    child = hold(holders, path)
    told: list[str] = []
    with pytest.raises(LockTimeout):
        FileLock(str(path), timeout=1.6, what="cache entry x", on_wait=told.append).acquire()
    assert len(told) == 1 and told[0].startswith("waiting for cache entry x") and f"PID {child.pid}" in told[0]


def test_waits_until_holder_goes(tmp_path: Path, holders: list[subprocess.Popen[str]]):
    path = tmp_path / "g.lock"
    child = hold(holders, path)
    threading.Timer(0.3, child.kill).start()
    with FileLock(str(path), timeout=10):
        assert procfs.lock_holders(str(path)) == [(os.getpid(), "WRITE")]


def test_stale_hint_named_when_holder_not_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """With no holder visible in /proc (another PID namespace), the error falls back to
    the PID hint in the lock file, saying it may be stale."""
    path = tmp_path / "h.lock"
    with FileLock(str(path), pid_hint=True):
        other = FileLock(str(path), timeout=0)
        monkeypatch.setattr(procfs, "lock_holders", lambda p: [])
        with pytest.raises(LockTimeout, match=f"names PID {os.getpid()}, a hint that may be stale"):
            other.acquire()


def test_threads_exclude_each_other(tmp_path: Path):
    """flock belongs to the open file description: two FileLocks in one process exclude."""
    path = str(tmp_path / "th.lock")
    inside = 0
    most = 0
    guard = threading.Lock()

    def work() -> None:
        nonlocal inside, most
        for _ in range(20):
            with FileLock(path, timeout=10):
                with guard:
                    inside += 1
                    most = max(most, inside)
                time.sleep(0.001)
                with guard:
                    inside -= 1

    ts = [threading.Thread(target=work) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert most == 1


def test_this_process_named_as_such(tmp_path: Path):
    path = str(tmp_path / "me.lock")
    with FileLock(path):
        with pytest.raises(LockTimeout, match=r"PID \d+ \(this process\) WRITE"):
            FileLock(path, timeout=0).acquire()


def test_a_lock_file_removed_by_its_holder_is_never_held_twice(tmp_path: Path):
    """The holder removes the lock file with its object; a waiter that had opened the old
    file must not end up holding the old inode while a newcomer holds a new one."""
    path = str(tmp_path / "volume-x.lock")
    holder = FileLock(path, timeout=1).acquire()
    waiter = FileLock(path, timeout=5)
    waiter.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)  # opened the old file before the unlink
    holder.unlink()
    holder.release()
    newcomer = FileLock(path, timeout=1).acquire()  # makes and locks a new file at path
    assert not waiter.try_acquire()  # the old inode is free, but it is not the lock any more
    newcomer.release()
    assert waiter.try_acquire()
    assert os.fstat(waiter.fd).st_ino == os.stat(path).st_ino
    waiter.release()


def test_removing_a_volume_removes_its_lock_file(tmp_path: Path):
    from cowdisk.store import Store
    from testutil import make_tree

    with Store(str(tmp_path / "s"), backend="copy") as s:
        s.build_template(make_tree(str(tmp_path / "tree")), "base")
        s.create_volume("v", "base")
        assert os.path.exists(os.path.join(s.root, "locks", "volume-v.lock"))
        s.remove_volume("v")
        assert not os.path.exists(os.path.join(s.root, "locks", "volume-v.lock"))
        s.destroy()
