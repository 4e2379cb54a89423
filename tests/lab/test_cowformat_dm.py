"""cowdisk.cowformat against a real dm-snapshot (runs inside the kernel lab).

Follows section 5 of docs/reference/dm-snapshot-cow-format.md: make an origin holding a pattern and a
sparse COW, build ``snapshot <origin loop> <cow loop> P 8`` with cowdisk's own kernel
wrappers, write through the snapshot device with O_DIRECT, capture the kernel's status
line and the device's content, remove the device, then check the offline reader
against what the kernel did: computed status == ``dmsetup status``, flatten == device
content byte for byte, the writer's COW activates and reads back as its flatten, an
overflowing COW turns Invalid on disk and is refused.

Every dm device is ``cdtest-cow-<random>``; the finalizer removes every device this
file made and closes every loop fd (autoclear loops vanish with their last holder),
and fails if a loop backed by one of our files survives.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import secrets
import struct
import time
from pathlib import Path
from typing import Iterator

import pytest

from cowdisk import cowformat as cf
from cowdisk.errors import CowFormatError, KernelError, SnapshotInvalid
from cowdisk.kernel import dm, loop

pytestmark = pytest.mark.lab

IN_LAB = os.environ.get("COWDISK_IN_LAB") == "1"
B = 4096
MiB = 1 << 20


# -- helpers ---------------------------------------------------------------


def pattern(n_bytes: int) -> bytes:
    """Every 16-byte cell names its chunk and offset: any misplaced chunk shows."""
    return b"".join(struct.pack("<IIQ", off // B, 0xC0DE, off) for off in range(0, n_bytes, 16))[:n_bytes]


def fill(x: int, tag: int, n: int = B) -> bytes:
    return (struct.pack("<II", x, tag) + bytes([tag & 0xFF]) * 8) * (n // 16)


def direct_write(dev: str, offset: int, data: bytes) -> None:
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], offset) == len(data)
    finally:
        os.close(fd)
        buf.close()


def direct_read(dev: str, offset: int, length: int) -> bytes:
    buf = mmap.mmap(-1, length)
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        n = os.preadv(fd, [buf], offset)
        return bytes(buf[:n])
    finally:
        os.close(fd)
        buf.close()


def read_device(dev: str, length: int) -> bytes:
    out = []
    off = 0
    while off < length:
        n = min(MiB, length - off)
        d = direct_read(dev, off, n)
        assert len(d) == n, (off, len(d))
        out.append(d)
        off += n
    return b"".join(out)


def make_file(path: Path, size: int, data: bytes | None = None) -> Path:
    with open(path, "wb") as f:
        if data:
            f.write(data)
        f.truncate(size)
    return path


class Lab:
    """Devices and loops this test made; removed in the finalizer, pass or fail."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.loops: list[loop.Loop] = []
        self.files: list[str] = []

    def snapshot(self, origin: Path, cow: Path, mode: str = "P", chunk: int = 8) -> tuple[str, str, int]:
        """Activate ``snapshot origin cow mode chunk``; returns (name, node, sectors)."""
        for f in (origin, cow):
            if str(f) not in self.files:
                self.files.append(str(f))
        lo = loop.attach(origin, read_only=True, autoclear=True)
        self.loops.append(lo)
        lc = loop.attach(cow, read_only=False, autoclear=True)
        self.loops.append(lc)
        sectors = os.path.getsize(origin) // 512  # what the loop device exposes
        name = f"cdtest-cow-{secrets.token_hex(4)}"
        self.names.append(name)
        try:
            info = dm.control().create_device(name, [dm.Target(0, sectors, "snapshot",
                                                               f"{lo.devno} {lc.devno} {mode} {chunk}")])
        finally:
            lo.close()  # the table holds the loops now; with no table they vanish here
            lc.close()
        return name, dm.device_node(info), sectors

    def remove(self, name: str) -> None:
        dm.control().remove(name)
        self.names.remove(name)
        self.wait_loops_gone()

    def wait_loops_gone(self, timeout: float = 10.0) -> list[str]:
        end = time.monotonic() + timeout
        while True:
            left = [f"{li.path} <- {f}" for f in self.files for li in loop.find_by_backing(f)]
            if not left or time.monotonic() > end:
                return left
            time.sleep(0.05)

    def cleanup(self) -> list[str]:
        problems = []
        for name in reversed(self.names):
            try:
                dm.control().remove(name, missing_ok=True)
            except KernelError as e:
                problems.append(str(e))
        for lo in self.loops:
            lo.close()
        left = self.wait_loops_gone()
        if left:
            problems.append(f"loops left: {left}")
        return problems


