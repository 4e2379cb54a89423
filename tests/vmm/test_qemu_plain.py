"""End to end with a real VMM (QEMU, TCG) on a plain raw image behind a symlink.

No cowdisk store yet: this proves the harness (guest, runner, checkpoint/restore
through a retargeted drive link) that the cowdisk end-to-end test builds on.

    boot from LINK -> A.img; the guest writes /data/a = its boot id, syncs
    checkpoint: QMP stop + migrate to a state file, quit
    copy A.img to B.img, retarget LINK -> B.img
    restore: same -drive file=LINK, -incoming the state file, wait, cont
    the guest (same memory, same boot id) writes /data/b, powers off
    host (debugfs, no mount): B has a and b; A has a and no b
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from testutil import sha
from vmm import guest as guestlib
from vmm.qemu import Vm, VmError

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (guest cache, later cowdisk volumes)"),
]


@pytest.fixture(scope="module")
def guest():
    for tool in ("qemu-system-x86_64", "mkfs.ext4", "debugfs", "apt-get", "dpkg-deb", "modprobe"):
        assert shutil.which(tool), f"{tool} missing: run install.sh"
    return guestlib.build()


@pytest.fixture
def work():
    d = Path(tempfile.mkdtemp(prefix="cowdisk-vmm-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _retarget(link: Path, target: Path) -> None:
    tmp = link.with_name(link.name + ".new")
    os.symlink(target, tmp)
    os.replace(tmp, link)  # atomic: the link never dangles


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie is gone for our purposes only if it is not ours; Popen.wait reaped ours
    return False


@pytest.mark.parametrize("transport", ["fd", "exec"])
def test_boot_checkpoint_restore_on_retargeted_link(guest, work, transport, record_property):
    a_img = guestlib.make_ext4_image(guest.rootfs_dir, work / "A.img")
    link = work / "links" / "rootfs"
    link.parent.mkdir()
    os.symlink(a_img, link)
    state = work / "vm.state"
    pids = []

    with Vm(guest, link, work, name="A", transport=transport) as vm:
        pids.append(vm.proc.pid)
        bootid = vm.wait_ready(timeout=90)
        assert len(bootid) == 36
        assert vm.command("cat", "a") == bootid
        info = vm.checkpoint(state)
        assert info["status"] == "completed"
        assert not vm.alive()
    t_ckpt = vm.times["checkpoint"]
    t_boot = vm.times["boot"]
    state_bytes = state.stat().st_size
    assert state_bytes > 1 << 20

    # The checkpointed disk, as of checkpoint time.
    assert guestlib.read_file(a_img, "/data/a") == f"{bootid}\n".encode()
    b_img = work / "B.img"
    shutil.copyfile(a_img, b_img)
    _retarget(link, b_img)
    a_digest = sha(str(a_img))

    with Vm(guest, link, work, name="B", transport=transport, incoming=state) as vm:
        pids.append(vm.proc.pid)
        vm.wait_incoming(timeout=60)
        assert vm.status() == "paused"  # paused before migrating: stays paused until cont
        vm.cont()
        assert vm.status() == "running"
        # Same memory: the guest still remembers the first boot's id.
        assert vm.command("bootid", timeout=30) == bootid
        assert vm.command("write2", timeout=30) == f"{bootid} {bootid}"
        assert vm.poweroff(timeout=60) == 0
    t_restore = vm.times["restore"]

    assert guestlib.read_file(b_img, "/data/a") == f"{bootid}\n".encode()
    assert guestlib.read_file(b_img, "/data/b") == f"{bootid} {bootid}\n".encode()
    # A is untouched by B's run.
    assert guestlib.read_file(a_img, "/data/b") is None
    assert sha(str(a_img)) == a_digest
    assert all(_gone(p) for p in pids)

    result = {"transport": transport, "boot_s": round(t_boot, 2),
              "checkpoint_s": round(t_ckpt, 3), "restore_s": round(t_restore, 3),
              "state_bytes": state_bytes}
    for k, v in result.items():
        record_property(k, v)
    print("VMM-RESULT " + json.dumps(result))


def test_vm_is_killed_when_the_block_fails(guest, work):
    img = guestlib.make_ext4_image(guest.rootfs_dir, work / "x.img")
    with pytest.raises(RuntimeError, match="boom"):
        with Vm(guest, img, work, name="X") as vm:
            pid = vm.proc.pid
            assert vm.alive()
            raise RuntimeError("boom")
    assert vm.proc.returncode is not None
    assert _gone(pid)


def test_wait_timeout_names_the_pattern_and_kills(guest, work):
    img = guestlib.make_ext4_image(guest.rootfs_dir, work / "y.img")
    t = time.monotonic()
    with pytest.raises(VmError, match="NEVER-PRINTED"):
        with Vm(guest, img, work, name="Y") as vm:
            vm.wait_line("NEVER-PRINTED", timeout=1)
    assert time.monotonic() - t < 15
    assert vm.proc.returncode is not None
