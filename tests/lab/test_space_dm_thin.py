"""A dm-thin store's space as Store.space(), doctor and store info report it, against the
pool's own status (`dmsetup status`, the outside witness) (lab tier): data and metadata
fill in bytes, and a full pool named as such (not ok) until the next create grows it."""

from __future__ import annotations

import errno

import pytest

from cowdisk import doctor
from cowdisk.store import Store
from testutil import MiB, assert_settled, fill, host_state, make_tree, thin_pool_status

pytestmark = [pytest.mark.lab, pytest.mark.backends("dm-thin")]


def test_space_follows_the_pool_and_names_a_full_one(tmp_path) -> None:
    before = host_state()
    root = str(tmp_path / "s")
    s = Store(root, backend="dm-thin", backend_options={"data_size": str(48 * MiB), "no_space": "error",
                                                         "grow_at_pct": "50", "block_kib": "64"})
    try:
        s.build_template(make_tree(str(tmp_path / "tree")), "base")
        a = s.create_volume("a", "base")
        fill(a.device, 8 * MiB, 8 * MiB)
        areas = {x.area: x for x in s.space()}
        assert {"store filesystem", "thin pool data", "thin pool metadata"} <= set(areas), areas
        st = thin_pool_status(s)  # start len thin-pool <transaction> <meta used>/<total> <data used>/<total> ...
        meta_used, meta_total = (int(n) for n in st[4].split("/"))
        data_used, data_total = (int(n) for n in st[5].split("/"))
        data = areas["thin pool data"]
        assert data.total_bytes == data_total * 64 * 1024 and data.state == "ok", data
        assert abs(data.used_bytes - data_used * 64 * 1024) <= 2 * 64 * 1024, (data, data_used)
        assert data.used_bytes >= 8 * MiB
        meta = areas["thin pool metadata"]
        assert meta.total_bytes == meta_total * 4096 and 0 < meta.used_bytes <= meta.total_bytes, (meta, st)
        assert abs(meta.used_bytes - meta_used * 4096) <= 16 * 4096
        assert all(c.ok for c in doctor.space_checks(s.space()))

        failed = None
        try:  # more than the 48 MiB pool holds, no create in between to grow it
            b = s.create_volume("b", "base")
            fill(b.device, 8 * MiB, 56 * MiB)
            fill(a.device, 16 * MiB, 48 * MiB)
        except OSError as e:
            failed = e
        assert failed is not None and failed.errno in (errno.EIO, errno.ENOSPC), failed
        assert "out_of_data_space" in thin_pool_status(s)
        full = {x.area: x for x in s.space()}["thin pool data"]
        assert full.state.startswith("out_of_data_space"), full
        checks = {c.name: c for c in doctor.space_checks(s.space())}
        assert checks["space: thin pool data"].ok is False and "dm-thin.md" in checks["space: thin pool data"].hint
        assert any(x["area"] == "thin pool data" and x["state"].startswith("out_of_data_space")
                   for x in s.info()["space"])
        s.create_volume("c", "base")  # grows the pool: rw again
        assert {x.area: x for x in s.space()}["thin pool data"].state == "ok"
        for vid in "abc":
            s.remove_volume(vid)
    finally:
        try:
            s.destroy()
        finally:
            s.close()
    assert_settled(before)
