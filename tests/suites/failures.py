"""Failures of the world under the store, each with a typed error and nothing leaked.

* ENOSPC on the store's filesystem during create: the create fails naming the volume,
  leaves nothing behind, earlier volumes keep their data, and a retry works once there
  is space;
* a process holding the volume (device or file, through any path) open during remove:
  InUse naming its PID after the deadline, the volume stays attached and usable;
* restore while the stable link's directory, or the links root, cannot be written
  (immutable flag: as root, permission bits would not stop us): KernelError EPERM with
  a hint, no new row, data directory, link, intent or kernel object, and the source link
  still points at a live device or file; the CLI says the same with exit code 4;
* restore when the checkpoint's data vanished behind the store's back: NotFound, nothing
  leaked, the volume can still be removed; the CLI exits 3.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import sqlite3
import time

import pytest

from cowdisk.errors import CowdiskError, InUse, KernelError, NotFound
from cowdisk.kernel import fs
from cowdisk.store import Store
from testutil import (
    MiB,
    assert_settled,
    cowdisk_cli,
    host_state,
    make_tree,
    read_at,
    scratch_fs,
    store_files,
    write_at,
)

CHUNK = 4096


# -- a full filesystem ---------------------------------------------------------------------------

# the filesystem each backend's store sits on, and a size that fills quickly
ENOSPC_FS = {"copy": ("ext4", 64 * MiB), "reflink-xfs": ("xfs", 320 * MiB),
             "reflink-btrfs": ("btrfs", 256 * MiB), "dm-snapshot": ("ext4", 64 * MiB)}


def is_enospc(e: BaseException) -> bool:
    """ENOSPC somewhere in the chain: an OSError's errno or SQLite's SQLITE_FULL."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if isinstance(seen, sqlite3.Error) and getattr(seen, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@pytest.mark.backends(*ENOSPC_FS)  # pool: a full outer filesystem is I/O errors inside the pool's xfs
def test_enospc_on_store_filesystem_during_create(backend, tmp_path) -> None:
    before = host_state()
    fstype, size = ENOSPC_FS[backend]
    kind = "reflink" if backend.startswith("reflink-") else backend
    with scratch_fs(fstype, size, base=str(tmp_path)) as mnt:
        s = Store(os.path.join(mnt, "store"), backend=kind)
        filler = os.path.join(mnt, "filler")
        try:
            t = s.build_template(make_tree(str(tmp_path / "tree")), "base")
            pre = s.create_volume("pre", "base")
            write_at(pre.device, 3 * MiB, b"P" * CHUNK)
            with open(filler, "wb", buffering=0) as f:  # fill the filesystem
                for bs in (MiB, CHUNK):
                    with contextlib.suppress(OSError):
                        while True:
                            f.write(b"\xff" * bs)
                    with contextlib.suppress(OSError):
                        os.fsync(f.fileno())
            made, err = [], None
            for i in range(32):
                mid_state, mid_files = host_state(), store_files(s)
                try:
                    s.create_volume(f"e{i}", "base")
                    made.append(f"e{i}")
                except Exception as e:  # noqa: BLE001 - examined below
                    err = (f"e{i}", e)
                    break
            assert err is not None, f"32 creates succeeded on a full filesystem: {made}"
            vid, e = err
            assert isinstance(e, CowdiskError), repr(e)
            assert vid in str(e), str(e)  # the error names the volume
            assert is_enospc(e), repr(e)
            assert_settled(mid_state)
            assert store_files(s) == mid_files
            assert vid not in [v.id for v in s.volumes()]
            # earlier volumes are intact
            assert read_at(pre.link, 3 * MiB, CHUNK) == b"P" * CHUNK
            assert s.usage("pre").health == "ok"
            os.unlink(filler)
            again = s.create_volume(vid, "base")
            assert read_at(again.device, 3 * MiB, CHUNK) == read_at(t.path, 3 * MiB, CHUNK)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(filler)  # a full disk would fail the cleanup too
            try:
                s.destroy()
            finally:
                s.close()
    assert_settled(before)


# -- a holder keeps the volume open --------------------------------------------------------------


def _hold_open(path: str, ready, release) -> None:
    fd = os.open(path, os.O_RDONLY)
    ready.set()
    release.wait(120)
    os.close(fd)
    os._exit(0)


def test_remove_while_held_open_by_another_process(store, base) -> None:
    v = store.create_volume("busy", "base")
    write_at(v.device, 2 * MiB, b"B" * CHUNK)
    before, files = host_state(), store_files(store)
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    # through the stable link: the holder search must find the device or file behind it
    p = ctx.Process(target=_hold_open, args=(v.link, ready, release))
    p.start()
    try:
        assert ready.wait(120)
        t0 = time.monotonic()
        with pytest.raises(InUse) as ei:
            store.remove_volume("busy", deadline_s=0.5)
        assert time.monotonic() - t0 < 30
        assert ei.value.obj == "busy", ei.value
        assert str(p.pid) in str(ei.value), str(ei.value)  # the message names who holds it
        w = store.volume("busy")
        assert w.state == "attached" and w.device == v.device
        assert os.path.realpath(w.link) == os.path.realpath(v.device)
        assert read_at(w.link, 2 * MiB, CHUNK) == b"B" * CHUNK
        assert store_files(store) == files
        assert_settled(before)
        write_at(w.link, 2 * MiB, b"C" * CHUNK)
    finally:
        release.set()
        p.join(120)
    store.remove_volume("busy")
    assert store.volumes() == []


