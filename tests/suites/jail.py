"""Jail staging: ``store.jail`` (and ``cowdisk volume jail``) puts the volume's disk at
``<jail>/rootfs``, as a block device node with the device's major:minor (block backends)
or a hard link to the volume file (file backends, so the jail must be on the volume's
filesystem), replacing whatever stale entry is there and leaving no temporary behind."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from cowdisk.errors import NotFound, StateError, Unsupported
from testutil import BLOCK_BACKENDS, FILE_BACKENDS, MiB, cowdisk_cli, read_at, write_at

CHUNK = 4096


def jail_parent(store, backend: str, tmp_path: Path) -> Path:
    """Where jails go: any filesystem for a device node, the volume's for a hard link."""
    return tmp_path if backend in BLOCK_BACKENDS else Path(store.data_root)


def staged_is(dest: Path, vol, block: bool) -> bool:
    st, vst = os.lstat(dest), os.stat(vol.device)
    if block:
        return stat.S_ISBLK(st.st_mode) and st.st_rdev == vst.st_rdev
    return stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (vst.st_dev, vst.st_ino)


def test_jail(store, base, backend, tmp_path) -> None:
    block = backend in BLOCK_BACKENDS
    v = store.create_volume("j", "base")
    top = jail_parent(store, backend, tmp_path) / "jail-test"
    jail = top / "dev"
    jail.mkdir(parents=True)
    try:
        (jail / "rootfs").write_bytes(b"stale")  # a stale file from an earlier run
        node = store.jail("j", str(jail))
        assert node == str(jail / "rootfs")
        assert staged_is(jail / "rootfs", v, block)
        write_at(v.device, 4 * MiB, b"J" * CHUNK)
        assert read_at(node, 4 * MiB, CHUNK) == b"J" * CHUNK
        assert read_at(node, 0, MiB) == read_at(v.link, 0, MiB)
        if block:  # a stale block node with another major:minor is replaced
            os.unlink(node)
            os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(7, 255))
            store.jail("j", str(jail), uid=1234, gid=5678)
            st = os.stat(node)
            assert staged_is(jail / "rootfs", v, block) and (st.st_uid, st.st_gid) == (1234, 5678)
        else:
            store.jail("j", str(jail))  # again: the old link is replaced
            assert staged_is(jail / "rootfs", v, block)
        assert sorted(os.listdir(jail)) == ["rootfs"]  # no temporary left behind
        with pytest.raises(NotFound):
            store.jail("j", str(top / "no-such-jail"))
        store.checkpoint("j")
        with pytest.raises(StateError):
            store.jail("j", str(jail))
        store.remove_volume("j")
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_stale_entry_at_the_jail_path_is_replaced(store, base, backend, tmp_path) -> None:
    block = backend in BLOCK_BACKENDS
    a = store.create_volume("ja", base.id)
    b = store.create_volume("jb", base.id)
    jail = jail_parent(store, backend, tmp_path) / "jail-stale"
    jail.mkdir()
    dest = jail / "rootfs"
    try:
        stale_kinds = {
            "file": lambda: dest.write_bytes(b"left over by a crashed jailer"),
            "fifo": lambda: os.mkfifo(dest),
            "dangling symlink": lambda: os.symlink("/nonexistent/cowdisk-device", dest),
            # a previous sandbox's disk: replacing it must not touch that volume
            "other volume": lambda: store.jail("jb", str(jail)),
        }
        b_before = Path(b.device).read_bytes()
        for n, (kind, make) in enumerate(stale_kinds.items()):
            if dest.exists() or dest.is_symlink():
                dest.unlink()
            make()
            if n == 0:  # the command line once (a process start costs seconds in the lab), the library after
                p = cowdisk_cli(store.root, "volume", "jail", "ja", str(jail))
                assert p.returncode == 0, f"{kind}: {p.stderr}"
            else:
                store.jail("ja", str(jail))
            assert staged_is(dest, a, block), kind
            assert sorted(os.listdir(jail)) == ["rootfs"], kind  # no temporary names left
        assert Path(b.device).read_bytes() == b_before
        assert os.path.exists(b.device) and os.path.exists(a.device)
        dest.unlink()  # the jailer's teardown; then the volumes go as usual
        store.remove_volume("ja")
        store.remove_volume("jb")
    finally:
        shutil.rmtree(jail, ignore_errors=True)


@pytest.mark.backends(*FILE_BACKENDS)  # a device node works on any filesystem
def test_jail_on_another_filesystem_is_refused(store, base, tmp_path) -> None:
    v = store.create_volume("jx", base.id)
    dev = os.stat(v.device).st_dev
    other = None
    try:
        for cand in (str(tmp_path), "/dev/shm", "/run"):
            if os.path.isdir(cand) and os.stat(cand).st_dev != dev:
                other = tempfile.mkdtemp(prefix="cowdisk-jail-", dir=cand)
                break
        assert other is not None, "no other filesystem to try"
        p = cowdisk_cli(store.root, "volume", "jail", "jx", other)
        assert p.returncode == 9, (p.returncode, p.stdout, p.stderr)  # Unsupported
        # what the user reads
        assert "on another filesystem than the volume file" in p.stderr
        assert "hint: put the jail on the store's filesystem" in p.stderr
        assert os.listdir(other) == []  # nothing behind: no node, no link, no temporary
        assert os.stat(v.device).st_nlink == 1
        with pytest.raises(Unsupported) as ei:
            store.jail("jx", other)
        assert ei.value.obj == "jx", ei.value
        assert os.listdir(other) == []
        store.remove_volume("jx")
    finally:
        if other:
            shutil.rmtree(other, ignore_errors=True)
