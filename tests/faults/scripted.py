"""Scripted faults (issue 11): what an admin's bad day does to a store, one fault at a time.

Each test builds a store with a template, an attached volume ``a`` and a checkpointed
volume ``b``, each holding its own block of random data, then applies one fault from
outside cowdisk (``rm``, truncate, a full or read-only filesystem, the pool pulled away)
and checks what the issue promises: the store opens, recovery never aborts and never
deletes data it does not understand, every command a user needs still works (with a
typed error where it cannot), and the data reads back.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass

from cowdisk.store import Store
from testutil import MiB, cowdisk_cli, read_at, write_at

OFF = MiB  # where each volume's own block is


@dataclass
class Setup:
    root: str
    backend: str
    data: dict[str, bytes]  # volume id -> its block at OFF


def root_of(store: Store) -> str:
    """The root of the suites' ``store`` fixture (a fresh store for the backend, destroyed
    afterwards), closed: the test opens its own."""
    store.close()
    return store.root


def populate(root: str, backend: str, work: str) -> Setup:
    """base (a 16 MiB image), ``a`` attached and ``b`` checkpointed, each with its own block."""
    os.makedirs(work, exist_ok=True)
    img = os.path.join(work, "base.img")
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
        f.write(os.urandom(64 << 10))
    kind = "reflink" if backend.startswith("reflink-") else backend
    data = {"a": os.urandom(4096), "b": os.urandom(4096)}
    with Store(root, backend=kind) as s:
        s.import_template(img, "base")
        for vid in ("a", "b"):
            write_at(s.create_volume(vid, "base").link, OFF, data[vid])
        s.checkpoint("b")
    return Setup(root, kind, data)


def holding(root: str, block: bytes) -> list[str]:
    """Every regular file under ``root`` (mounts inside it included) with ``block`` at OFF."""
    out = []
    for d, _, files in os.walk(root):
        for n in files:
            p = os.path.join(d, n)
            with contextlib.suppress(OSError):
                if os.path.isfile(p) and not os.path.islink(p) and read_at(p, OFF, len(block)) == block:
                    out.append(p)
    return out


def assert_data_kept(st: Setup) -> None:
    """The data of ``a`` and ``b`` is still somewhere in the store (never deleted)."""
    for vid, block in st.data.items():
        assert holding(st.root, block), f"volume {vid}'s data is gone from {st.root}"


def assert_usable(st: Setup, s: Store) -> None:
    """Recovery is clean and idempotent, ``a`` reads back, ``b`` restores and reads back,
    and both can be removed (the store fixture then finds nothing left)."""
    rep = s.recover()
    assert rep.errors == [] and rep.actions == 0, rep.as_dict()
    assert {v.id: str(v.state) for v in s.volumes()} == {"a": "attached", "b": "checkpointed"}
    assert read_at(s.volume("a").link, OFF, 4096) == st.data["a"]
    assert read_at(s.restore("b").link, OFF, 4096) == st.data["b"]
    for vid in ("a", "b"):
        s.remove_volume(vid)


def cli_json(root: str, *args: str) -> tuple[int, dict]:
    r = cowdisk_cli(root, "--json", *args)
    try:
        doc = json.loads(r.stdout) if r.stdout.strip() else {}
    except json.JSONDecodeError:
        doc = {"stdout": r.stdout}
    doc.setdefault("stderr", r.stderr)
    return r.returncode, doc


# --------------------------------------------------------------------------- by hand


def test_link_dir_removed_by_hand(backend, store, tmp_path) -> None:
    """``rm -r links/a`` of an attached volume: the store opens, recovery makes the link
    again, and every command works (issue 11 item 1)."""
    st = populate(root_of(store), backend, str(tmp_path / "work"))
    shutil.rmtree(os.path.join(st.root, "links", "a"))
    code, doc = cli_json(st.root, "volume", "ls")
    assert code == 0, doc
    with Store(st.root) as s:
        link = s.volume("a").link
        assert os.path.realpath(link) == os.path.realpath(s.volume("a").device or "")
        assert_usable(st, s)
        s.destroy()


def test_volume_dir_removed_by_hand(backend, store, tmp_path) -> None:
    """``rm -r volumes/b`` of a checkpointed volume: the store opens, ``a`` is untouched, a
    restore of ``b`` is refused (NotFound) and ``volume rm b`` clears it."""
    st = populate(root_of(store), backend, str(tmp_path / "work"))
    with Store(st.root, recover=False) as s:
        vdir = s.vol_dir("b")
    shutil.rmtree(vdir)
    code, doc = cli_json(st.root, "volume", "ls")
    assert code == 0, doc
    assert {v["id"] for v in doc["volumes"]} == {"a", "b"}
    code, doc = cli_json(st.root, "volume", "restore", "b")
    assert code == 3, doc
    assert doc["error"]["op"] == "restore" and doc["error"]["object"] == "b", doc
    code, doc = cli_json(st.root, "volume", "rm", "b")
    assert code == 0, doc
    with Store(st.root) as s:
        rep = s.recover()
        assert rep.errors == [] and rep.actions == 0, rep.as_dict()
        assert read_at(s.volume("a").link, OFF, 4096) == st.data["a"]
        s.remove_volume("a")
        s.destroy()


# --------------------------------------------------------------------------- the registry


def _drop_registry(root: str, how: str) -> None:
    db = os.path.join(root, "registry.db")
    if how == "deleted":
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(db + suffix)
    elif how == "truncated":
        os.truncate(db, os.path.getsize(db) // 2 or 100)
    elif how == "corrupted":
        size = os.path.getsize(db)
        with open(db, "r+b") as f:  # garbage over everything past the header page
            f.seek(4096)
            f.write(os.urandom(max(size - 4096, 4096)))
    else:
        raise ValueError(how)


def registry_lost(backend, store, tmp_path, how: str) -> None:
    """The registry deleted, truncated or corrupted: no command deletes a volume's data; a
    damaged registry is named at open with the command that rebuilds it; ``cowdisk recover
    --rebuild-registry`` brings the volumes back from their manifests (issue 11 item 2)."""
    st = populate(root_of(store), backend, str(tmp_path / "work"))
    _drop_registry(st.root, how)
    code, doc = cli_json(st.root, "volume", "ls")
    if how != "deleted":
        assert code != 0, doc
        assert "internal error" not in json.dumps(doc), doc
        assert "--rebuild-registry" in json.dumps(doc), doc
    assert_data_kept(st)
    code, doc = cli_json(st.root, "recover", "--rebuild-registry")
    assert code == 0, doc
    with Store(st.root) as s:
        assert_usable(st, s)
        s.destroy()


def wal_deleted(backend, store, tmp_path) -> None:
    """A process killed with the last commits only in the WAL, then the WAL deleted: the
    registry forgets ``c``, but ``c``'s data is kept and the rebuild brings it back."""
    st = populate(root_of(store), backend, str(tmp_path / "work"))
    block = os.urandom(4096)
    pid = os.fork()
    if pid == 0:  # dies holding the registry open: its commits stay in the WAL
        try:
            s = Store(st.root)
            write_at(s.create_volume("c", "base").link, OFF, block)
        finally:
            os.kill(os.getpid(), 9)
    os.waitpid(pid, 0)
    wal = os.path.join(st.root, "registry.db-wal")
    assert os.path.getsize(wal) > 0, "the commits did not stay in the WAL"
    os.unlink(wal)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(st.root, "registry.db-shm"))
    cli_json(st.root, "volume", "ls")
    assert holding(st.root, block), "c's data is gone"
    code, doc = cli_json(st.root, "recover", "--rebuild-registry")
    assert code == 0, doc
    with Store(st.root) as s:
        assert read_at(s.volume("c").link, OFF, 4096) == block
        s.remove_volume("c")
        assert_usable(st, s)
        s.destroy()


