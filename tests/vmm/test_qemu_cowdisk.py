"""Issue 7 end to end: a QEMU sandbox boots, checkpoints and restores on cowdisk volumes.

    template <- cowdisk build_template(guest rootfs dir)
    volume A, QEMU -drive file=<A's stable link>, boot; the guest writes /data/a = its boot id
    QEMU checkpoint (stop + migrate to a state file, quit); cowdisk checkpoint A
    restore A as B (A's link now points at B's device); QEMU -incoming on the same link; cont
        B: same memory (same boot id), writes /data/b and /data/b1
    while B runs, restore A again as C (link -> C); a second QEMU from the same state; cont
        C: writes /data/c1; neither sees the other's writes
    host, without QEMU: B and C hold the right files, A's checkpointed data and the
    template are unchanged; after removing everything nothing is left.

Runs on the backend this host's store picks (dm-snapshot, reflink, pool or copy);
``COWDISK_TEST_BACKEND`` forces one (e.g. ``dm-snapshot`` in the kernel lab).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from vmm import guest as guestlib
from vmm.qemu import Vm, VmError

store_mod = pytest.importorskip("cowdisk.store")  # skips until the Store lands

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices, volumes)"),
]


@pytest.fixture(scope="module")
def guest():
    for tool in ("qemu-system-x86_64", "mkfs.ext4", "debugfs"):
        assert shutil.which(tool), f"{tool} missing: run install.sh"
    return guestlib.build()


def _loops_under(root: str) -> list[str]:
    out = []
    for bf in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if bf.read_text().strip().startswith(root + "/"):
                out.append(bf.parent.parent.name)
        except OSError:
            pass
    return out


def _dms_with(prefix: str) -> list[str]:
    out = []
    for n in Path("/sys/block").glob("dm-*/dm/name"):
        try:
            if n.read_text().strip().startswith(prefix):
                out.append(n.read_text().strip())
        except OSError:
            pass
    return out


def _mounts_under(root: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [ln.split()[4] for ln in f if ln.split()[4].startswith(root + "/") or ln.split()[4] == root]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def _hash_tree(d: str) -> dict[str, str]:
    out = {}
    for p in sorted(Path(d).rglob("*")):
        if p.is_file() and not p.is_symlink():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[str(p.relative_to(d))] = h.hexdigest()
    return out


@pytest.fixture
def work():
    d = Path(tempfile.mkdtemp(prefix="cowdisk-vmm-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def store(work):
    # COWDISK_TEST_BACKEND forces a backend (e.g. dm-snapshot in the kernel lab); default: auto
    s = store_mod.Store(str(work / "store"), backend=os.environ.get("COWDISK_TEST_BACKEND", "auto"))
    try:
        yield s
    finally:
        try:
            s.destroy()
        finally:
            s.close()


def test_two_sandboxes_restored_from_one_checkpoint(guest, work, store, record_property):
    root = store.root
    tpl = store.build_template(guest.rootfs_dir, "vmm-guest")
    digest0 = tpl.digest
    store.create_volume("vm-a", tpl.id)
    link = store.link_path("vm-a")
    state = work / "vm-a.state"
    result: dict = {"backend": store.backend_name}

    with Vm(guest, link, work, name="A") as vm:
        bootid = vm.wait_ready(timeout=90)
        assert vm.command("cat", "a") == bootid
        vm.checkpoint(state)
    result.update(boot_s=round(vm.times["boot"], 2), vm_checkpoint_s=round(vm.times["checkpoint"], 3),
                  state_bytes=state.stat().st_size)

    t = time.monotonic()
    a = store.checkpoint("vm-a")
    result["store_checkpoint_s"] = round(time.monotonic() - t, 4)
    assert a.state == "checkpointed"
    a_data = _hash_tree(a.data_path)
    assert a_data, f"no data files under {a.data_path}"

    t = time.monotonic()
    b = store.restore("vm-a", "vm-b")
    result["store_restore_s"] = round(time.monotonic() - t, 4)  # copy/reflink + attach + links
    assert os.path.realpath(link) == os.path.realpath(b.device)
    with Vm(guest, link, work, name="B", incoming=state) as vb:
        vb.wait_incoming(timeout=60)
        vb.cont()
        assert vb.command("bootid") == bootid  # same memory as A at checkpoint
        assert vb.command("write2") == f"{bootid} {bootid}"
        vb.command("write", "b1", "written-by-B")

        # A second sandbox from the same VM state and the same volume checkpoint, while B runs.
        c = store.restore("vm-a", "vm-c")
        assert os.path.realpath(link) == os.path.realpath(c.device)
        assert os.path.realpath(c.device) != os.path.realpath(b.device)
        with Vm(guest, link, work, name="C", incoming=state) as vc:
            vc.wait_incoming(timeout=60)
            vc.cont()
            assert vc.command("bootid") == bootid
            vc.command("write", "c1", "written-by-C")
            with pytest.raises(VmError, match="no such file"):
                vc.command("cat", "b1")
            with pytest.raises(VmError, match="no such file"):
                vb.command("cat", "c1")
            assert vb.command("cat", "b1") == "written-by-B"
            assert vc.poweroff() == 0
        assert vb.poweroff() == 0
    result.update(restore_s=round(vb.times["restore"], 3), restore2_s=round(vc.times["restore"], 3))

    def cat(vol, name):
        return guestlib.read_file(store.volume(vol).device, f"/data/{name}")

    assert cat("vm-b", "a") == f"{bootid}\n".encode()
    assert cat("vm-b", "b") == f"{bootid} {bootid}\n".encode()
    assert cat("vm-b", "b1") == b"written-by-B\n"
    assert cat("vm-b", "c1") is None
    assert cat("vm-c", "a") == f"{bootid}\n".encode()
    assert cat("vm-c", "c1") == b"written-by-C\n"
    assert cat("vm-c", "b1") is None and cat("vm-c", "b") is None
    # A's checkpoint is what it was; the template too.
    assert _hash_tree(store.volume("vm-a").data_path) == a_data
    assert store.verify_template(tpl.id).digest == digest0
    for v in ("vm-a", "vm-b", "vm-c"):
        u = store.usage(v)
        result[f"disk_bytes_{v}"] = u.disk_bytes
        result[f"own_bytes_{v}"] = u.own_bytes  # exclusive: what this sandbox alone costs
    result["template_disk_bytes"] = store.template_usage(tpl.id)

    for v in ("vm-b", "vm-c", "vm-a"):
        store.remove_volume(v)
    store.remove_template(tpl.id)
    store.destroy()
    assert _loops_under(root) == []
    assert _dms_with(store.dm_prefix) == []
    assert _mounts_under(root) == []
    assert not os.path.lexists(link)
    for k, v in result.items():
        record_property(k, v)
    print("VMM-RESULT " + json.dumps(result))
    # What may stay is the store itself: its registry, store.json, its space reserve, lock
    # files, its template build cache and (pool backend) the unmounted pool image; no
    # volume, template or link file.
    leftover = [f for f in _files(Path(root))
                if not f.startswith(("registry.db", "locks/", "cache/")) and f not in ("pool/pool.img",
                                                                                    "store.json", "reserve")]
    assert leftover == [], leftover
