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
    assert shlex.split(drive.render("cloud-hypervisor", LINK)) == ["--disk", f"path={LINK}"]
    with pytest.raises(ValueError, match="unknown drive format"):  # one set of names: no aliases
        drive.render("cloud_hypervisor", LINK)
    assert shlex.split(drive.render("qemu", LINK)) == drive.qemu(LINK)
    odd = "/tmp/it's here,1/rootfs"
    assert shlex.split(drive.render("qemu", odd, readonly=True)) == drive.qemu(odd, readonly=True)


def test_render_unknown_format():
    with pytest.raises(ValueError, match="firecracker"):
        drive.render("vmware", LINK)


def test_formats_all_render():
    for f in drive.FORMATS:
        assert drive.render(f, LINK, block_device=False)


# -- issue 14: every VMM's form, options passed through, bad combinations refused ----------------

from cowdisk.drive import DriveOptions  # noqa: E402

# The parts of each VMM's API definition a drive touches, as published by the projects:
# Firecracker's swagger `Drive` and `RateLimiter`/`TokenBucket` (src/firecracker/swagger/
# firecracker.yaml), Cloud Hypervisor's OpenAPI `DiskConfig` and `RateLimiterConfig`
# (vmm/src/api/openapi/cloud-hypervisor.yaml). Neither VMM runs on this host (no KVM), so
# the objects are checked against these definitions.
_BUCKET = {"type": "object", "required": ["size", "refill_time"],
           "properties": {"size": {"type": "integer"}, "one_time_burst": {"type": "integer"},
                          "refill_time": {"type": "integer"}}}
_LIMITER = {"type": "object", "properties": {"bandwidth": _BUCKET, "ops": _BUCKET}}
FC_DRIVE = {"type": "object", "required": ["drive_id", "is_root_device"], "properties": {
    "drive_id": {"type": "string"}, "partuuid": {"type": "string"}, "is_root_device": {"type": "boolean"},
    "cache_type": {"type": "string", "enum": ["Unsafe", "Writeback"]}, "is_read_only": {"type": "boolean"},
    "path_on_host": {"type": "string"}, "rate_limiter": _LIMITER,
    "io_engine": {"type": "string", "enum": ["Sync", "Async"]}, "socket": {"type": "string"}}}
CH_DISK = {"type": "object", "properties": {
    "path": {"type": "string"}, "readonly": {"type": "boolean"}, "direct": {"type": "boolean"},
    "iommu": {"type": "boolean"}, "num_queues": {"type": "integer"}, "queue_size": {"type": "integer"},
    "vhost_user": {"type": "boolean"}, "vhost_socket": {"type": "string"}, "rate_limiter_config": _LIMITER,
    "pci_segment": {"type": "integer"}, "id": {"type": "string"}, "serial": {"type": "string"},
    "rate_limit_group": {"type": "string"}}}


def _conforms(obj, schema, where="$"):
    """The subset of JSON schema these definitions use: object/properties (no others
    allowed: the VMMs reject unknown fields), required, string/boolean/integer, enum."""
    t = schema["type"]
    if t == "object":
        assert isinstance(obj, dict), where
        assert set(schema.get("required", ())) <= set(obj), (where, obj)
        for k, v in obj.items():
            assert k in schema["properties"], f"{where}.{k} is not in the VMM's API"
            _conforms(v, schema["properties"][k], f"{where}.{k}")
    elif t == "string":
        assert isinstance(obj, str), where
        assert obj in schema.get("enum", [obj]), (where, obj)
    elif t == "boolean":
        assert isinstance(obj, bool), where
    elif t == "integer":
        assert isinstance(obj, int) and not isinstance(obj, bool) and obj >= 0, where


def test_schema_checker_fails_on_a_bad_object():
    with pytest.raises(AssertionError):
        _conforms({"drive_id": "x", "is_root_device": True, "cache": "none"}, FC_DRIVE)
    with pytest.raises(AssertionError):
        _conforms({"drive_id": "x", "is_root_device": True, "cache_type": "none"}, FC_DRIVE)


