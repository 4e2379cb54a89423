"""cowdisk.kernel.dm against a real device-mapper (runs inside the kernel lab).

Every device is made or inspected by cowdisk and checked by a witness that does not
import cowdisk: ``dmsetup`` (table, status, ls, info), the block node's rdev, the
loop's backing file.  Every dm device and loop a test makes is registered with the
``objs`` fixture, whose finalizer removes them with dmsetup/losetup, pass or fail,
and fails the test if any of this test's objects is left.  Names are
``cdtest-<random>-<what>``.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
import stat
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from cowdisk.errors import InvalidArgument, KernelError
from cowdisk.kernel import dm, dm_status

pytestmark = pytest.mark.lab

IN_LAB = os.environ.get("COWDISK_IN_LAB") == "1"
MiB = 1024 * 1024


# -- witness (no cowdisk) ---------------------------------------------------


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


def dmsetup_ls() -> dict[str, tuple[int, int]]:
    """``dmsetup ls``: name -> (major, minor)."""
    out = sh("dmsetup", "ls").stdout
    devs: dict[str, tuple[int, int]] = {}
    for line in out.splitlines():
        if not line.strip() or line.startswith("No devices found"):
            continue
        name, _, num = line.rpartition("\t")
        maj, mnr = num.strip().strip("()").split(":")
        devs[name.strip()] = (int(maj), int(mnr))
    return devs


def dmsetup_table(name: str) -> str:
    return sh("dmsetup", "table", name).stdout.rstrip("\n")


def dmsetup_status(name: str) -> str:
    return sh("dmsetup", "status", name).stdout.rstrip("\n")


def dmsetup_info(name: str, fields: str) -> list[str]:
    out = sh("dmsetup", "info", "-c", "--noheadings", "--separator", "|", "-o", fields, name).stdout
    return out.strip().split("|")


def line_of(tl: dm.TargetLine) -> str:
    """A cowdisk target line rendered the way dmsetup prints it."""
    return f"{tl.start} {tl.length} {tl.type} {tl.text}"


def rdev_of(path: str) -> tuple[int, int]:
    st = os.stat(path)
    assert stat.S_ISBLK(st.st_mode), path
    return os.major(st.st_rdev), os.minor(st.st_rdev)


# -- fixtures ---------------------------------------------------------------


class Objects:
    """What one test made: dm names and loop devices, removed in reverse order."""

    def __init__(self) -> None:
        self.tag = f"cdtest-{secrets.token_hex(4)}"
        self.dm_names: list[str] = []
        self.loops: list[str] = []

    def name(self, what: str) -> str:
        n = f"{self.tag}-{what}"
        self.dm_names.append(n)
        return n

    def loop(self, path: Path, read_only: bool = False) -> str:
        argv = ["losetup", "-f", "--show"] + (["-r"] if read_only else []) + [str(path)]
        dev = sh(*argv).stdout.strip()
        self.loops.append(dev)
        return dev

    def file(self, path: Path, size: int, fill: bytes | None = None) -> Path:
        with open(path, "wb") as f:
            if fill is not None:
                f.write((fill * (size // len(fill) + 1))[:size])
            else:
                f.truncate(size)
        return path

    def cleanup(self) -> list[str]:
        problems: list[str] = []
        for name in reversed(self.dm_names):
            if name in dmsetup_ls():
                r = sh("dmsetup", "remove", "--retry", name, check=False)
                if r.returncode:
                    problems.append(f"dmsetup remove {name}: {r.stderr.strip()}")
            node = f"/dev/mapper/{name}"
            if os.path.lexists(node):  # dmsetup (no udev) makes block nodes there
                os.unlink(node)
        for dev in reversed(self.loops):
            r = sh("losetup", "-d", dev, check=False)
            if r.returncode and "No such device" not in r.stderr:
                problems.append(f"losetup -d {dev}: {r.stderr.strip()}")
        left = [n for n in dmsetup_ls() if n.startswith(self.tag)]
        if left:
            problems.append(f"still present after cleanup: {left}")
        return problems


@pytest.fixture
def ctl() -> Iterator[dm.Control]:
    if not IN_LAB:
        pytest.skip("needs device-mapper: run through the kernel lab (COWDISK_IN_LAB=1)")
    with dm.Control() as c:  # in the lab a missing dm is a failure, not a skip
        yield c


@pytest.fixture
def objs(ctl: dm.Control) -> Iterator[Objects]:
    o = Objects()
    yield o
    problems = o.cleanup()
    # Only a failure of the cleanup itself fails here: the fixture removes what a
    # failed test left, and what a passing test forgot, quietly.
    assert not problems, problems


@pytest.fixture(autouse=True)
def kernel_log_clean() -> Iterator[None]:
    """Fail a test that made the kernel log a BUG or WARNING (dmtest's check)."""
    if not IN_LAB:
        yield
        return
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    os.lseek(fd, 0, os.SEEK_END)
    try:
        yield
        bad = []
        while True:
            try:
                rec = os.read(fd, 8192).decode(errors="replace")
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EPIPE:
                    continue
                raise
            msg = rec.split(";", 1)[-1]
            if msg.startswith(("BUG", "WARNING", "Oops", "general protection")):
                bad.append(msg.strip())
        assert not bad, bad
    finally:
        os.close(fd)


def direct_write(path: str, offset: int, data: bytes) -> None:
    """Write page-aligned ``data`` at ``offset`` bypassing the page cache."""
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], offset) == len(data)
    finally:
        os.close(fd)
        buf.close()


