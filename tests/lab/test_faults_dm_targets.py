"""A store's own disk going slow or bad, in the lab: the store's filesystem sits on a
dm-delay or dm-flakey device (the kernel's fault targets) over a loop.

* dm-delay: every operation is slow, never wrong: create, write, checkpoint, restore as a
  new id, remove all complete, the data reads back, nothing leaks.
* dm-flakey failing every write: operations that must write fail with a typed error
  (never a hang or an internal error) and change nothing; once the disk is whole again
  (the filesystem checked and mounted again, as after a reboot), recovery leaves a
  consistent store whose checkpointed volume restores with its data.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from typing import Iterator

import pytest

from cowdisk.errors import CowdiskError
from cowdisk.kernel import dm, loop
from cowdisk.store import Store
from testutil import MiB, assert_same_host, host_state, make_tree, read_at, write_at

pytestmark = pytest.mark.lab

DATA = b"written-before-the-disk-went-bad".ljust(4096, b"+")


class FaultyDisk:
    """An ext4 filesystem on a dm device over a loop; its table can be swapped live."""

    def __init__(self, base: str) -> None:
        self.name = f"cdfault-{secrets.token_hex(4)}"
        self.img = os.path.join(base, "disk.img")
        self.mnt = os.path.join(base, "mnt")
        os.makedirs(self.mnt)
        with open(self.img, "wb") as f:
            f.truncate(512 * MiB)
        self.sectors = (512 * MiB) // 512
        lp = loop.attach(self.img, autoclear=True, label=f"{self.name}:disk")
        try:
            self.under = lp.devno
            self.dev = dm.control().device_node(dm.control().create_device(self.name, [self.linear()]))
        finally:
            lp.close()  # the dm table holds the loop now
        subprocess.run(["mkfs.ext4", "-q", "-F", self.dev], check=True, capture_output=True)
        self.mount()

    def linear(self) -> dm.Target:
        return dm.Target(0, self.sectors, "linear", f"{self.under} 0")

    def swap(self, target: dm.Target) -> None:
        ctl = dm.control()
        ctl.load_table(self.name, [target])
        # no flush, no filesystem freeze: a disk failing its writes cannot be flushed
        ctl.suspend(self.name, noflush=True, skip_lockfs=True)
        ctl.resume(self.name)

    def mount(self) -> None:
        subprocess.run(["mount", "-o", "errors=continue", self.dev, self.mnt], check=True, capture_output=True)

    def umount(self) -> None:
        subprocess.run(["umount", self.mnt], check=True, capture_output=True)

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.umount()
        dm.control().remove(self.name, deadline_s=10.0, missing_ok=True)


@pytest.fixture
def disk(tmp_path) -> Iterator[FaultyDisk]:
    before = host_state()
    d = FaultyDisk(str(tmp_path))
    try:
        yield d
    finally:
        d.remove()
    assert_same_host(before)


def test_a_slow_disk_makes_operations_slow_never_wrong(disk: FaultyDisk, tmp_path) -> None:
    root = os.path.join(disk.mnt, "store")
    s = Store(root, backend="dm-snapshot")
    try:
        s.build_template(make_tree(str(tmp_path / "tree")), "base")
        disk.swap(dm.Target(0, disk.sectors, "delay", f"{disk.under} 0 40"))  # 40 ms per I/O
        a = s.create_volume("a", "base")
        write_at(a.link, 2 * MiB, DATA)
        s.checkpoint("a")
        b = s.restore("a", "b")
        assert read_at(b.link, 2 * MiB, 4096) == DATA
        s.remove_volume("b")
        s.remove_volume("a")
        assert s.recover().actions == 0
    finally:
        disk.swap(disk.linear())
        s.destroy()
        s.close()


def test_a_disk_failing_its_writes_loses_nothing(disk: FaultyDisk, tmp_path) -> None:
    root = os.path.join(disk.mnt, "store")
    s = Store(root, backend="dm-snapshot")
    s.build_template(make_tree(str(tmp_path / "tree")), "base")
    a = s.create_volume("a", "base")
    write_at(a.link, 2 * MiB, DATA)
    s.checkpoint("a")  # nothing holds the filesystem open but the registry
    os.sync()
    disk.swap(dm.Target(0, disk.sectors, "flakey", f"{disk.under} 0 0 3600 1 error_writes"))
    try:
        for what, op in (("create", lambda: s.create_volume("c", "base")), ("restore", lambda: s.restore("a")),
                         ("remove", lambda: s.remove_volume("a"))):
            try:
                op()
            except CowdiskError:  # typed, and it returned: no hang, no internal error
                continue
            pytest.fail(f"{what} claimed success on a disk that fails every write")
    finally:
        s.close()
        disk.swap(disk.linear())
    # the disk is whole again: what a reboot does (fsck, mount), then the store
    disk.umount()
    r = subprocess.run(["e2fsck", "-fy", disk.dev], capture_output=True, text=True)
    assert r.returncode in (0, 1), r.stdout + r.stderr
    disk.mount()
    with Store(root) as s2:
        vols = {v.id: v.state for v in s2.volumes()}
        assert set(vols) <= {"a", "c"} and vols.get("a") in ("checkpointed", "attached", "removing", "error"), vols
        if "c" in vols:
            s2.remove_volume("c")
        if vols["a"] != "checkpointed":  # a remove the disk cut short: finish it, the data is gone by intent
            s2.remove_volume("a")
        else:
            assert read_at(s2.restore("a").link, 2 * MiB, 4096) == DATA
            s2.remove_volume("a")
        assert s2.recover().actions == 0
        s2.destroy()