def test_firecracker_every_option():
    d = drive.config("firecracker", LINK, DriveOptions(read_only=True, drive_id="disk_1", cache="writeback",
                                                        io_engine="async", iops=500, bandwidth=10 << 20))
    assert d == {"drive_id": "disk_1", "path_on_host": LINK, "is_root_device": True, "is_read_only": True,
                 "cache_type": "Writeback", "io_engine": "Async",
                 "rate_limiter": {"bandwidth": {"size": 10 << 20, "refill_time": 1000},
                                  "ops": {"size": 500, "refill_time": 1000}}}
    _conforms(d, FC_DRIVE)
    _conforms(drive.firecracker(LINK), FC_DRIVE)


def test_firecracker_jailed_form():
    d = drive.config("firecracker", LINK, DriveOptions(jail_path="rootfs"))
    assert d["path_on_host"] == "rootfs"
    _conforms(d, FC_DRIVE)
    with pytest.raises(ValueError, match="inside the jail"):
        drive.config("firecracker", LINK, DriveOptions(jail_path="../escape"))


@pytest.mark.parametrize("opts, match", [
    (DriveOptions(cache="none"), "cache_type"), (DriveOptions(io_engine="io_uring"), "io_engine"),
    (DriveOptions(machine="microvm"), "QEMU option"), (DriveOptions(iops=0), "positive"),
    (DriveOptions(drive_id="a-b"), "drive_id")])
def test_firecracker_refuses(opts, match):
    with pytest.raises(ValueError, match=match):
        drive.config("firecracker", LINK, opts)


def test_cloud_hypervisor_api_and_argv_agree():
    o = DriveOptions(read_only=True, drive_id="root-disk", cache="none", iops=100, bandwidth=1 << 20)
    api = drive.config("cloud-hypervisor-api", LINK, o)
    assert api == {"path": LINK, "readonly": True, "direct": True, "id": "root-disk",
                   "rate_limiter_config": {"bandwidth": {"size": 1 << 20, "refill_time": 1000},
                                           "ops": {"size": 100, "refill_time": 1000}}}
    _conforms(api, CH_DISK)
    argv = drive.config("cloud-hypervisor", LINK, o)
    assert argv == ["--disk", f"path={LINK},readonly=on,direct=on,id=root-disk,bw_size={1 << 20},"
                              "bw_refill_time=1000,ops_size=100,ops_refill_time=1000"]
    # the API takes any path; the argv cannot
    assert drive.config("cloud-hypervisor-api", "/a,b=c/rootfs")["path"] == "/a,b=c/rootfs"
    with pytest.raises(ValueError, match="cloud-hypervisor-api"):
        drive.config("cloud-hypervisor", "/a,b=c/rootfs")
    with pytest.raises(ValueError, match="no I/O engine"):
        drive.config("cloud-hypervisor", LINK, DriveOptions(io_engine="async"))
    with pytest.raises(ValueError, match="direct"):
        drive.config("cloud-hypervisor-api", LINK, DriveOptions(cache="unsafe"))


def test_qemu_microvm_uses_virtio_mmio():
    assert drive.qemu(LINK, machine="microvm") == [
        "-drive", f"file={LINK},format=raw,if=none,cache=none,id=rootfs",
        "-device", "virtio-blk-device,drive=rootfs"]
    with pytest.raises(ValueError, match="needs an id"):
        drive.qemu(LINK, machine="microvm", drive_id=None)
    with pytest.raises(ValueError, match="no ide"):
        drive.qemu(LINK, machine="microvm", interface="ide")


