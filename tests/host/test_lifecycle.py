"""A store's life cycle from the CLI: init checks the backend before recording anything,
info describes the store, destroy refuses attached volumes unless --force and leaves
nothing, immutable files included."""

from __future__ import annotations

import json
import os

import pytest

from cowdisk.kernel import fs
from cowdisk.store import Store
from testutil import assert_same_host, cowdisk_cli, host_state, make_tree

pytestmark = pytest.mark.root


@pytest.mark.parametrize("kind", ["copy", "pool"])
def test_init_info_destroy(tmp_path, kind) -> None:
    before = host_state()
    root = str(tmp_path / "store")
    p = cowdisk_cli(root, "--backend", "dm-snapshot", "store", "init")
    if p.returncode == 9:  # no device-mapper here: refused, and nothing recorded
        assert not os.path.exists(os.path.join(root, "store.json")), p.stderr
    p = cowdisk_cli(root, "--backend", kind, "store", "init", "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["backend"] == kind and info["volumes"] == {} and info["reserve"] is True
    with Store(root) as s:
        s.build_template(make_tree(str(tmp_path / "tree")), "base")
        s.create_volume("v", "base")
        ghost = os.path.join(s.data_root, "templates", "0123456789abcdef")  # unaccounted, immutable
        os.makedirs(ghost)
        with open(os.path.join(ghost, "disk.img"), "wb") as f:
            f.write(b"x" * 4096)
        fs.set_immutable(os.path.join(ghost, "disk.img"), True)
        assert s.recover().quarantined  # moved aside, not deleted
    p = cowdisk_cli(root, "store", "info", "--json")
    info = json.loads(p.stdout)
    assert info["volumes"] == {"attached": 1} and info["templates"] == 1 and len(info["quarantine"]) == 1
    p = cowdisk_cli(root, "store", "destroy", "--yes")
    assert p.returncode == 7 and "v" in p.stderr, p.stderr  # attached: refused
    p = cowdisk_cli(root, "store", "destroy", "--yes", "--force", "--json")
    assert p.returncode == 0, p.stderr
    assert not os.path.exists(root)
    assert_same_host(before)
