"""The embedded pool: re-mounted on open after a reboot, grows when asked."""

from __future__ import annotations

import os

import pytest

from cowdisk.kernel.mount import mounted_at
from cowdisk.kernel import fs
from cowdisk.store import Store
from testutil import assert_same_host, host_state, make_tree, read_at, write_at

pytestmark = pytest.mark.root
MiB = 1 << 20


def test_pool_survives_a_reboot_and_grows(tmp_path) -> None:
    before = host_state()
    root = str(tmp_path / "store")
    s = Store(root, backend="pool")
    try:
        assert mounted_at(s.backend.pool.mnt) and fs.statfs(s.backend.pool.mnt).name == "xfs"
        s.build_template(make_tree(str(tmp_path / "tree")), "base")
        v = s.create_volume("vm", "base")
        write_at(v.link, 8 * MiB, b"kept" * 1024)
        s.close()
        # a reboot: the pool's mount and loop are gone, the files stay
        s.backend.pool.unmount()
        assert mounted_at(s.backend.pool.mnt) is None
        s = Store(root)
        assert s.backend_name == "pool" and mounted_at(s.backend.pool.mnt)
        assert s.volume("vm").state == "attached"
        assert read_at(s.volume("vm").link, 8 * MiB, 4096) == b"kept" * 1024
        size = os.path.getsize(s.backend.pool.image)
        free = fs.statfs(s.backend.pool.mnt).free_bytes
        grown = s.grow_pool(size * 2)
        assert os.path.getsize(s.backend.pool.image) == size * 2
        assert grown > free + size // 2, (free, grown)
    finally:
        s.destroy()
        s.close()
    assert not os.path.exists(os.path.join(root, "pool", "pool.img"))
    assert_same_host(before)


def test_space_names_the_pool_and_the_host_filesystem(tmp_path) -> None:
    """Store.space(): the store's filesystem and the pool's own xfs, as statvfs counts them;
    writing into a volume moves the pool's used bytes; doctor's checks say it, and one past
    the warning mark is not ok."""
    from cowdisk import doctor

    before = host_state()
    s = Store(str(tmp_path / "s"), backend="pool")
    try:
        s.build_template(make_tree(str(tmp_path / "tree")), "base")
        areas = {a.area: a for a in s.space()}
        assert set(areas) == {"store filesystem", "data filesystem"}, areas
        st = os.statvfs(s.data_root)
        assert areas["data filesystem"].total_bytes == st.f_blocks * st.f_frsize
        assert areas["data filesystem"].detail == s.data_root and areas["data filesystem"].state == "ok"
        v = s.create_volume("v", "base")
        fd = os.open(v.link, os.O_WRONLY)
        try:
            os.pwrite(fd, os.urandom(16 << 20), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        after = {a.area: a for a in s.space()}
        assert after["data filesystem"].used_bytes >= areas["data filesystem"].used_bytes + (15 << 20)
        checks = {c.name: c for c in doctor.space_checks(s.space())}
        assert checks["space: data filesystem"].ok is True
        tight = doctor.space_checks(s.space(), warn_pct=after["data filesystem"].pct / 2)
        assert [c.ok for c in tight if c.name == "space: data filesystem"] == [False]
        assert s.info()["space"][1]["area"] == "data filesystem"
        s.remove_volume("v")
    finally:
        s.destroy()
        s.close()
    assert_same_host(before)