# -- link directories that cannot be written, checkpoint data gone -----------------------------


def snapshot(s) -> dict:
    """Everything a failed operation could leak: registry rows, files, links, host objects."""
    def tree(base: str) -> list[tuple[str, str]]:
        out = []
        for d, dirs, files in os.walk(base):
            for n in dirs + files:
                p = os.path.join(d, n)
                out.append((os.path.relpath(p, base), os.readlink(p) if os.path.islink(p) else ""))
        return sorted(out)

    return {
        "volumes": sorted((v.id, v.state, v.device) for v in s.volumes()),
        "links": s.registry.links(),
        "objects": sorted(s.registry.objects()),
        "intents": [(i.op, i.volume_id) for i in s.registry.intents()],
        "data": tree(os.path.join(s.data_root, "volumes")),
        "linkdir": tree(os.path.join(s.root, "links")),
        "host": host_state(),
    }


def assert_link_live(s, vid: str, expect_device: str) -> None:
    """The stable link exists, points at ``expect_device``, and that device/file exists."""
    link = s.link_path(vid)
    assert os.path.islink(link), f"{link} missing"
    assert os.readlink(link) == expect_device
    assert os.path.exists(link), f"{link} -> {expect_device}, which is gone"


def test_restore_with_the_source_link_dir_immutable(store, base, immutable) -> None:
    store.create_volume("vm-a", base.id)
    store.checkpoint("vm-a")
    b = store.restore("vm-a", "vm-b")  # A's link -> B (the path a VM snapshot recorded)
    assert_link_live(store, "vm-a", b.device)

    immutable(os.path.dirname(store.link_path("vm-a")))
    before = snapshot(store)
    with pytest.raises(KernelError) as ei:
        store.restore("vm-a", "vm-c")
    e = ei.value
    assert e.errno == errno.EPERM and e.op == "set stable link" and e.obj == store.link_path("vm-a")
    assert "immutable" in e.hint
    assert snapshot(store) == before  # no vm-c row, data dir, link, intent, loop, dm, mount
    assert store.registry.find_volume("vm-c") is None
    assert_link_live(store, "vm-a", b.device)  # never pointed at C's (removed) file or device

    # the CLI says the same, with the kernel error's exit code
    p = cowdisk_cli(store.root, "volume", "restore", "vm-a", "--as", "vm-c")
    assert p.returncode == 4, (p.returncode, p.stderr)
    assert "set stable link" in p.stderr and "EPERM" in p.stderr and "immutable" in p.stderr
    assert snapshot(store) == before

    fs.set_immutable(os.path.dirname(store.link_path("vm-a")), False)
    c = store.restore("vm-a", "vm-c")  # nothing left in the way
    assert_link_live(store, "vm-a", c.device)
    assert_link_live(store, "vm-b", b.device)
    for vid in ("vm-c", "vm-b", "vm-a"):
        store.remove_volume(vid)


def test_restore_with_the_links_root_immutable(store, base, immutable) -> None:
    store.create_volume("vm-a", base.id)
    store.checkpoint("vm-a")
    assert not os.path.lexists(store.link_path("vm-a"))  # a checkpointed volume has no link

    immutable(os.path.join(store.root, "links"))
    before = snapshot(store)
    for args in (("vm-a", "vm-b"), ("vm-a",)):  # as a new volume, and in place
        with pytest.raises(KernelError) as ei:
            store.restore(*args)
        assert ei.value.errno == errno.EPERM and ei.value.op == "set stable link", ei.value
        assert snapshot(store) == before, args
        assert store.volume("vm-a").state == "checkpointed"
    fs.set_immutable(os.path.join(store.root, "links"), False)
    b = store.restore("vm-a", "vm-b")
    assert_link_live(store, "vm-a", b.device)
    for vid in ("vm-b", "vm-a"):
        store.remove_volume(vid)


def test_restore_when_the_checkpoint_data_vanished(store, base) -> None:
    store.create_volume("vm-a", base.id)
    store.checkpoint("vm-a")
    files = [n for k, n, _ in store.registry.objects("vm-a") if k == "file"]
    assert files and all(os.path.exists(f) for f in files)
    for f in files:
        os.unlink(f)  # behind the store's back

    before = snapshot(store)
    for args in (("vm-a", "vm-b"), ("vm-a",)):
        with pytest.raises(NotFound) as ei:
            store.restore(*args)
        assert (ei.value.op, ei.value.obj) == ("restore", "vm-a"), ei.value
        assert snapshot(store) == before, args
        assert not os.path.lexists(store.link_path("vm-a"))
    p = cowdisk_cli(store.root, "volume", "restore", "vm-a", "--as", "vm-b")
    assert p.returncode == 3, (p.returncode, p.stderr)
    assert "checkpointed data is gone" in p.stderr and files[0] in p.stderr  # what the user reads
    assert snapshot(store) == before

    store.remove_volume("vm-a")  # what the hint says; it works with the data gone
    assert store.volumes() == []
    assert os.listdir(os.path.join(store.data_root, "volumes")) == []
    assert os.listdir(os.path.join(store.root, "links")) == []