# --------------------------------------------------------------------------- the pool


def pool_pulled(store, tmp_path, how: str) -> None:
    """The pool's mount goes away behind the store's back: unmounted (a reboot), its loop
    detached (``losetup -d``: the kernel frees it at the unmount), or lazily unmounted
    while a process still holds a file in it. The next command mounts it again and every
    volume reads back (issue 11 item 6). A lazily unmounted pool still held cannot be
    mounted a second time (two mounts of one xfs would corrupt it): commands say so (InUse,
    exit 6, naming the pool) and work again once the holder lets go."""
    st = populate(root_of(store), "pool", str(tmp_path / "work"))
    mnt = os.path.join(st.root, "pool", "mnt")
    image = os.path.join(st.root, "pool", "pool.img")
    if how == "loop detached":
        src = next(ln.split()[0] for ln in open("/proc/self/mounts") if ln.split()[1] == mnt)
        subprocess.run(["losetup", "-d", src], check=True, capture_output=True)
        subprocess.run(["umount", mnt], check=True, capture_output=True)
    elif how == "unmounted":
        subprocess.run(["umount", mnt], check=True, capture_output=True)
    elif how == "lazily unmounted with a holder":
        with Store(st.root, recover=False) as s:
            holder = open(os.path.join(s.vol_dir("a"), "disk.img"), "rb")  # noqa: SIM115
        subprocess.run(["umount", "-l", mnt], check=True, capture_output=True)
        try:
            for args in (("volume", "ls"), ("volume", "rm", "a")):
                code, doc = cli_json(st.root, *args)
                assert code == 6, (args, doc)
                assert doc["error"]["op"] == "mount pool" and doc["error"]["object"] == image, doc
        finally:
            holder.close()
        end = time.monotonic() + 10  # the loop goes with its last user
        while any(b == image for b in _loop_backings()) and time.monotonic() < end:
            time.sleep(0.05)
    else:
        raise ValueError(how)
    code, doc = cli_json(st.root, "volume", "ls")
    assert code == 0, doc
    assert {v["id"] for v in doc["volumes"]} == {"a", "b"}
    with Store(st.root) as s:
        assert_usable(st, s)
        s.destroy()