@pytest.fixture
def lab() -> Iterator[Lab]:
    if not IN_LAB:
        pytest.skip("needs device-mapper: run through the kernel lab (COWDISK_IN_LAB=1)")
    o = Lab()
    try:
        yield o
    finally:
        problems = o.cleanup()
    assert not problems, problems


def status_of(name: str) -> str:
    lines = dm.control().status(name)
    assert len(lines) == 1 and lines[0].type == "snapshot", lines
    return lines[0].text.strip()


def check_offline(tmp: Path, origin: Path, cow: Path, status: str, content: bytes) -> cf.Report:
    """The reader's view of ``cow`` equals what the kernel showed."""
    rep = cf.inspect(cow, os.path.getsize(origin))
    assert rep.status == status, rep.summary()
    assert rep.ok and not rep.warnings, rep.summary()
    out = tmp / f"flat-{secrets.token_hex(3)}.img"
    cf.flatten(origin, cow, out)
    try:
        flat = out.read_bytes()
        assert len(flat) == len(content)
        if flat != content:
            bad = [x for x in range(0, len(flat), B) if flat[x:x + B] != content[x:x + B]]
            pytest.fail(f"flatten differs from the device in chunks {[x // B for x in bad[:10]]}")
    finally:
        out.unlink()
    return rep


# -- tests -----------------------------------------------------------------


