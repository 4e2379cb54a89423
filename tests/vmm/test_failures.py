"""Issue 7 item 5: failures around a VMM's checkpoint/restore, with clear errors and no leaks.

* restore while the stable link's directory cannot be written (immutable flag; as
  root, permission bits would not stop us): a clear error, no new volume row, no data
  directory, no link, host state unchanged, and the source link still points at a
  live device/file;
* restore when the checkpoint's data vanished behind the store's back: a clear
  NotFound, nothing leaked, the volume can still be removed;
* a VMM (a real QEMU) still holds the volume during remove: refused with InUse
  naming the PID, for file volumes as for block devices (the holder search matches
  the file's st_dev/st_ino among /proc/*/fd); once the VM stops, remove works.

Host tier: pool and copy stores. dm-snapshot: tests/lab/test_failures_dm.py runs the same tests in the
kernel lab); only the last test needs QEMU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testutil import host_state, managed_store

from cowdisk.errors import InUse, KernelError, NotFound
from cowdisk.kernel import fs

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop-mounted pool, immutable flag)"),
]

SRC = str(Path(__file__).resolve().parents[2] / "src")


# dm-snapshot: tests/lab/test_failures_dm.py runs these same tests in the kernel lab
BACKENDS = ["pool", "copy"]


def cowdisk_cli(root: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("COWDISK_ROOT", None)
    return subprocess.run([sys.executable, "-m", "cowdisk", "--root", root, *args], capture_output=True,
                          text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    d = tmp_path_factory.mktemp("tree")
    (d / "etc").mkdir()
    (d / "etc" / "hello").write_text("hello\n")
    return str(d)


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    with managed_store(str(tmp_path / "store"), request.param) as s:
        yield s


def snapshot(s) -> dict:
    """Everything a failed operation could leak: registry rows, files, links, host objects."""
    def tree(base: str) -> list[tuple[str, str]]:
        out = []
        for d, dirs, files in os.walk(base):
            for n in dirs + files:
                p = os.path.join(d, n)
                out.append((os.path.relpath(p, base), os.readlink(p) if os.path.islink(p) else ""))
        return sorted(out)

    return {
        "volumes": sorted((v.id, v.state, v.device) for v in s.volumes()),
        "links": s.registry.links(),
        "objects": sorted(s.registry.objects()),
        "intents": [(i.op, i.volume_id) for i in s.registry.intents()],
        "data": tree(os.path.join(s.data_root, "volumes")),
        "linkdir": tree(os.path.join(s.root, "links")),
        "host": host_state(),
    }


def assert_link_live(s, vid: str, expect_device: str) -> None:
    """The stable link exists, points at ``expect_device``, and that device/file exists."""
    link = s.link_path(vid)
    assert os.path.islink(link), f"{link} missing"
    assert os.readlink(link) == expect_device
    assert os.path.exists(link), f"{link} -> {expect_device}, which is gone"


@pytest.fixture
def immutable():
    """set_immutable(path) for the test; always cleared afterwards (or the tmp dir cannot go)."""
    marked: list[str] = []

    def mark(path: str) -> None:
        if not fs.set_immutable(path, True):
            pytest.skip(f"{path}: the filesystem has no immutable flag")
        marked.append(path)

    try:
        yield mark
    finally:
        for p in reversed(marked):
            fs.set_immutable(p, False)


def test_restore_with_the_source_link_dir_immutable(tree, store, immutable):
    tpl = store.build_template(tree, "t")
    store.create_volume("vm-a", tpl.id)
    store.checkpoint("vm-a")
    b = store.restore("vm-a", "vm-b")  # A's link -> B (the path a VM snapshot recorded)
    assert_link_live(store, "vm-a", b.device)

    immutable(os.path.dirname(store.link_path("vm-a")))
    before = snapshot(store)
    with pytest.raises(KernelError) as ei:
        store.restore("vm-a", "vm-c")
    e = ei.value
    assert e.errno == 1 and e.op == "set stable link" and e.obj == store.link_path("vm-a")
    assert "immutable" in e.hint
    assert snapshot(store) == before  # no vm-c row, data dir, link, intent, loop, dm, mount
    assert store.registry.find_volume("vm-c") is None
    assert_link_live(store, "vm-a", b.device)  # never pointed at C's (removed) file or device

    # the CLI says the same, with the kernel error's exit code
    p = cowdisk_cli(store.root, "volume", "restore", "vm-a", "--as", "vm-c")
    assert p.returncode == 4, (p.returncode, p.stderr)
    assert "set stable link" in p.stderr and "EPERM" in p.stderr and "immutable" in p.stderr
    assert snapshot(store) == before

    fs.set_immutable(os.path.dirname(store.link_path("vm-a")), False)
    c = store.restore("vm-a", "vm-c")  # nothing left in the way
    assert_link_live(store, "vm-a", c.device)
    assert_link_live(store, "vm-b", b.device)


def test_restore_with_the_links_root_immutable(tree, store, immutable):
    tpl = store.build_template(tree, "t")
    store.create_volume("vm-a", tpl.id)
    store.checkpoint("vm-a")
    assert not os.path.lexists(store.link_path("vm-a"))  # a checkpointed volume has no link

    immutable(os.path.join(store.root, "links"))
    before = snapshot(store)
    for args in (("vm-a", "vm-b"), ("vm-a",)):  # as a new volume, and in place
        with pytest.raises(KernelError) as ei:
            store.restore(*args)
        assert ei.value.errno == 1 and "set stable link" in str(ei.value)
        assert snapshot(store) == before, args
        assert store.volume("vm-a").state == "checkpointed"
    fs.set_immutable(os.path.join(store.root, "links"), False)
    b = store.restore("vm-a", "vm-b")
    assert_link_live(store, "vm-a", b.device)


def test_restore_when_the_checkpoint_data_vanished(tree, store):
    tpl = store.build_template(tree, "t")
    store.create_volume("vm-a", tpl.id)
    store.checkpoint("vm-a")
    files = [n for k, n, _ in store.registry.objects("vm-a") if k == "file"]
    assert files and all(os.path.exists(f) for f in files)
    for f in files:
        os.unlink(f)  # behind the store's back

    before = snapshot(store)
    for args in (("vm-a", "vm-b"), ("vm-a",)):
        with pytest.raises(NotFound, match=r"restore volume vm-a: its checkpointed data is gone"):
            store.restore(*args)
        assert snapshot(store) == before, args
        assert not os.path.lexists(store.link_path("vm-a"))
    p = cowdisk_cli(store.root, "volume", "restore", "vm-a", "--as", "vm-b")
    assert p.returncode == 3, (p.returncode, p.stderr)
    assert "checkpointed data is gone" in p.stderr and files[0] in p.stderr
    assert snapshot(store) == before

    store.remove_volume("vm-a")  # what the hint says; it works with the data gone
    assert store.volumes() == []
    assert os.listdir(os.path.join(store.data_root, "volumes")) == []
    assert os.listdir(os.path.join(store.root, "links")) == []


# -- a VMM still holding the volume ---------------------------------------------------


@pytest.fixture(scope="module")
def guest():
    from vmm import guest as guestlib

    for tool in ("qemu-system-x86_64", "mkfs.ext4", "debugfs"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} missing")
    return guestlib.build()


@pytest.fixture
def auto_store(tmp_path):
    """The backend this host picks (COWDISK_TEST_BACKEND overrides), as the e2e test does."""
    with managed_store(str(tmp_path / "store"), os.environ.get("COWDISK_TEST_BACKEND", "auto")) as s:
        yield s


def test_remove_refused_while_a_vmm_holds_the_volume(guest, auto_store, tmp_path, record_property):
    from vmm import guest as guestlib
    from vmm.qemu import Vm

    s = auto_store
    tpl = s.build_template(guest.rootfs_dir, "vmm-guest")
    v = s.create_volume("held", tpl.id)
    with Vm(guest, s.link_path("held"), tmp_path, name="held") as vm:
        bootid = vm.wait_ready(timeout=120)
        pid = vm.proc.pid
        for op in (lambda: s.remove_volume("held", deadline_s=1),
                   lambda: s.checkpoint("held", deadline_s=1)):
            t = time.monotonic()
            with pytest.raises(InUse) as ei:
                op()
            waited = time.monotonic() - t
            assert f"PID {pid}" in str(ei.value) and "stop the VM" in str(ei.value)
            assert 1.0 <= waited < 5.0, waited  # it waited out the deadline, then gave up
            assert s.volume("held").state == "attached"
            assert_link_live(s, "held", v.device)
            assert vm.command("ping") == "pong"  # the VM never noticed
        p = cowdisk_cli(s.root, "volume", "rm", "held")
        assert p.returncode == 6, (p.returncode, p.stderr)  # InUse
        assert f"PID {pid}" in p.stderr
        assert_link_live(s, "held", v.device)
        vm.command("write", "late", "written-after-the-refusal")
        assert vm.poweroff() == 0
    record_property("held_backend", s.backend_name)

    # the refused remove lost nothing: the VM's last write is in the volume
    assert guestlib.read_file(v.device, "/data/late") == b"written-after-the-refusal\n"
    assert guestlib.read_file(v.device, "/data/a") == f"{bootid}\n".encode()
    s.remove_volume("held", deadline_s=1)
    assert not os.path.lexists(s.link_path("held"))
    assert not os.path.exists(v.data_path)