def test_qemu_blockdev_forms():
    assert drive.qemu_blockdev(LINK, block_device=False) == [
        "-blockdev", f"driver=raw,node-name=rootfs,cache.direct=on,file.driver=file,file.filename={LINK}",
        "-device", "virtio-blk-pci,drive=rootfs,id=rootfs-dev"]
    a = drive.qemu_blockdev(LINK, block_device=True, machine="microvm", readonly=True, cache="writethrough",
                            aio="io_uring", iops=10, bandwidth=4096, node_name="disk0")
    assert a == ["-object", "throttle-group,id=disk0-throttle,x-iops-total=10,x-bps-total=4096",
                 "-blockdev", "driver=raw,node-name=disk0,read-only=on,file.driver=throttle,"
                              "file.throttle-group=disk0-throttle,file.file.driver=host_device,"
                              f"file.file.filename={LINK},file.file.aio=io_uring",
                 "-device", "virtio-blk-device,drive=disk0,id=disk0-dev,write-cache=off"]
    assert "cache.no-flush=on" in drive.qemu_blockdev(LINK, block_device=False, cache="unsafe")[1]
    with pytest.raises(ValueError, match="does not exist"):
        drive.qemu_blockdev("/nonexistent/rootfs")  # cannot tell host_device from file


@pytest.mark.parametrize("fmt", ["qemu", "qemu-blockdev"])
@pytest.mark.parametrize("kw, match", [
    ({"cache": "writeback", "io_engine": "native"}, "O_DIRECT"), ({"io_engine": "sync"}, "aio"),
    ({"machine": "virt"}, "machine"), ({"cache": "Writeback"}, "cache"), ({"jail_path": "rootfs"}, "jailer"),
    ({"drive_id": "1x"}, "id"), ({"bandwidth": -1}, "positive")])
def test_qemu_refuses(fmt, kw, match):
    with pytest.raises(ValueError, match=match):
        drive.config(fmt, LINK, DriveOptions(**kw), block_device=False)


def test_qemu_throttling_and_aio_on_drive():
    a = drive.config("qemu", LINK, DriveOptions(io_engine="native", iops=100, bandwidth=1 << 20))
    assert a == ["-drive", f"file={LINK},format=raw,if=virtio,cache=none,aio=native,"
                           f"throttling.iops-total=100,throttling.bps-total={1 << 20},id=rootfs"]


def test_render_every_form_with_options():
    o = DriveOptions(read_only=True, drive_id="d0")
    for f in drive.FORMATS:
        text = drive.render(f, LINK, opts=o, block_device=True)
        cfg = drive.config(f, LINK, o, block_device=True)
        assert (json.loads(text) if isinstance(cfg, dict) else shlex.split(text)) == cfg


RBD = "rbd:pool1/fleet/cowdisk-v-vm1:id=cowdisk:conf=/etc/ceph/ceph.conf"


@pytest.fixture
def rbd_link(tmp_path):
    """A stable link of an rbd store with map=none: its target text is QEMU's rbd filename."""
    link = tmp_path / "links" / "vm1" / "rootfs"
    link.parent.mkdir(parents=True)
    link.symlink_to(RBD)
    return str(link)


def test_rbd_link_gives_qemu_its_rbd_driver(rbd_link):
    assert drive.network_target(rbd_link) == RBD
    assert drive.config("qemu", rbd_link) == ["-drive", f"file={RBD},format=raw,if=virtio,cache=none,id=rootfs"]
    assert drive.config("qemu-blockdev", rbd_link)[:2] == [
        "-blockdev", "driver=raw,node-name=rootfs,cache.direct=on,file.driver=rbd,file.pool=pool1,"
                     "file.image=cowdisk-v-vm1,file.namespace=fleet,file.user=cowdisk,file.conf=/etc/ceph/ceph.conf"]
    assert drive.network_target(LINK) is None  # a path that is not a link to an rbd filename


@pytest.mark.parametrize("fmt", ["firecracker", "cloud-hypervisor", "cloud-hypervisor-api"])
def test_rbd_link_is_refused_for_vmms_that_need_a_file(rbd_link, fmt):
    with pytest.raises(ValueError, match=f"{fmt} opens only files and block devices; make the store with map=fuse"):
        drive.config(fmt, rbd_link)


def test_rbd_blockdev_refuses_an_aio_it_cannot_have(rbd_link):
    with pytest.raises(ValueError, match="rbd driver has no aio"):
        drive.config("qemu-blockdev", rbd_link, drive.DriveOptions(io_engine="native"))
