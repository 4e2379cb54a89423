"""Issue 13, item 5: a QEMU sandbox moves between two hosts through the Ceph cluster.

    stores A and B (two roots standing for two hosts) share one pool and namespace
    template <- A.build_template(guest rootfs); volume vm1 on A
    QEMU boots from vm1 through A's drive; the guest writes /data/a = its boot id
    QEMU checkpoint (stop + migrate to a state file, quit); A checkpoints vm1
    B restores vm1 as vm1-b (adopting vm1 from the cluster: B never had the template file)
    QEMU -incoming on B's drive; cont: same memory (same boot id), writes /data/b, /data/b1
    witness (the rbd tool exports the images): vm1-b holds the guest's writes; vm1's
    checkpoint holds only what A wrote; the template's snapshot is the template, byte for byte

Parametrized by what the VMM is given, always through the store's stable link: ``none``
(the link's target text is QEMU's ``rbd:`` filename: QEMU's own rbd driver opens the
image) and ``fuse`` (a qemu-storage-daemon exports the image as a file the link points at).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from testutil import ceph_options, rbd_images, sha, two_rbd_hosts
from vmm import guest as guestlib
from vmm.qemu import Vm, VmError

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def guest():
    for tool in ("qemu-system-x86_64", "mkfs.ext4", "debugfs"):
        assert shutil.which(tool), f"{tool} missing: run install.sh"
    return guestlib.build()


def export(opts: dict[str, str], image: str, out: Path) -> Path:
    """The image (or ``image@snap``) as a local file, through the rbd tool (the witness)."""
    subprocess.run(["rbd", "-c", opts["conf"], "export", "-p", opts["pool"], "--namespace", opts["namespace"],
                    image, str(out), "--no-progress"], check=True, capture_output=True, timeout=300)
    return out


@pytest.mark.parametrize("map_", ["none", "fuse"])
def test_vm_checkpointed_on_a_resumes_on_b(guest, tmp_path, map_, record_property) -> None:
    t0 = time.monotonic()
    opts = ceph_options(map=map_)
    result: dict[str, object] = {"map": map_}
    with two_rbd_hosts(str(tmp_path), opts) as (a, b):
        tpl = a.build_template(guest.rootfs_dir, "vmm-guest")
        va = a.create_volume("vm1", tpl.id)
        # the VMM is given the stable link; with map=none its target text is QEMU's rbd: string
        # (it does not resolve), which cowdisk.drive turns into QEMU's rbd driver
        drive_a = va.link
        assert os.readlink(drive_a).startswith("rbd:") if map_ == "none" else os.path.isfile(drive_a)
        state = tmp_path / "vm1.state"
        with Vm(guest, drive_a, tmp_path, name="A", cache="none") as vm:
            bootid = vm.wait_ready(timeout=120)
            assert vm.command("cat", "a") == bootid
            vm.checkpoint(state)
        result.update(boot_s=round(vm.times["boot"], 2), vm_checkpoint_s=round(vm.times["checkpoint"], 3))
        a.checkpoint("vm1", deadline_s=30)

        t = time.monotonic()
        vb = b.restore("vm1", "vm1-b", adopt=True)  # B adopts A's checkpoint and restores it as a new volume
        result["store_b_restore_s"] = round(time.monotonic() - t, 3)
        assert b.template(tpl.id).path == "", "B was given the template's file"
        drive_b = b.link_path("vm1")  # vm1's link on B, retargeted to vm1-b (the path a VM snapshot records)
        assert os.readlink(drive_b) == vb.device and drive_b != drive_a
        with Vm(guest, drive_b, tmp_path, name="B", incoming=state, cache="none") as vm2:
            vm2.wait_incoming(timeout=120)
            vm2.cont()
            assert vm2.command("bootid") == bootid  # the same memory as on A at the checkpoint
            assert vm2.command("write2") == f"{bootid} {bootid}"
            vm2.command("write", "b1", "written-on-B")
            with pytest.raises(VmError, match="no such file"):
                vm2.command("cat", "c1")
            assert vm2.poweroff() == 0
        result["vm_restore_s"] = round(vm2.times["restore"], 3)
        b.checkpoint("vm1-b", deadline_s=30)

        # the witness: images exported by the rbd tool, read with debugfs
        img_b = export(opts, "cowdisk-v-vm1-b", tmp_path / "vm1-b.img")
        assert guestlib.read_file(img_b, "/data/a") == f"{bootid}\n".encode()
        assert guestlib.read_file(img_b, "/data/b") == f"{bootid} {bootid}\n".encode()
        assert guestlib.read_file(img_b, "/data/b1") == b"written-on-B\n"
        img_1 = export(opts, "cowdisk-v-vm1", tmp_path / "vm1.img")
        assert guestlib.read_file(img_1, "/data/a") == f"{bootid}\n".encode()
        assert guestlib.read_file(img_1, "/data/b1") is None and guestlib.read_file(img_1, "/data/b") is None
        tsnap = export(opts, f"cowdisk-t-{tpl.id}@cowdisk-{tpl.id}", tmp_path / "template.img")
        assert sha(str(tsnap)) == tpl.digest, "the template's snapshot in the cluster changed"
        assert a.verify_template(tpl.id).digest == tpl.digest

        # A forgets the volume it gave away; B removes what it has
        a.remove_volume("vm1")
        assert "cowdisk-v-vm1" in rbd_images(opts)
        for v in ("vm1-b", "vm1"):
            b.remove_volume(v)
    result["test_s"] = round(time.monotonic() - t0, 1)
    for k, v in result.items():
        record_property(k, v)
    print("VMM-RBD-RESULT " + json.dumps(result))