def test_reader_agrees_with_kernel(lab: Lab, tmp_path: Path) -> None:
    """Cases 1-8 of the plan on one origin (8 MiB + 1536 + 100 bytes) and one COW."""
    osize = 8 * MiB + 1536 + 100
    length = 8 * MiB + 1536  # the loop hides the last 100 bytes
    last = length // B  # chunk 2048 holds 1536 bytes
    origin_data = pattern(osize)
    origin = make_file(tmp_path / "origin.img", osize, origin_data)
    cow = make_file(tmp_path / "cow.img", 16 * MiB)
    T = 16 * MiB // 512

    # case 1: no writes
    name, node, sectors = lab.snapshot(origin, cow)
    assert sectors * 512 == length
    s = status_of(name)
    lab.remove(name)
    raw = cow.read_bytes()
    assert raw[:16] == bytes.fromhex("536E4170010000000100000008000000")
    assert raw[16:2 * B] == bytes(2 * B - 16)
    assert s == f"16/{T} 16"
    check_offline(tmp_path, origin, cow, s, origin_data[:length])

    # cases 2, 3, 4, 7: sub-chunk write, aligned full chunk, straddling write, last partial chunk
    name, node, _ = lab.snapshot(origin, cow)
    direct_write(node, 5 * B + 1024, b"\xA5" * 512)
    direct_write(node, 9 * B, fill(9, 1))
    direct_write(node, 20 * B + 2048, b"\x5A" * B)
    direct_write(node, last * B + 512, b"\x77" * 512)
    s = status_of(name)
    content = read_device(node, length)
    lab.remove(name)
    recs = cf.exceptions(cow)
    assert recs[:2] == [(5, 2), (9, 3)]
    assert sorted(recs[2:4]) == [(20, 4), (21, 5)] or sorted(recs[2:4]) == [(20, 5), (21, 4)]
    assert recs[4] == (last, 6) and len(recs) == 5
    raw = cow.read_bytes()
    expect5 = bytearray(origin_data[5 * B:6 * B])
    expect5[1024:1536] = b"\xA5" * 512
    assert raw[2 * B:3 * B] == bytes(expect5)  # origin chunk copied, 512 bytes changed
    assert raw[3 * B:4 * B] == fill(9, 1)
    # only the 1536 bytes inside the device were copied for the partial chunk
    assert raw[6 * B:6 * B + 1536] == content[last * B:]
    assert s == f"{7 * 8}/{T} 16"
    check_offline(tmp_path, origin, cow, s, content)
    assert cf.changed_ranges(cow, osize) == [(5 * B, B), (9 * B, B), (20 * B, 2 * B), (last * B, 1536)]

    # case 5: exactly 256 records: area 0 full, area 1 zeroed and current
    name, node, _ = lab.snapshot(origin, cow)
    for x in range(100, 351):
        direct_write(node, x * B, fill(x, 2))
    s = status_of(name)
    content = read_device(node, length)
    lab.remove(name)
    recs = cf.exceptions(cow)
    assert len(recs) == 256
    raw = cow.read_bytes()
    assert raw[1_056_768:1_056_768 + B] == bytes(B)
    assert s == f"{259 * 8}/{T} 24"
    check_offline(tmp_path, origin, cow, s, content)

    # case 6: 600 records written in random order: three areas
    name, node, _ = lab.snapshot(origin, cow)
    rng = random.Random(600)
    more = rng.sample(range(400, last), 344)
    for x in more:
        direct_write(node, x * B, fill(x, 3))
    s = status_of(name)
    content = read_device(node, length)
    lab.remove(name)
    recs = cf.exceptions(cow)
    assert len(recs) == 600
    assert [old for old, _ in recs[256:]] == more
    news = [new for _, new in recs]
    assert news == [cf.expected_new_chunk(k, 8) for k in range(600)]
    assert 258 not in news and 515 not in news
    assert s == f"4832/{T} 32"
    rep = check_offline(tmp_path, origin, cow, s, content)
    assert rep.current_area == 2

    # case 8 (+9): re-create on the same COW, with the table asking for 16-sector chunks
    name, node, _ = lab.snapshot(origin, cow, chunk=16)
    assert dm.control().table(name)[0].text.split()[-2:] == ["P", "8"]  # the header's chunk size wins
    again = read_device(node, length)
    s2 = status_of(name)
    lab.remove(name)
    assert again == content
    assert s2 == cf.inspect(cow).status == s


