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
