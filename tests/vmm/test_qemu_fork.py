"""Fork a running sandbox into three (issue 24, docs/vmm.md "Fork a running VM into N").

    template <- the test guest's rootfs; volume src, QEMU on its stable link, boot
    the guest writes /data/f WITHOUT sync (it may live in the guest's page cache only)
    QMP stop + migrate to one state file (the VM stays paused, its QEMU holds the disk)
    cowdisk fork src --count 3: three children from one instant, the source held once
    three QEMUs -incoming from that one state, each on its own child's stable link; cont
        each sees /data/f, writes its own marker (synced); none sees another's marker
    host, without QEMU: each child's disk holds /data/f and only its own marker; the
    template is unchanged; everything removed leaves nothing.

Runs on the backend this host's store picks; ``COWDISK_TEST_BACKEND`` forces one, and
tests/lab/test_vmm_dm.py runs it on dm-thin in the kernel lab (opt-in, nested).
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import pytest

from vmm import guest as guestlib
from vmm.qemu import Vm, VmError
from vmm.test_qemu_cowdisk import _dms_with, _loops_under, _mounts_under, guest, work  # noqa: F401

from cowdisk.store import Store

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices, volumes)"),
]

KIDS = 3


@pytest.fixture
def store(work):  # noqa: F811 - test_qemu_cowdisk's work fixture, imported above
    s = Store(str(work / "store"), backend=os.environ.get("COWDISK_TEST_BACKEND", "auto"))
    try:
        yield s
    finally:
        try:
            s.destroy()
        finally:
            s.close()


def test_one_paused_vm_forked_into_three(guest, work, store, record_property):  # noqa: F811
    tpl = store.build_template(guest.rootfs_dir, "vmm-guest")
    digest0 = tpl.digest
    src = store.create_volume("src", tpl.id)
    state = work / "src.state"
    result: dict = {"backend": store.backend_name}

    with Vm(guest, src.link, work, name="S") as vs:
        bootid = vs.wait_ready(timeout=90)
        assert vs.command("put", "f", f"unsynced-{bootid}") == "put f"  # no sync
        vs.checkpoint(state, quit=False)  # paused; the one memory state
        assert vs.status() == "postmigrate"
        # the file is in the guest's memory, not yet on the disk the children are taken from
        on_disk = guestlib.read_file(src.device, "/data/f")
        t = time.monotonic()
        kids = store.fork("src", count=KIDS, prefix="kid")  # while the paused QEMU holds the disk
        result["fork_s"] = round(time.monotonic() - t, 4)
        assert vs.quit() == 0
    result["file_on_disk_at_fork"] = on_disk is not None
    assert [k.id for k in kids] == [f"kid{i}" for i in range(1, KIDS + 1)]
    assert len({os.path.realpath(k.device) for k in kids} | {os.path.realpath(src.device)}) == KIDS + 1

    with contextlib.ExitStack() as vms:
        kvms = [vms.enter_context(Vm(guest, k.link, work, name=k.id, incoming=state)) for k in kids]
        for vm in kvms:
            vm.wait_incoming(timeout=120)
            vm.cont()
        for k, vm in zip(kids, kvms):
            assert vm.command("bootid") == bootid  # the one saved memory
            assert vm.command("cat", "f") == f"unsynced-{bootid}"
            vm.command("write", f"m-{k.id}", f"written-by-{k.id}")
        for k, vm in zip(kids, kvms):
            for other in kids:
                if other.id != k.id:
                    with pytest.raises(VmError, match="no such file"):
                        vm.command("cat", f"m-{other.id}")
            assert vm.command("cat", f"m-{k.id}") == f"written-by-{k.id}"
        for vm in kvms:
            assert vm.poweroff() == 0

    for k in kids:  # host, without QEMU: each child's own disk
        dev = store.volume(k.id).device
        assert guestlib.read_file(dev, "/data/f") == f"unsynced-{bootid}\n".encode()
        assert guestlib.read_file(dev, f"/data/m-{k.id}") == f"written-by-{k.id}\n".encode()
        for other in kids:
            if other.id != k.id:
                assert guestlib.read_file(dev, f"/data/m-{other.id}") is None
    assert store.verify_template(tpl.id).digest == digest0

    for k in kids:
        store.remove_volume(k.id)
    store.remove_volume("src")
    store.remove_template(tpl.id)
    root, prefix = store.root, store.dm_prefix
    store.destroy()
    assert _loops_under(root) == [] and _dms_with(prefix) == [] and _mounts_under(root) == []
    for k, v in result.items():
        record_property(k, v)
    print("VMM-FORK-RESULT " + json.dumps(result))