def _loop_backings() -> list[str]:
    """Backing files of every loop, from sysfs."""
    out = []
    for name in os.listdir("/sys/block"):
        with contextlib.suppress(OSError):
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                out.append(f.read().strip())
    return out


# --------------------------------------------------------------------------- a full or read-only filesystem


def full_filesystem(tmp_path, scratch) -> None:
    """The store's filesystem full: ``volume rm``, ``checkpoint``, ``recover`` and ``gc``
    work and free space; a create says ENOSPC (exit 4), never "internal error" (item 5)."""
    with scratch("ext4", 64 * MiB) as mnt:
        st = populate(os.path.join(mnt, "store"), "copy", str(tmp_path / "work"))
        filler = os.path.join(mnt, "filler")
        with open(filler, "wb", buffering=0) as f:
            for bs in (MiB, 4096, 512):
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\xff" * bs)
        code, doc = cli_json(st.root, "volume", "create", "c", "--template", "base")
        assert code == 4, doc
        assert "internal error" not in json.dumps(doc), doc
        for args in (("volume", "checkpoint", "a"), ("recover",), ("gc",), ("volume", "ls")):
            code, doc = cli_json(st.root, *args)
            assert code == 0, (args, doc)
        code, doc = cli_json(st.root, "volume", "rm", "b")
        assert code == 0, doc
        assert holding(st.root, st.data["a"]), "a's data is gone"
        os.unlink(filler)
        with Store(st.root) as s:
            s.remove_volume("a")
            s.destroy()


def read_only_root(tmp_path, scratch) -> None:
    """The store's filesystem mounted read-only: every read-only command works (``volume
    ls``, ``volume inspect``, ``template ls``, ``doctor``); a write says EROFS (exit 4)."""
    with scratch("ext4", 128 * MiB) as mnt:
        st = populate(os.path.join(mnt, "store"), "copy", str(tmp_path / "work"))
        subprocess.run(["mount", "-o", "remount,ro", mnt], check=True, capture_output=True)
        try:
            for args in (("volume", "ls"), ("volume", "inspect", "a"), ("template", "ls")):
                code, doc = cli_json(st.root, *args)
                assert code == 0, (args, doc)
            code, doc = cli_json(st.root, "volume", "checkpoint", "a")
            assert code == 4, doc
            assert "internal error" not in json.dumps(doc), doc
        finally:
            subprocess.run(["mount", "-o", "remount,rw", mnt], check=True, capture_output=True)
        with Store(st.root) as s:
            assert_usable(st, s)
            s.destroy()


def scratch_factory(base: str):
    """testutil.scratch_fs under ``base`` (the test's tmp_path)."""
    from testutil import scratch_fs

    return lambda fstype, size: scratch_fs(fstype, size, base=base)