def direct_read(path: str, offset: int, length: int) -> bytes:
    buf = mmap.mmap(-1, length)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        n = os.preadv(fd, [buf], offset)
        return bytes(buf[:n])
    finally:
        os.close(fd)
        buf.close()


# -- interface --------------------------------------------------------------


def test_version_and_target_versions(ctl: dm.Control) -> None:
    major, minor, _ = ctl.version()
    assert major == 4 and minor >= 41
    versions = ctl.list_target_versions()
    witness = {}
    for line in sh("dmsetup", "targets").stdout.splitlines():
        name, ver = line.split()
        witness[name] = tuple(int(x) for x in ver.lstrip("v").split("."))
    assert versions == witness
    assert {"linear", "snapshot", "thin-pool", "thin", "flakey", "delay"} <= set(versions)
    assert ctl.get_target_version("snapshot") == versions["snapshot"]
    with pytest.raises(KernelError) as ei:
        ctl.get_target_version("cdtest-no-such-target")
    assert ei.value.errno == errno.EINVAL


def test_shared_control_is_one_per_process(objs: Objects) -> None:
    name = objs.name("mod")
    info = dm.control().create_device(name, [dm.Target(0, 2048, "zero", "")])
    assert dm.control() is dm.control()
    assert dm.control().info(name).minor == info.minor
    assert dm_line(dm.control().table(name)) == dmsetup_table(name)
    parent = dm.control()
    pid = os.fork()
    if pid == 0:  # a forked child gets its own control, which works
        ok = False
        try:
            child = dm.control()
            ok = child is not parent and child.info(name).minor == info.minor
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert dm.control() is parent and parent.fileno() >= 0
    assert dm.control().remove(name) is not None
    assert name not in dmsetup_ls()


def dm_line(lines: list[dm.TargetLine]) -> str:
    return "\n".join(line_of(t) for t in lines)


# -- linear, node, info -----------------------------------------------------