def test_writer_cow_activates(lab: Lab, tmp_path: Path) -> None:
    """Case 12: a synthesised COW (two areas, a partial last chunk) reads back as its flatten,
    and the kernel appends after the writer's last record."""
    osize = 4 * MiB + 1536
    last = osize // B
    origin_data = pattern(osize)
    origin = make_file(tmp_path / "origin.img", osize, origin_data)
    rng = random.Random(12)
    keys = rng.sample(range(last), 299) + [last]
    chunks = {x: fill(x, 12) for x in keys}
    chunks[last] = b"\x99" * 1536
    cow = tmp_path / "cow.img"
    cf.write_cow(cow, 8, chunks, osize, size=8 * MiB, order=keys)
    content = origin_data[:osize // 512 * 512]
    flat = tmp_path / "flat.img"
    cf.flatten(origin, cow, flat)
    expected = flat.read_bytes()
    assert expected != content

    pre = cf.inspect(cow, osize)
    assert pre.ok and not pre.warnings, pre.summary()
    name, node, sectors = lab.snapshot(origin, cow)
    s = status_of(name)
    got = read_device(node, sectors * 512)
    fresh = next(x for x in range(last) if x not in chunks)
    direct_write(node, fresh * B, fill(fresh, 13))
    s_after = status_of(name)
    lab.remove(name)
    assert got == expected
    recs = cf.exceptions(cow)
    assert recs[:300] == [(x, cf.expected_new_chunk(k, 8)) for k, x in enumerate(keys)]
    assert recs[300:] == [(fresh, cf.expected_new_chunk(300, 8))]
    rep = cf.inspect(cow, osize)
    assert rep.ok and not rep.warnings, rep.summary()
    assert rep.status == s_after
    alloc_before = (cf.expected_new_chunk(299, 8) + 1) * 8
    assert s == pre.status == f"{alloc_before}/{8 * MiB // 512} 24"


def test_overflow_turns_invalid_and_is_refused(lab: Lab, tmp_path: Path) -> None:
    """Case 10: a 4-chunk COW, 3 chunks written. ``P``: Invalid on disk; ``PO``: Overflow, header valid."""
    osize = 1 * MiB
    origin = make_file(tmp_path / "origin.img", osize, pattern(osize))

    cow = make_file(tmp_path / "cow-p.img", 4 * B)
    name, node, _ = lab.snapshot(origin, cow, "P")
    errors = []
    for x in (1, 2, 3):
        try:
            direct_write(node, x * B, fill(x, 10))
        except OSError as e:
            errors.append(e.errno)
    s = status_of(name)
    lab.remove(name)
    assert s == "Invalid"
    assert errors == [errno.EIO]
    h = cf.read_header(cow)
    assert (h.magic, h.valid, h.version, h.chunk_size) == (cf.MAGIC, 0, 1, 8)
    rep = cf.inspect(cow, osize)
    assert rep.status == "Invalid" and "invalid" in rep.codes()
    assert [old for old, _ in rep.records] == [1, 2]  # the areas as of the last commit
    out = tmp_path / "flat.img"
    with pytest.raises(SnapshotInvalid) as ei:
        cf.flatten(origin, cow, out)
    assert os.fspath(ei.value.obj) == str(cow), ei.value
    assert not out.exists()
    # the kernel refuses I/O to it on reactivation too
    name, node, _ = lab.snapshot(origin, cow, "P")
    assert status_of(name) == "Invalid"
    with pytest.raises(OSError):
        direct_read(node, 0, B)
    lab.remove(name)

    cow = make_file(tmp_path / "cow-po.img", 4 * B)
    name, node, _ = lab.snapshot(origin, cow, "PO")
    direct_write(node, 1 * B, fill(1, 11))
    direct_write(node, 2 * B, fill(2, 11))
    with pytest.raises(OSError) as ei:
        direct_write(node, 3 * B, fill(3, 11))
    assert ei.value.errno == errno.EIO
    s = status_of(name)
    content = read_device(node, osize)  # reads keep working
    lab.remove(name)
    assert s == "Overflow"
    assert cf.read_header(cow).valid == 1
    rep = check_offline(tmp_path, origin, cow, "32/32 16", content)
    assert [old for old, _ in rep.records] == [1, 2]


def test_kernel_refuses_what_the_reader_refuses(lab: Lab, tmp_path: Path) -> None:
    """Case 11: garbage magic or version 2 fails to load; inspect reports the same."""
    osize = 1 * MiB
    origin = make_file(tmp_path / "origin.img", osize, pattern(osize))
    for what, off, value, code in [("magic", 0, 0x0BADF00D, "bad-magic"), ("version", 8, 2, "bad-version")]:
        cow = tmp_path / f"cow-{what}.img"
        cf.write_cow(cow, 8, {1: fill(1, 1)}, osize, size=1 * MiB)
        with open(cow, "r+b") as f:
            f.seek(off)
            f.write(struct.pack("<I", value))
        with pytest.raises(KernelError):
            lab.snapshot(origin, cow)
        assert code in cf.inspect(cow, osize).codes()
        with pytest.raises(CowFormatError) as ei:
            cf.flatten(origin, cow, tmp_path / "flat.img")
        assert os.fspath(ei.value.obj) == str(cow) and what in str(ei.value), ei.value
        assert not lab.wait_loops_gone()
