"""cowdisk.kernel.mount against this host's kernel: mount/umount a loop-mounted xfs,
with /proc/self/mountinfo and findmnt as witnesses; reflink_support on xfs reflink=0."""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile
from typing import Iterator

import pytest

from cowdisk.errors import KernelError
from cowdisk.kernel import fs, loop, mount

MiB = 1 << 20


def findmnt_source(path: str) -> str:
    r = subprocess.run(["findmnt", "-n", "-o", "SOURCE", "--mountpoint", path], capture_output=True, text=True)
    return r.stdout.strip()


@pytest.fixture
def xfs_noreflink() -> Iterator[tuple[str, str]]:
    """An xfs made with reflink=0 on a sparse image; yields (image, empty mount point)."""
    d = tempfile.mkdtemp(prefix=f"cowdisk-test-{os.getpid()}-mount-")
    img, mnt = os.path.join(d, "fs.img"), os.path.join(d, "mnt")
    os.mkdir(mnt)
    with open(img, "wb") as f:
        f.truncate(512 * MiB)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=0", img], check=True, capture_output=True)
    try:
        yield img, mnt
    finally:
        if mount.mounted_at(mnt):
            subprocess.run(["umount", mnt], capture_output=True)
        subprocess.run(["rm", "-rf", d])


@pytest.mark.root
def test_mount_umount_and_reflink_support_on_xfs_reflink0(xfs_noreflink: tuple[str, str]) -> None:
    img, mnt = xfs_noreflink
    parent = os.path.dirname(mnt)
    lp = loop.attach(img, autoclear=True, label="cowdisk-test-mount")
    try:
        mount.mount(lp.path, mnt, "xfs", mount.MS_NODEV)
    finally:
        lp.close()  # the mount holds it now
    assert mount.mounted_at(mnt) == lp.path == findmnt_source(mnt)
    a, b = mount.mount_id(mnt), mount.mount_id(parent)
    assert a is not None and b is not None and a != b
    assert mount.mount_id(os.path.join(mnt, "missing")) is None

    rs = fs.reflink_support(mnt)  # the type says yes, the probe says no: the probe wins
    assert rs.fs.name == "xfs" and rs.fs_can_reflink
    assert not rs.ok and rs.probe_step == "FICLONE" and rs.probe_errno == errno.EOPNOTSUPP
    assert os.listdir(mnt) == []

    with open(os.path.join(mnt, "held"), "wb") as held:
        with pytest.raises(KernelError) as ei:
            mount.umount(mnt)
        assert ei.value.errno == errno.EBUSY and ei.value.op == "umount" and mnt in str(ei.value)
    mount.umount(mnt)
    assert mount.mounted_at(mnt) is None and findmnt_source(mnt) == ""
    with pytest.raises(KernelError) as ei:
        mount.umount(mnt)
    assert ei.value.errno == errno.EINVAL


@pytest.mark.root
def test_mount_failure_names_source_target_and_errno(tmp_path) -> None:
    with pytest.raises(KernelError) as ei:
        mount.mount(str(tmp_path / "no-such-device"), str(tmp_path), "xfs")
    assert ei.value.errno == errno.ENOENT and ei.value.op == "mount"
    assert str(tmp_path / "no-such-device") in str(ei.value) and str(tmp_path) in str(ei.value)
    assert mount.mounted_at(str(tmp_path)) is None
