"""A VMM (a real QEMU) still holds the volume during remove and checkpoint: refused with
InUse naming the PID, for file volumes as for block devices (the holder search matches
the file's st_dev/st_ino among /proc/*/fd); the VM never notices and, once it stops,
remove works and nothing was lost.

The failures that need no VMM (immutable link directories, checkpoint data gone, a full
filesystem, another process holding the volume) are in tests/suites/failures.py, run
by tests/host/test_failures.py and tests/lab/test_failures_dm.py.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from testutil import cowdisk_cli, managed_store

from cowdisk.errors import InUse

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop-mounted pool, volumes)"),
]


def assert_link_live(s, vid: str, expect_device: str) -> None:
    """The stable link exists, points at ``expect_device``, and that device/file exists."""
    link = s.link_path(vid)
    assert os.path.islink(link), f"{link} missing"
    assert os.readlink(link) == expect_device
    assert os.path.exists(link), f"{link} -> {expect_device}, which is gone"


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
            assert ei.value.obj == "held" and "stop the VM" in ei.value.hint
            assert f"PID {pid}" in str(ei.value)  # the message names who holds it
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
