"""What only dm-thin does, against a real device-mapper (lab tier): one pool on two loops
whatever the number of volumes, volumes and their copies as thin snapshots (no data
copied), space given back to the pool and to the host's filesystem, the pool grown before
it fills, what a full pool does, and a pool taken down behind cowdisk's back.

The behaviour every backend shares is in the suites (tests/suites/, run here by the
test_*_dm.py files on dm-snapshot and dm-thin).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import subprocess
from typing import Iterator

import pytest

from cowdisk.errors import InUse, InvalidArgument
from cowdisk.store import Store
from testutil import MiB, assert_settled, fill, host_state, make_tree, read_at, write_at
from testutil import thin_pool_status as pool_status

pytestmark = [pytest.mark.lab, pytest.mark.backends("dm-thin")]


@contextlib.contextmanager
def own_store(root: str, opts: dict[str, str]) -> Iterator[Store]:
    """A dm-thin store made with ``opts``, destroyed afterwards; the host as before."""
    before = host_state()
    s = Store(root, backend="dm-thin", backend_options=opts)
    try:
        yield s
    finally:
        try:
            s.destroy()
        finally:
            s.close()
    assert_settled(before)


def dmsetup(*args: str) -> str:
    return subprocess.run(["dmsetup", *args], capture_output=True, text=True, check=True).stdout


def pool_data(store) -> tuple[int, int]:
    """(used, total) data blocks of the pool, from `dmsetup status` (a fresh commit)."""
    used, total = pool_status(store)[5].split("/")
    return int(used), int(total)


def store_loops(store) -> list[str]:
    out = subprocess.run(["losetup", "--list", "--noheadings", "-O", "NAME,BACK-FILE"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    return sorted(line.split()[1] for line in out if line.split()[1].startswith(store.root + "/"))


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def test_two_loops_and_thin_snapshots(store, base, tmp_path) -> None:
    """Ten volumes, their checkpoint, restore-as and fork: the pool's two loops only, one thin
    device per attached volume, and no data copied (the pool's data use does not grow)."""
    vols = [store.create_volume(f"v{i}", "base") for i in range(10)]
    assert store_loops(store) == [os.path.join(store.root, "thin", n) for n in ("data.img", "meta.img")]
    for v in vols:
        t = dmsetup("table", store.dm_prefix + v.id).split()
        assert t[2] == "thin", t
    used0, _ = pool_data(store)
    write_at(vols[0].link, 30 * MiB, b"A" * 4096)
    store.checkpoint("v0")
    store.restore("v0", "r0")
    forks = store.fork("v1", ["f1", "f2"])
    used1, _ = pool_data(store)
    assert used1 - used0 <= 2, (used0, used1)  # the one 64 KiB block written, nothing copied
    assert read_at(store.volume("r0").link, 30 * MiB, 4096) == b"A" * 4096
    assert read_at(forks[0].link, 0, MiB) == read_at(base.path, 0, MiB)
    u = store.usage("r0")
    assert u.exclusive_bytes == 0 and u.shared_bytes and u.shared_bytes >= MiB, u  # all shared with v0
    assert u.cow_total_bytes and u.cow_used_bytes and u.health == "ok", u
    store.restore("v0")
    assert read_at(store.volume("v0").link, 30 * MiB, 4096) == b"A" * 4096
    for vid in ["r0", "f1", "f2"] + [v.id for v in vols]:
        store.remove_volume(vid)
    assert [n for n in dmsetup("ls").split() if n.startswith(store.dm_prefix)] == [store.dm_prefix + ".pool"]


def thin_count(store) -> int:
    """Thin devices in the pool's metadata (thin_ls on a metadata snapshot: an outside witness)."""
    pool = store.dm_prefix + ".pool"
    meta = next(p for p in store_loops(store) if p.endswith("/meta.img"))
    dev = subprocess.run(["losetup", "-j", meta, "-O", "NAME", "--noheadings"], capture_output=True, text=True,
                         check=True).stdout.split()[0]
    dmsetup("message", pool, "0", "reserve_metadata_snap")
    try:
        out = subprocess.run(["thin_ls", "--no-headers", "-m", "-o", "DEV", dev], capture_output=True, text=True,
                             check=True).stdout
    finally:
        dmsetup("message", pool, "0", "release_metadata_snap")
    return len(out.split())


def device_sha(dev: str) -> str:
    h = hashlib.sha256()
    with open(dev, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def test_flatten_without_copying(store, base) -> None:
    """Flatten makes a template of a thin snapshot: no pool block is written, the template is
    a descriptor file of a few bytes whose digest is the content's; it outlives its source,
    the same content flattened again is the same template (no second thin), and removing it
    gives its thin back at the next recovery."""
    v = store.create_volume("src", "base")
    write_at(v.link, 40 * MiB, b"F" * MiB)
    thins0, (used0, _) = thin_count(store), pool_data(store)
    flat = store.flatten("src", "flat")  # attached: suspended for the snapshot's instant
    assert pool_data(store)[0] == used0, "flatten wrote pool blocks"
    assert thin_count(store) == thins0 + 1
    assert flat.path.endswith("/disk.thin") and os.path.getsize(flat.path) < 4096 and flat.size == base.size
    assert flat.digest == device_sha(v.link)  # the content's sha256, not the descriptor's
    store.checkpoint("src")
    again = store.flatten("src")  # the same content: the same template, its thin dropped
    assert again.id == flat.id and thin_count(store) == thins0 + 1
    store.remove_volume("src")
    w = store.create_volume("w", "flat")  # a snapshot of the flat template's thin
    assert read_at(w.link, 40 * MiB, MiB) == b"F" * MiB
    assert store.verify_template("flat").digest == flat.digest
    assert pool_data(store)[0] <= used0 + 1
    write_at(w.link, 0, b"W" * 4096)
    assert store.verify_template("flat").digest == flat.digest  # the template did not change
    store.remove_volume("w")
    store.remove_template("flat")
    thins1 = thin_count(store)
    store.recover()  # the removed template's thin goes with the next recovery
    assert thin_count(store) == thins1 - 1 == thins0 - 1  # src's thin went with src


def test_space_comes_back_to_pool_and_host(store, base) -> None:
    """fstrim-like discards from the guest give blocks back to the pool; removing a volume
    gives them back to the host's filesystem (containerd #5691)."""
    data = os.path.join(store.root, "thin", "data.img")
    v = store.create_volume("big", "base")
    host0 = allocated(data)  # the template's thin, filled by the first create
    fill(v.device, 32 * MiB, 16 * MiB)
    used1, _ = pool_data(store)
    assert allocated(data) >= host0 + 16 * MiB
    fd = os.open(v.device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        from cowdisk.kernel import blk

        blk.discard(fd, 32 * MiB, 8 * MiB)  # what fstrim in the guest sends
    finally:
        os.close(fd)
    used2, _ = pool_data(store)
    block = int(dmsetup("table", store.dm_prefix + ".pool").split()[5]) * 512
    assert used1 - used2 >= 8 * MiB // block, (used1, used2, block)
    store.remove_volume("big")
    used3, _ = pool_data(store)
    assert allocated(data) <= host0 + MiB, (host0, allocated(data))
    assert used3 < used2


def test_pool_grows_before_it_fills_and_a_full_pool_errors(tmp_path) -> None:
    """A 48 MiB pool: a create past the low-water mark grows the file and reloads the table;
    with no_space=error a write the pool cannot hold fails with an I/O error, the other
    volume's data stays, usage says so, and the next create grows the pool back to rw."""
    root = str(tmp_path / "s")
    opts = {"data_size": str(48 * MiB), "no_space": "error", "grow_at_pct": "50"}
    with own_store(root, opts) as s:
        s.build_template(make_tree(str(tmp_path / "tree")), "base")
        a = s.create_volume("a", "base")
        write_at(a.link, 0, b"keep" * 1024)
        b = s.create_volume("b", "base")
        _, total0 = pool_data(s)
        fill(b.device, 8 * MiB, 24 * MiB)
        c = s.create_volume("c", "base")  # past 50%: the pool grows first
        _, total1 = pool_data(s)
        assert total1 >= 2 * total0, (total0, total1)
        assert os.path.getsize(os.path.join(root, "thin", "data.img")) >= 96 * MiB
        failed = None
        try:  # 88 MiB more than the pool has left (each write within the 64 MiB devices)
            fill(c.device, 8 * MiB, 56 * MiB)
            fill(b.device, 32 * MiB, 32 * MiB)
        except OSError as e:
            failed = e
        assert failed is not None and failed.errno in (errno.EIO, errno.ENOSPC), failed
        st = pool_status(s)
        assert "out_of_data_space" in st, st
        assert s.usage("a").health.startswith("pool out_of_data_space"), s.usage("a")
        assert read_at(a.link, 0, 4096) == b"keep" * 1024
        s.create_volume("d", "base")  # grows the pool: back to rw
        assert "rw" in pool_status(s), pool_status(s)
        assert read_at(a.link, 0, 4096) == b"keep" * 1024
        for vid in "abcd":
            s.remove_volume(vid)


def test_pool_removed_behind_our_back(store, base) -> None:
    """`dmsetup remove` of every device, the pool included (containerd #4790: a pool left
    unusable after manual cleanup): the next open checks the metadata with thin_check,
    makes the pool again, reattaches the attached volume with its data; the checkpointed
    one restores."""
    v = store.create_volume("up", "base")
    write_at(v.link, 5 * MiB, b"U" * 4096)
    w = store.create_volume("down", "base")
    write_at(w.link, 6 * MiB, b"D" * 4096)
    store.checkpoint("down")
    dmsetup("remove", store.dm_prefix + "up")
    dmsetup("remove", store.dm_prefix + ".pool")
    s2 = Store(store.root)
    try:
        assert s2.backend.checked == "thin_check: clean", s2.backend.checked
        assert s2.volume("up").state == "attached"
        assert read_at(s2.volume("up").link, 5 * MiB, 4096) == b"U" * 4096
        s2.restore("down")
        assert read_at(s2.volume("down").link, 6 * MiB, 4096) == b"D" * 4096
        s2.remove_volume("down")
        s2.remove_volume("up")
    finally:
        s2.close()


def test_pool_keeps_its_block_size(tmp_path) -> None:
    """The default block (256 KiB) is for new pools: a store whose recorded options do not
    name block_kib (made when the default was 64 KiB) keeps its pool's own size, read from
    the live table, and after the pool is gone (a reboot) from its metadata's superblock;
    a store opened naming another size is refused and nothing changes."""
    import json

    from cowdisk.errors import InvalidArgument as Invalid

    root = str(tmp_path / "s")
    with own_store(root, {"block_kib": "128", "data_size": str(64 * MiB)}) as s:
        s.build_template(make_tree(str(tmp_path / "tree")), "base")
        v = s.create_volume("a", "base")
        write_at(v.link, 3 * MiB, b"K" * 4096)
        s.checkpoint("a")
        # the store as an older cowdisk recorded it: options without block_kib
        s.registry.set_meta("backend_options", json.dumps({"data_size": str(64 * MiB)}))
        s2 = Store(root)
        try:
            assert s2.backend.block_sectors == 256, s2.backend.block_sectors  # from the live table
        finally:
            s2.close()
        dmsetup("remove", s.dm_prefix + ".pool")  # a reboot: only the files are left
        s3 = Store(root)
        try:
            assert s3.backend.block_sectors == 256, s3.backend.block_sectors  # from the superblock
            assert dmsetup("table", s.dm_prefix + ".pool").split()[5] == "256"
            assert read_at(s3.restore("a").link, 3 * MiB, 4096) == b"K" * 4096
            s3.checkpoint("a")
        finally:
            s3.close()
        s.registry.set_meta("backend_options", json.dumps({"data_size": str(64 * MiB), "block_kib": "512"}))
        with pytest.raises(Invalid) as ei:
            Store(root)
        assert "128 KiB blocks" in str(ei.value) and "block_kib=512" in str(ei.value), ei.value
        assert dmsetup("table", s.dm_prefix + ".pool").split()[5] == "256"
        s.restore("a")
        s.remove_volume("a")
    fresh = str(tmp_path / "new")
    with own_store(fresh, {"data_size": str(64 * MiB)}) as n:
        assert dmsetup("table", n.dm_prefix + ".pool").split()[5] == "512"  # 256 KiB: the default


def test_busy_device_named_by_open_count(store, base) -> None:
    """The busy check reads the kernel's open count; the error names the holder."""
    v = store.create_volume("busy", "base")
    fd = os.open(v.device, os.O_RDONLY)
    try:
        with pytest.raises(InUse) as ei:
            store.checkpoint("busy", deadline_s=0.3)
        assert ei.value.obj == "busy" and str(os.getpid()) in str(ei.value), ei.value
        assert store.volume("busy").state == "attached"
    finally:
        os.close(fd)
    store.remove_volume("busy")


def test_options_refused(tmp_path) -> None:
    """Unknown keys and bad values are refused before a pool is made."""
    before = dmsetup("ls")
    for bad in ({"block_kib": "96"}, {"data_dev": "/dev/null"}, {"no_space": "panic"}, {"grow_at": "5"},
                {"data_size": "1k"}):
        with pytest.raises(InvalidArgument):
            Store(str(tmp_path / "bad"), backend="dm-thin", backend_options=bad)
    assert dmsetup("ls") == before
    assert not os.path.exists(str(tmp_path / "bad" / "thin" / "data.img"))
