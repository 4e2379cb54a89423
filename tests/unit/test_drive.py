"""Unit tests for cowdisk.drive (pure renderers of VMM drive configuration)."""

import doctest
import json
import shlex
from pathlib import Path

import pytest

from cowdisk import drive

LINK = "/var/lib/cowdisk/links/vm-1/rootfs"


def test_doctests():
    assert doctest.testmod(drive).failed == 0


def test_firecracker_defaults():
    assert drive.firecracker(LINK) == {
        "drive_id": "rootfs",
        "path_on_host": LINK,
        "is_root_device": True,
        "is_read_only": False,
    }


def test_firecracker_options_and_pathlike():
    d = drive.firecracker(Path(LINK), drive_id="data_2", is_root_device=False, is_read_only=True)
    assert d == {"drive_id": "data_2", "path_on_host": LINK,
                 "is_root_device": False, "is_read_only": True}
    assert json.loads(json.dumps(d)) == d


@pytest.mark.parametrize("bad", ["", "a-b", "a b", "x" * 65, "é"])
def test_firecracker_rejects_bad_drive_id(bad):
    with pytest.raises(ValueError):
        drive.firecracker(LINK, drive_id=bad)


def test_cloud_hypervisor():
    assert drive.cloud_hypervisor(LINK) == f"--disk path={LINK}"
    assert drive.cloud_hypervisor(LINK, readonly=True) == f"--disk path={LINK},readonly=on"


@pytest.mark.parametrize("bad", ["/a,b", "/a=b", "/a b"])
def test_cloud_hypervisor_rejects_unparseable_paths(bad):
    with pytest.raises(ValueError):
        drive.cloud_hypervisor(bad)


def test_qemu_defaults():
    assert drive.qemu(LINK) == ["-drive", f"file={LINK},format=raw,if=virtio,cache=none,id=rootfs"]


def test_qemu_options():
    assert drive.qemu(LINK, readonly=True, cache="writeback", drive_id=None) == [
        "-drive", f"file={LINK},format=raw,if=virtio,cache=writeback,readonly=on"]


def test_qemu_doubles_commas():
    assert drive.qemu("/x,y/rootfs")[1].startswith("file=/x,,y/rootfs,format=raw")


@pytest.mark.parametrize("kw", [{"cache": "bogus"}, {"interface": "usb3"}, {"fmt": "qcow2"},
                                {"drive_id": "1bad"}, {"drive_id": "a,b"}])
def test_qemu_rejects_bad_options(kw):
    with pytest.raises(ValueError):
        drive.qemu(LINK, **kw)


@pytest.mark.parametrize("fn", [drive.firecracker, drive.cloud_hypervisor, drive.qemu])
@pytest.mark.parametrize("bad", ["", "/a\nb", "/a\0b"])
def test_bad_paths(fn, bad):
    with pytest.raises(ValueError):
        fn(bad)


def test_bytes_path_rejected():
    with pytest.raises(TypeError):
        drive.qemu(b"/x")


def test_render_firecracker_is_json():
    assert json.loads(drive.render("firecracker", LINK)) == drive.firecracker(LINK)
    assert json.loads(drive.render("firecracker", LINK, readonly=True))["is_read_only"] is True


def test_render_cloud_hypervisor_and_qemu_are_shell_words():
    assert shlex.split(drive.render("cloud-hypervisor", LINK)) == ["--disk", f"path={LINK}"]
    assert shlex.split(drive.render("cloud_hypervisor", LINK)) == ["--disk", f"path={LINK}"]
    assert shlex.split(drive.render("qemu", LINK)) == drive.qemu(LINK)
    odd = "/tmp/it's here,1/rootfs"
    assert shlex.split(drive.render("qemu", odd, readonly=True)) == drive.qemu(odd, readonly=True)


def test_render_unknown_format():
    with pytest.raises(ValueError, match="firecracker"):
        drive.render("vmware", LINK)


def test_formats_all_render():
    for f in drive.FORMATS:
        assert drive.render(f, LINK)
