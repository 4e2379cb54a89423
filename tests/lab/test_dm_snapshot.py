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
from testutil import MiB, losetup_template_loops, make_tree, read_at, write_at

pytestmark = pytest.mark.lab

CHUNK = 4096


def dmsetup(*args: str) -> str:
    return subprocess.run(["dmsetup", *args], capture_output=True, text=True, check=True).stdout


def test_one_template_loop_shared_and_witnessed(store, tmp_path) -> None:
    """Three volumes: one read-only template loop; dmsetup and losetup see exactly what cowdisk made."""
    t = store.build_template(make_tree(str(tmp_path / "tree")), "base")
    vols = [store.create_volume(f"v{i}", "base") for i in range(3)]
    out = subprocess.run(["losetup", "--list", "--noheadings", "-O", "NAME,RO,BACK-FILE"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    tl = [line for line in out if line.split()[2] == t.path]
    assert len(tl) == 1 and tl[0].split()[1] == "1", out
    mine = sorted(line.split()[0] for line in dmsetup("ls").splitlines() if line.startswith(store.dm_prefix))
    assert mine == [store.dm_prefix + f"v{i}" for i in range(3)]
    for v in vols:
        table = dmsetup("table", store.dm_prefix + v.id).split()
        assert table[2] == "snapshot" and table[5:] == ["P", "8"], table
        status = dmsetup("status", store.dm_prefix + v.id).split()
        assert status[3].startswith("16/"), status
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
