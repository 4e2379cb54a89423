"""Kernel lab smoke tests: the lab really has device-mapper, loop and a scratch ext4 disk.

Run from the host with ``python3 -m pytest tests/lab -q`` (the lab plugin boots the lab).
"""

from __future__ import annotations

import os
import subprocess

import pytest

pytestmark = pytest.mark.lab


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def test_runs_in_lab(in_lab):
    assert in_lab, "lab tests must run inside the kernel lab"
    assert os.environ.get("COWDISK_IN_LAB") == "1"
    assert os.uname().release != "", os.uname()
    assert "amd64" in os.uname().release  # Debian's kernel, not the host's


def test_device_mapper_control():
    fd = os.open("/dev/mapper/control", os.O_RDWR)
    os.close(fd)
    out = _run("dmsetup", "version")
    assert "Driver version:" in out, out


def test_device_mapper_targets():
    out = _run("dmsetup", "targets")
    targets = {line.split()[0] for line in out.splitlines() if line.strip()}
    for t in ("snapshot", "snapshot-origin", "thin-pool", "thin", "flakey", "delay", "linear"):
        assert t in targets, out


def test_loop_device(lab_scratch):
    img = lab_scratch / "cowdisk-lab-smoke-loop.img"
    with open(img, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    dev = _run("losetup", "--find", "--show", str(img)).strip()
    try:
        assert dev.startswith("/dev/loop"), dev
        with open(dev, "r+b") as f:
            f.write(b"cowdisk" * 100)
            f.flush()
            os.fsync(f.fileno())
            f.seek(0)
            assert f.read(7) == b"cowdisk"
        assert _run("blockdev", "--getsize64", dev).strip() == str(16 * 1024 * 1024)
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)
        img.unlink()


def test_scratch_is_ext4(lab_scratch):
    assert lab_scratch is not None and lab_scratch.is_dir()
    assert os.environ.get("TMPDIR") == str(lab_scratch)
    mounts = {}
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            mounts[mnt] = (dev, fstype)
    assert mounts.get(str(lab_scratch), (None, None))[1] == "ext4", mounts.get(str(lab_scratch))
    assert mounts[str(lab_scratch)][0].startswith("/dev/vd")


def test_dm_linear_over_loop(lab_scratch):
    """A real device-mapper table over a loop device: create, read through, remove."""
    img = lab_scratch / "cowdisk-lab-smoke-dm.img"
    with open(img, "wb") as f:
        f.write(b"cowdisk-lab".ljust(4096, b"\0"))
        f.truncate(8 * 1024 * 1024)
    dev = _run("losetup", "--find", "--show", str(img)).strip()
    name = f"cowdisk-lab-smoke-{os.getpid()}"
    try:
        sectors = 8 * 1024 * 1024 // 512
        subprocess.run(["dmsetup", "create", name, "--table", f"0 {sectors} linear {dev} 0"],
                       check=True)
        try:
            with open(f"/dev/mapper/{name}", "rb") as f:
                assert f.read(11) == b"cowdisk-lab"
        finally:
            subprocess.run(["dmsetup", "remove", name], check=True)
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)
        img.unlink()
