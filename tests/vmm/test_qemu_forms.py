"""Issue 14 against the real QEMU: every drive form cowdisk.drive prints is what QEMU takes,
and a template built from a container image boots on q35 (``-blockdev`` + virtio-blk-pci) and on
microvm (``-drive if=none`` and ``-blockdev``, each + virtio-blk-device on virtio-mmio).

The form check starts QEMU stopped (``-S``) and asks it over QMP what it made of the drive
(``query-block``: read-only, cache flags, throttling), on a file and on a block device;
the boots run the test guest (tests/vmm/guest.py) from cowdisk volumes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from cowdisk import drive
from cowdisk.drive import DriveOptions
from cowdisk.kernel import loop
from cowdisk.store import Store
from vmm import guest as guestlib
from vmm.images import copy_tree, debugfs, make_image, oci_archive
from vmm.qemu import QEMU, Vm

pytestmark = [pytest.mark.root]

# what query-block reports for each cache mode: (writeback, direct, no-flush)
CACHE_FLAGS = {"none": (True, True, False), "writeback": (True, False, False), "writethrough": (False, False, False),
               "directsync": (False, True, False), "unsafe": (True, False, True)}


def _qmp_query(argv: list[str], machine: str) -> tuple[int, str, list[dict]]:
    full = [QEMU, "-M", f"{machine},accel=tcg", "-nodefaults", "-display", "none", "-S", "-qmp", "stdio", *argv]
    cmds = ['{"execute": "qmp_capabilities"}', '{"execute": "query-block"}',
            '{"execute": "qom-get", "arguments": {"path": "/objects/rootfs-throttle", "property": "limits"}}',
            '{"execute": "quit"}']
    p = subprocess.run(full, input="\n".join(cmds) + "\n", capture_output=True, text=True, timeout=120)
    replies = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
    return p.returncode, p.stderr, [r for r in replies if "return" in r or "error" in r]


@pytest.fixture
def block_and_file(tmp_path):
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    lp = loop.attach(str(img), autoclear=True, label="cowdisk-test-forms")  # gone at its last close
    try:
        yield {"file": str(img), "block": lp.path}
    finally:
        number = lp.number
        lp.close()
        loop.detach(number, missing_ok=True)


@pytest.mark.parametrize("machine", ["q35", "microvm"])
@pytest.mark.parametrize("form", ["qemu", "qemu-blockdev"])
def test_qemu_takes_every_form(block_and_file, machine: str, form: str) -> None:
    for kind, path in block_and_file.items():
        for cache, (wb, direct, noflush) in CACHE_FLAGS.items():
            for ro, aio, limits in ((False, None, {}), (True, "threads", {"iops": 300, "bandwidth": 1 << 20})):
                o = DriveOptions(read_only=ro, cache=cache, io_engine=aio, machine=machine, **limits)
                argv = drive.config(form, path, o, block_device=kind == "block")
                rc, err, replies = _qmp_query(argv, machine)
                assert rc == 0, (argv, err)
                blocks = replies[1]["return"]
                assert len(blocks) == 1, blocks
                ins = blocks[0]["inserted"]
                assert ins["ro"] is ro and path in ins["file"], (argv, ins)  # behind a throttle node: json:{...}
                assert (ins["cache"]["writeback"], ins["cache"]["direct"], ins["cache"]["no-flush"]) == \
                    (wb, direct, noflush), (argv, ins["cache"])
                want_dev = "virtio-blk-device" if machine == "microvm" else "virtio-blk-pci"
                assert argv[argv.index("-device") + 1 if "-device" in argv else 0].startswith(want_dev) \
                    or (form == "qemu" and machine != "microvm")
                if limits and form == "qemu":  # -drive throttling shows on the drive
                    assert (ins["iops"], ins["bps"]) == (300, 1 << 20), ins
                if limits and form == "qemu-blockdev":  # a throttle node over its group
                    lim = replies[2]["return"]
                    assert (lim["iops-total"], lim["bps-total"]) == (300, 1 << 20), lim
    # QEMU refuses what cowdisk.drive refuses, for the same reason
    rc, err, _ = _qmp_query(["-drive", f"file={block_and_file['file']},format=raw,if=virtio,cache=writeback,"
                                       "aio=native"], "q35")
    assert rc != 0 and "aio=native" in err
    with pytest.raises(ValueError, match="O_DIRECT"):
        drive.config(form, block_and_file["file"], DriveOptions(cache="writeback", io_engine="native"),
                     block_device=False)
    rc, err, _ = _qmp_query(drive.qemu(block_and_file["file"], machine="q35"), "microvm")
    assert rc != 0 and "No 'PCI' bus found" in err  # why microvm gets its own form


@pytest.fixture(scope="module")
def guest():
    for tool in ("qemu-system-x86_64", "mkfs.ext4", "debugfs", "umoci", "skopeo"):
        assert shutil.which(tool), f"{tool} missing: run install.sh"
    return guestlib.build()


def test_image_template_boots_on_q35_and_microvm(guest, record_property) -> None:
    work = Path(tempfile.mkdtemp(prefix="cowdisk-vmm-"))
    s = Store(str(work / "store"), backend=os.environ.get("COWDISK_TEST_BACKEND", "auto"))
    try:
        # the guest's rootfs as a two-layer OCI image, shipped as an OCI archive
        layout = str(work / "layout")

        def second(rootfs: str) -> None:
            with open(os.path.join(rootfs, "etc", "from-layer-2"), "w") as f:
                f.write("layer 2\n")

        make_image(layout, "guest", [copy_tree(guest.rootfs_dir), second])
        archive = oci_archive(layout, str(work / "guest.oci.tar"))
        tpl = s.build_template_from_image(archive, "guest")
        assert debugfs(tpl.path, "cat /etc/from-layer-2") == "layer 2\n"
        times = {}
        # microvm (no PCI, no HPET, no ACPI PM timer) through virtio-blk-device on virtio-mmio,
        # with both forms; its kernel gets tsc_early_khz from the Vm runner (vmm.qemu.microvm_cmdline)
        for vid, machine, form in (("q35-bd", "q35", "qemu-blockdev"), ("mvm-drive", "microvm", "qemu"),
                                   ("mvm-bd", "microvm", "qemu-blockdev")):
            v = s.create_volume(vid, "guest")
            with Vm(guest, v.link, work, name=vid, machine=machine, drive_form=form) as vm:
                argv = vm.argv()
                assert argv[argv.index("-machine") + 1].startswith(f"{machine},")
                want_dev = "virtio-blk-device" if machine == "microvm" else "virtio-blk-pci"
                assert argv[argv.index("-device") + 1].startswith(f"{want_dev},drive=rootfs"), argv
                bootid = vm.wait_ready(timeout=120)
                vm.command("write", "who", f"{machine}-{form}")
                assert vm.poweroff() == 0
            times[vid] = round(vm.times["boot"], 1)
            assert guestlib.read_file(s.volume(vid).device, "/data/who") == f"{machine}-{form}\n".encode()
            assert guestlib.read_file(s.volume(vid).device, "/data/a") == f"{bootid}\n".encode()
            s.remove_volume(vid)
        for k, t in times.items():
            record_property(f"boot_s_{k}", t)
        print("VMM-FORMS " + json.dumps(times))
        assert s.verify_template("guest").id == tpl.id  # the template never changed
    finally:
        try:
            s.destroy()
        finally:
            s.close()
            shutil.rmtree(work, ignore_errors=True)