def test_linear_round_trip(ctl: dm.Control, objs: Objects, tmp_path: Path) -> None:
    backing = objs.file(tmp_path / "lin.img", 8 * MiB)
    loop = objs.loop(backing)
    lmaj, lmin = rdev_of(loop)
    name = objs.name("lin")

    info = ctl.create_device(name, [dm.Target(0, 8 * MiB // 512, "linear", f"{loop} 0")])
    assert info.active_table and not info.inactive_table and not info.suspended
    assert dmsetup_ls()[name] == (info.major, info.minor)
    assert dmsetup_table(name) == f"0 16384 linear {lmaj}:{lmin} 0"
    assert dm_line(ctl.table(name)) == dmsetup_table(name)
    assert ctl.status(name) == [dm.TargetLine(0, 16384, "linear", "")]

    st = ctl.info(name)
    assert (st.open_count, st.target_count, st.minor) == (0, 1, info.minor)
    assert dmsetup_info(name, "open,segments,major,minor") == ["0", "1", str(st.major), str(st.minor)]
    assert ctl.devno(name) == (st.major, st.minor)
    assert ctl.info_by_devno(st.major, st.minor).name == name
    assert ctl.deps(name) == [(lmaj, lmin)]

    node = dm.device_node(info)
    assert node == f"/dev/dm-{info.minor}" and rdev_of(node) == (info.major, info.minor)
    # Data written through the device lands in the backing file (the witness).
    direct_write(node, 4096, b"cowdisk!" * 512)
    with open(backing, "rb") as f:
        f.seek(4096)
        assert f.read(4096) == b"cowdisk!" * 512

    # Suspend / resume, seen by dmsetup.
    assert ctl.suspend(name, noflush=True).suspended
    assert dmsetup_info(name, "attr")[0][2] == "s"
    assert not ctl.resume(name).suspended
    assert dmsetup_info(name, "attr")[0][2] == "-"

    assert ctl.remove(name) is not None
    assert name not in dmsetup_ls()


def test_readonly_and_uuid(ctl: dm.Control, objs: Objects) -> None:
    name = objs.name("ro")
    uuid = f"CDTEST-{secrets.token_hex(8)}"
    info = ctl.create_device(name, [dm.Target(0, 4096, "zero", "")], readonly=True, uuid=uuid)
    assert info.readonly and info.uuid == uuid
    attr, wuuid = dmsetup_info(name, "attr,uuid")
    assert attr[0] == "L" and attr[3] == "r" and wuuid == uuid
    [entry] = [d for d in ctl.list_devices() if d.name == name]
    assert (entry.uuid, entry.major, entry.minor) == (uuid, info.major, info.minor)
    ctl.remove(name)


def test_device_node_recreated_and_mapper_link(ctl: dm.Control, objs: Objects) -> None:
    name = objs.name("node")
    info = ctl.create_device(name, [dm.Target(0, 2048, "zero", "")])
    node = f"/dev/dm-{info.minor}"
    os.unlink(node)  # as inside a container whose /dev is not devtmpfs
    try:
        assert ctl.device_node(name, mapper_link=True) == node
        assert rdev_of(node) == (info.major, info.minor)
        link = f"/dev/mapper/{name}"
        assert os.readlink(link) == f"../dm-{info.minor}"
        assert rdev_of(link) == (info.major, info.minor)
        ctl.remove(name)
        assert not os.path.lexists(link)
    finally:
        # devtmpfs removes only nodes it made itself: the one we made stays behind.
        if os.path.lexists(node) and name not in dmsetup_ls():
            os.unlink(node)


# -- snapshot ---------------------------------------------------------------


@pytest.fixture
def template(objs: Objects, tmp_path: Path) -> tuple[Path, str]:
    """An 8 MiB origin filled with a pattern, on a read-only loop."""
    path = objs.file(tmp_path / "origin.img", 8 * MiB, fill=b"template")
    return path, objs.loop(path, read_only=True)


def test_snapshot_create_status_write_remove(
    ctl: dm.Control, objs: Objects, tmp_path: Path, template: tuple[Path, str]
) -> None:
    origin_file, origin = template
    cow_file = objs.file(tmp_path / "cow.img", 8400 * 1024)
    cow = objs.loop(cow_file)
    omaj, omin = rdev_of(origin)
    cmaj, cmin = rdev_of(cow)
    name = objs.name("snap")
    sectors = 8 * MiB // 512

    info = ctl.create_device(name, [dm.Target(0, sectors, "snapshot", f"{origin} {cow} P 8")])
    assert dmsetup_table(name) == f"0 {sectors} snapshot {omaj}:{omin} {cmaj}:{cmin} P 8"
    [tl] = ctl.table(name)
    assert (tl.type, tl.text) == ("snapshot", f"{omaj}:{omin} {cmaj}:{cmin} P 8")

    [st] = ctl.status(name)
    assert line_of(st) == dmsetup_status(name)
    s = dm_status.parse_snapshot_status(st.text)
    assert s == dm_status.SnapshotStatus("valid", 16, 16800, 16)

    node = dm.device_node(info)
    assert direct_read(node, 0, 4096) == (b"template" * 512)
    direct_write(node, 0, b"volume!!" * 512)
    assert direct_read(node, 0, 4096) == b"volume!!" * 512
    with open(origin_file, "rb") as f:
        assert f.read(4096) == b"template" * 512  # origin untouched

    [st] = ctl.status(name)
    assert line_of(st) == dmsetup_status(name)
    s2 = dm_status.parse_snapshot_status(st.text)
    assert s2.valid and s2.data_sectors == 8 and s2.total_sectors == 16800

    ctl.remove(name)
    assert name not in dmsetup_ls()


@pytest.mark.parametrize("persist, state", [("P", "invalid"), ("PO", "overflow")])
def test_snapshot_overflow(
    ctl: dm.Control, objs: Objects, tmp_path: Path, template: tuple[Path, str], persist: str, state: str
) -> None:
    _, origin = template
    cow = objs.loop(objs.file(tmp_path / "cow.img", 256 * 1024))  # far too small
    name = objs.name("full")
    info = ctl.create_device(name, [dm.Target(0, 8 * MiB // 512, "snapshot", f"{origin} {cow} {persist} 8")])
    node = dm.device_node(info)
    with pytest.raises(OSError) as ei:
        for off in range(0, 8 * MiB, 256 * 1024):
            direct_write(node, off, b"x" * (256 * 1024))
    assert ei.value.errno == errno.EIO
    [st] = ctl.status(name)
    assert line_of(st) == dmsetup_status(name)
    assert dm_status.parse_snapshot_status(st.text).state == state
    ctl.remove(name)


# -- thin -------------------------------------------------------------------


def test_thin_pool_thin_and_snapshot(ctl: dm.Control, objs: Objects, tmp_path: Path) -> None:
    meta = objs.loop(objs.file(tmp_path / "meta.img", 4 * MiB))
    data = objs.loop(objs.file(tmp_path / "data.img", 64 * MiB))
    mmaj, mmin = rdev_of(meta)
    dmaj, dmin = rdev_of(data)
    pool = objs.name("pool")
    data_sectors = 64 * MiB // 512

    pinfo = ctl.create_device(pool, [dm.Target(0, data_sectors, "thin-pool", f"{meta} {data} 128 0")])
    assert dmsetup_table(pool) == f"0 {data_sectors} thin-pool {mmaj}:{mmin} {dmaj}:{dmin} 128 0 0 "  # sic: trailing space
    assert dm_line(ctl.table(pool)) == dmsetup_table(pool)
    [st] = ctl.status(pool)
    ps = dm_status.parse_thin_pool_status(st.text)
    assert ps == dm_status.parse_thin_pool_status(dmsetup_status(pool).split(" ", 3)[3])
    assert (ps.state, ps.transaction_id, ps.used_data_blocks, ps.total_data_blocks, ps.mode) == ("ok", 0, 0, 1024, "rw")

    assert ctl.message(pool, 0, "create_thin 1") is None
    with pytest.raises(KernelError) as ei:
        ctl.message(pool, 0, "create_thin 1")
    assert ei.value.errno == errno.EEXIST and pool in str(ei.value)
    with pytest.raises(KernelError) as ei:
        ctl.message(pool, 0, "create_thin")
    assert ei.value.errno == errno.EINVAL

    thin = objs.name("thin")
    tinfo = ctl.create_device(thin, [dm.Target(0, 32768, "thin", f"{pinfo.devno} 1")])
    assert dmsetup_table(thin) == f"0 32768 thin {pinfo.major}:{pinfo.minor} 1"
    [st] = ctl.status(thin)
    assert dm_status.parse_thin_status(st.text) == dm_status.ThinStatus("ok", 0, None)
    node = dm.device_node(tinfo)
    direct_write(node, 0, b"thin-one" * 8192)  # 64 KiB = one pool block
    [st] = ctl.status(thin)
    assert line_of(st) == dmsetup_status(thin)
    assert dm_status.parse_thin_status(st.text) == dm_status.ThinStatus("ok", 128, 127)
    assert dm_status.parse_thin_pool_status(ctl.status(pool)[0].text).used_data_blocks == 1

    # Snapshot of the thin device: suspend the origin around create_snap.
    ctl.suspend(thin)
    try:
        assert ctl.message(pool, 0, "create_snap 2 1") is None
    finally:
        ctl.resume(thin)
    snap = objs.name("tsnap")
    sinfo = ctl.create_device(snap, [dm.Target(0, 32768, "thin", f"{pinfo.devno} 2")])
    direct_write(node, 0, b"changed!" * 512)
    assert direct_read(dm.device_node(sinfo), 0, 4096) == b"thin-one" * 512

    # A pool refuses to delete an active thin id.
    with pytest.raises(KernelError) as ei:
        ctl.message(pool, 0, "delete 2")
    assert ei.value.errno == errno.EBUSY
    ctl.remove(snap)
    assert ctl.message(pool, 0, "delete 2") is None
    ctl.remove(thin)
    assert ctl.message(pool, 0, "delete 1") is None
    assert dm_status.parse_thin_pool_status(ctl.status(pool)[0].text).used_data_blocks == 0
    ctl.remove(pool)
    assert not {pool, thin, snap} & set(dmsetup_ls())


# -- flakey, delay, messages --------------------------------------------------


def test_flakey_and_delay(ctl: dm.Control, objs: Objects, tmp_path: Path) -> None:
    loop = objs.loop(objs.file(tmp_path / "fd.img", 4 * MiB))
    lmaj, lmin = rdev_of(loop)
    fl = objs.name("flakey")
    ctl.create_device(fl, [dm.Target(0, 8192, "flakey", f"{loop} 0 0 5")])
    # 6.1 prints the feature count (0) after the intervals.
    assert dmsetup_table(fl).startswith(f"0 8192 flakey {lmaj}:{lmin} 0 0 5")
    assert dm_line(ctl.table(fl)) == dmsetup_table(fl)
    assert line_of(ctl.status(fl)[0]) == dmsetup_status(fl)
    # up 0 s, down 5 s and no features: every I/O fails.
    with pytest.raises(OSError) as ei:
        direct_read(ctl.device_node(fl), 0, 4096)
    assert ei.value.errno == errno.EIO

    de = objs.name("delay")
    ctl.create_device(de, [dm.Target(0, 8192, "delay", f"{loop} 0 1")])
    assert dmsetup_table(de) == f"0 8192 delay {lmaj}:{lmin} 0 1"
    [st] = ctl.status(de)
    assert line_of(st) == dmsetup_status(de) and st.text == "0 0 0"
    ctl.remove(de)
    ctl.remove(fl)


def test_message_reply(ctl: dm.Control, objs: Objects) -> None:
    name = objs.name("stats")
    ctl.create_device(name, [dm.Target(0, 2048, "zero", "")])
    region = ctl.message(name, 0, "@stats_create - /1")
    assert region == "0"
    listing = ctl.message(name, 0, "@stats_list")
    assert listing is not None and listing.startswith("0: 0+2048 2048")
    assert ctl.message(name, 0, "@stats_delete 0") is None
    ctl.remove(name)


# -- devices made by dmsetup --------------------------------------------------


def test_lists_and_removes_dmsetup_devices(ctl: dm.Control, objs: Objects) -> None:
    a, b = objs.name("dmsa"), objs.name("dmsb")
    uuid = f"CDTEST-{secrets.token_hex(8)}"
    sh("dmsetup", "create", a, "--table", "0 2048 zero")
    sh("dmsetup", "create", b, "-u", uuid, "--table", "0 4096 error")
    seen = {d.name: d for d in ctl.list_devices()}
    witness = dmsetup_ls()
    assert set(witness) == set(seen)  # cowdisk lists exactly what dmsetup sees
    for n in (a, b):
        assert (seen[n].major, seen[n].minor) == witness[n]
    assert seen[a].uuid == "" and seen[b].uuid == uuid
    assert ctl.table(b) == [dm.TargetLine(0, 4096, "error", "")]
    ctl.remove(a)
    ctl.remove(b)
    assert not {a, b} & set(dmsetup_ls())


# -- error paths --------------------------------------------------------------


def test_busy_remove_then_release(ctl: dm.Control, objs: Objects) -> None:
    name = objs.name("busy")
    info = ctl.create_device(name, [dm.Target(0, 2048, "zero", "")])
    fd = os.open(dm.device_node(info), os.O_RDONLY)
    try:
        t0 = time.monotonic()
        with pytest.raises(KernelError) as ei:
            ctl.remove(name, deadline_s=0.3)
        assert time.monotonic() - t0 >= 0.3
        e = ei.value
        assert e.errno == errno.EBUSY and e.op == "dm remove" and e.obj == name
        assert name in str(e) and "still open" in str(e) and "open_count=1" in str(e)
        assert name in dmsetup_ls()
    finally:
        os.close(fd)
    assert ctl.remove(name, deadline_s=2.0) is not None
    assert name not in dmsetup_ls()


def test_deferred_remove(ctl: dm.Control, objs: Objects) -> None:
    name = objs.name("defer")
    info = ctl.create_device(name, [dm.Target(0, 2048, "zero", "")])
    fd = os.open(dm.device_node(info), os.O_RDONLY)
    try:
        out = ctl.remove(name, deferred=True)
        assert out is not None and out.deferred_remove
        assert ctl.info(name).deferred_remove and name in dmsetup_ls()
    finally:
        os.close(fd)
    assert name not in dmsetup_ls()


def test_missing_device(ctl: dm.Control, objs: Objects) -> None:
    name = objs.name("ghost")
    with pytest.raises(KernelError) as ei:
        ctl.remove(name)
    assert ei.value.errno == errno.ENXIO and dm.is_gone(ei.value) and name in str(ei.value)
    assert ctl.remove(name, missing_ok=True) is None
    for call in (ctl.info, ctl.resume, ctl.table, ctl.status):
        with pytest.raises(KernelError) as ei:
            call(name)
        assert ei.value.errno == errno.ENXIO


@pytest.mark.parametrize(
    "targets, err, reason",
    [
        ([dm.Target(0, 2048, "cdtest-nosuch", "")], errno.EINVAL, "unknown target type"),
        ([dm.Target(0, 2048, "linear", "/dev/cdtest-missing 0")], errno.ENODEV, "Device lookup failed"),
        ([dm.Target(0, 2048, "zero", ""), dm.Target(4096, 2048, "zero", "")], errno.EINVAL, "Gap in table"),
        ([dm.Target(0, 2048, "zero", "unexpected")], errno.EINVAL, "No arguments required"),
    ],
)
def test_bad_table(ctl: dm.Control, objs: Objects, targets: list[dm.Target], err: int, reason: str) -> None:
    name = objs.name("bad")
    ctl.create(name)
    with pytest.raises(KernelError) as ei:
        ctl.load_table(name, targets)
    e = ei.value
    assert e.errno == err and e.op == "dm load table" and e.obj == name
    assert "device-mapper: table:" in str(e) and reason in str(e), str(e)
    info = ctl.info(name)
    assert not info.active_table and not info.inactive_table
    ctl.remove(name)


def test_bad_snapshot_table_rolls_back_create(ctl: dm.Control, objs: Objects, template: tuple[Path, str]) -> None:
    _, origin = template
    name = objs.name("badsnap")
    with pytest.raises(KernelError) as ei:
        ctl.create_device(name, [dm.Target(0, 2048, "snapshot", f"{origin} /dev/cdtest-missing P 8")])
    assert ei.value.errno == errno.ENODEV and "Cannot get COW device" in str(ei.value)
    assert name not in dmsetup_ls()
    with pytest.raises(KernelError) as ei:
        ctl.create_device(name, [dm.Target(0, 2048, "snapshot", f"{origin} {origin} X 8")])
    assert ei.value.errno == errno.EINVAL and "device-mapper: table:" in str(ei.value)
    assert name not in dmsetup_ls()


def test_duplicate_name(ctl: dm.Control, objs: Objects) -> None:
    name = objs.name("dup")
    info = ctl.create(name)
    with pytest.raises(KernelError) as ei:
        ctl.create(name)
    assert ei.value.errno == errno.EBUSY and ei.value.op == "dm create" and name in str(ei.value)
    # No table yet, so no gendisk: device_node refuses rather than mknod a dead node.
    assert not info.active_table and not info.inactive_table
    with pytest.raises(KernelError) as ei:
        ctl.device_node(name)
    assert ei.value.errno == errno.ENXIO
    ctl.remove(name)


@pytest.mark.parametrize("bad", ["control", ".", "..", "cdtest/x", "cdtest-" + "x" * 121, ""])
def test_name_validation(ctl: dm.Control, objs: Objects, bad: str) -> None:
    before = dmsetup_ls()
    with pytest.raises(InvalidArgument):
        ctl.create(bad)
    with pytest.raises(InvalidArgument):
        ctl.remove(bad, missing_ok=True)
    assert dmsetup_ls() == before
