"""What only dm-snapshot does, against a real device-mapper (lab tier): one read-only
template loop shared by all volumes, the COW sized so a full rewrite fits, an undersized
COW turning Invalid and reported, and our own open of the device counting as a holder.

The behaviour every backend shares is in the suites (tests/suites/, run here by the
test_*_dm.py files).
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess

import pytest

from cowdisk.errors import InUse
from testutil import MiB, losetup_template_loops, make_tree, managed_store, read_at, write_at

pytestmark = [pytest.mark.lab, pytest.mark.backends("dm-snapshot")]

CHUNK = 64 * 1024  # the default chunk (P 128)


def dmsetup(*args: str) -> str:
    return subprocess.run(["dmsetup", *args], capture_output=True, text=True, check=True).stdout


def test_one_template_loop_shared_and_witnessed(store, tmp_path) -> None:
    """Three volumes: one read-only template loop; dmsetup and losetup see exactly what cowdisk
    made: 64 KiB chunks, both loops with direct I/O (the scratch disk is ext4)."""
    t = store.build_template(make_tree(str(tmp_path / "tree")), "base")
    vols = [store.create_volume(f"v{i}", "base") for i in range(3)]
    out = subprocess.run(["losetup", "--list", "--noheadings", "-O", "NAME,RO,DIO,BACK-FILE"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    tl = [line for line in out if line.split()[3] == t.path]
    assert len(tl) == 1 and tl[0].split()[1:3] == ["1", "1"], out
    cows = [line for line in out if line.split()[3].startswith(os.path.join(store.data_root, "volumes"))]
    assert len(cows) == 3 and all(line.split()[1:3] == ["0", "1"] for line in cows), out
    mine = sorted(line.split()[0] for line in dmsetup("ls").splitlines() if line.startswith(store.dm_prefix))
    assert mine == [store.dm_prefix + f"v{i}" for i in range(3)]
    for v in vols:
        table = dmsetup("table", store.dm_prefix + v.id).split()
        assert table[2] == "snapshot" and table[5:] == ["P", "128"], table
        status = dmsetup("status", store.dm_prefix + v.id).split()
        assert status[3].startswith("256/"), status  # header + first metadata area: 2 chunks
        assert os.path.realpath(v.link) == os.path.realpath(v.device)
    for v in vols:
        store.remove_volume(v.id)
    assert losetup_template_loops(t.path) == [], "template loop outlived its last volume"


def test_full_rewrite_fits_the_cow(store, base) -> None:
    v = store.create_volume("full", "base")
    size = base.size
    fd = os.open(v.device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        block = bytearray(os.urandom(MiB))
        for off in range(0, size, MiB):
            block[:8] = off.to_bytes(8, "little")
            os.pwrite(fd, block, off)
        os.fsync(fd)
    finally:
        os.close(fd)
    st = dmsetup("status", store.dm_prefix + "full")
    assert "Invalid" not in st and "Overflow" not in st, st
    u = store.usage("full")
    assert u.health == "ok", u
    assert u.cow_used_bytes is not None and u.cow_total_bytes is not None
    assert u.cow_used_bytes <= u.cow_total_bytes, u
    # every data chunk was written: the COW holds the whole device plus its metadata
    assert u.cow_used_bytes >= size, u
    assert read_at(v.device, size - MiB, 8) == (size - MiB).to_bytes(8, "little")
    store.checkpoint("full")
    store.restore("full")
    assert store.usage("full").health == "ok"
    assert read_at(v.link, 5 * MiB, 8) == (5 * MiB).to_bytes(8, "little")
    store.remove_volume("full")


def test_undersized_cow_turns_invalid_and_is_reported(store, base) -> None:
    store.create_volume("small", "base")
    store.checkpoint("small")
    cow = os.path.join(store.data_root, "volumes", "small", "cow.img")
    os.truncate(cow, 16 * CHUNK)  # header, one metadata area, 14 data chunks
    v = store.restore("small")
    assert store.usage("small").health == "ok"
    fd = os.open(v.device, os.O_WRONLY | os.O_CLOEXEC)
    failed_at = None
    try:
        for i in range(256):
            try:
                os.pwrite(fd, os.urandom(CHUNK), (i * 16) * CHUNK)
                os.fsync(fd)
            except OSError as e:
                assert e.errno == errno.EIO, e
                failed_at = i
                break
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    assert failed_at is not None and failed_at <= 16, failed_at
    assert "Invalid" in dmsetup("status", store.dm_prefix + "small")
    u = store.usage("small")
    assert u.health == "invalid", u
    store.remove_volume("small")
    assert store.volumes() == []


def test_remove_while_device_held_open_by_this_process(store, base) -> None:
    """Our own open counts for a block device: dm remove would fail on it too."""
    v = store.create_volume("busy", "base")
    fd = os.open(v.device, os.O_RDONLY)
    try:
        with pytest.raises(InUse) as ei:
            store.remove_volume("busy", deadline_s=0.5)
        assert ei.value.obj == "busy", ei.value
        assert str(os.getpid()) in str(ei.value), str(ei.value)  # the message names who holds it
        w = store.volume("busy")
        assert w.state == "attached", w
        assert os.path.realpath(w.link) == os.path.realpath(v.device)
        write_at(w.link, 0, os.pread(fd, CHUNK, 0))
    finally:
        os.close(fd)
    store.remove_volume("busy")


def test_chunk_and_direct_io_options(tmp_path) -> None:
    """The store options give the old path back (4 KiB chunks, buffered loops), and unknown
    or bad values are refused before anything is made."""
    from cowdisk.errors import InvalidArgument
    from cowdisk.store import Store

    root = str(tmp_path / "old")
    for bad in ({"chunk_kib": "3"}, {"chunk_kib": "1024"}, {"direct_io": "maybe"}, {"chunk": "8"}):
        with pytest.raises(InvalidArgument):
            Store(str(tmp_path / "bad"), backend="dm-snapshot", backend_options=bad)
    s0 = Store(root, backend="dm-snapshot", backend_options={"chunk_kib": "4", "direct_io": "no"})
    s0.close()
    with managed_store(root, "dm-snapshot") as s:
        s.build_template(make_tree(str(tmp_path / "tree")), "base")
        v = s.create_volume("old", "base")
        assert dmsetup("table", s.dm_prefix + "old").split()[5:] == ["P", "8"]
        out = subprocess.run(["losetup", "--list", "--noheadings", "-O", "DIO,BACK-FILE"],
                             capture_output=True, text=True, check=True).stdout.splitlines()
        mine = [line.split()[0] for line in out if line.split()[1].startswith(root)]
        assert mine == ["0", "0"], out
        write_at(v.device, MiB, b"x" * 4096)
        s.checkpoint("old")
        s.restore("old")
        assert read_at(s.volume("old").link, MiB, 4096) == b"x" * 4096
        s.remove_volume("old")
