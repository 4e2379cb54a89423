"""cowdiskd on dm-snapshot, inside the kernel lab: a real daemon process on a real unix socket.

The API through a real device-mapper (create, checkpoint, restore as a new id, usage and
the COW fill in /metrics), and a daemon SIGKILLed in the middle of a create (at its dm
step) whose restart leaves what the crash matrix expects, no dm device or loop leaked.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
from typing import Iterator

import pytest

import crashmatrix
from cowdisk.daemon.protocol import Unavailable, WorkerDied
from cowdisk.store import Store
from daemonutil import Daemon, raises, wait_for
from testutil import assert_same_host, host_state, make_tree, read_at, write_at

pytestmark = pytest.mark.lab

MiB = 1 << 20


def dm_names(prefix: str) -> list[str]:
    out = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def _fstype(path: str) -> str:
    best, kind = "", ""
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, parts[2]
    return kind


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A directory for sockets on a local filesystem (not the host's 9p share)."""
    base = next((d for d in ("/dev/shm", "/run", "/tmp") if os.path.isdir(d) and _fstype(d) not in ("9p", "")),
                None)
    if base is None:
        pytest.skip("no local filesystem for a unix socket in the lab")
    d = tempfile.mkdtemp(prefix="cdd-", dir=base)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_daemon_on_dm_snapshot(tmp_path, sockdir) -> None:
    before = host_state()
    root = str(tmp_path / "store")
    with Daemon(root, os.path.join(sockdir, "d.sock"), backend="dm-snapshot") as d:
        d.start(timeout=120)
        c = d.client
        assert c.health()["backend"] == "dm-snapshot" and c.backend.block_device
        c.build_template(make_tree(os.path.join(root, "incoming", "tree")), "base")
        v = c.create_volume("vm1", "base")
        assert v.device and v.device.startswith("/dev/")
        write_at(v.link, 5 * MiB, b"dm" * 2048)
        u = c.usage("vm1")
        assert u.cow_used_bytes and u.cow_total_bytes and u.health == "ok"
        text = c.metrics()
        assert 'cowdisk_volume_cow_used_bytes{volume="vm1"}' in text and "cowdisk_snapshots_invalid 0.0" in text
        c.checkpoint("vm1")
        v2 = c.restore("vm1", "vm2")
        assert read_at(v2.link, 5 * MiB, 4096) == b"dm" * 2048
        assert sorted(dm_names(f"cowdisk-{c.id}-")) == [f"cowdisk-{c.id}-vm2"]
        for vid in ("vm2", "vm1"):
            c.remove_volume(vid)
        assert dm_names(f"cowdisk-{c.id}-") == []
        assert d.stop() == 0
    with Store(root) as s:
        s.destroy()
    assert_same_host(before)


def test_worker_killed_in_a_dm_create(tmp_path, sockdir) -> None:
    """The store worker SIGKILLed right after it made the dm device: the caller gets
    WorkerDied, and the daemon, still serving, has rolled the create back (device and loop
    gone) before answering."""
    before = host_state()
    root = str(tmp_path / "store")
    case = next(c for c in crashmatrix.cases("dm-snapshot") if c.op == "create" and c.step == "dm")
    crashmatrix.setup(root, "dm-snapshot", str(tmp_path / "tree"), case)
    sock = os.path.join(sockdir, "d.sock")
    with Daemon(root, sock, backend="dm-snapshot", extra_env={"COWDISK_CRASH_AT": "create:dm"}) as d:
        d.start(timeout=120)
        e = raises(d.client.create_volume, "x", "base")
        assert isinstance(e, WorkerDied) and "rolled back: create x" in str(e), e
        assert {v.id: v.state for v in d.client.volumes()} == crashmatrix.expected(case.operation)
        assert d.stop() == 0
    crashmatrix.check(root, case, "dm-snapshot", dm_names)
    assert_same_host(before)


def test_daemon_killed_in_a_dm_create(tmp_path, sockdir) -> None:
    """The daemon SIGKILLed while its store worker stands right after making the dm device:
    the worker dies with it, and the restarted daemon's recovery rolls the create back."""
    before = host_state()
    root = str(tmp_path / "store")
    case = next(c for c in crashmatrix.cases("dm-snapshot") if c.op == "create" and c.step == "dm")
    crashmatrix.setup(root, "dm-snapshot", str(tmp_path / "tree"), case)
    sock = os.path.join(sockdir, "d.sock")
    mark = tmp_path / "paused"
    with Daemon(root, sock, backend="dm-snapshot", extra_env={
            "COWDISK_PAUSE_AT": "create:dm", "COWDISK_PAUSE_S": "300", "COWDISK_PAUSE_MARK": str(mark)}) as d:
        d.start(timeout=120)
        out: list[BaseException] = []
        t = threading.Thread(target=lambda: out.append(raises(d.client.create_volume, "x", "base")))
        t.start()
        wait_for(mark.exists, timeout=120, what="the worker at create:dm")
        worker = int(mark.read_text())
        assert d.kill() == -signal.SIGKILL
        t.join(60)
        assert isinstance(out[0], Unavailable), out
        wait_for(lambda: not os.path.exists(f"/proc/{worker}"), what="the worker to die with the daemon")
    with Daemon(root, sock, backend="dm-snapshot") as d:
        d.start(timeout=120)
        assert {v.id: v.state for v in d.client.volumes()} == crashmatrix.expected(case.operation)
        assert d.client.health()["recovery"]["rolled_back"], d.client.health()
        assert d.stop() == 0
    crashmatrix.check(root, case, "dm-snapshot", dm_names)
    assert_same_host(before)
