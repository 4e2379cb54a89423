"""The backend conformance suite on dm-snapshot, against a real device-mapper (lab tier)."""

from __future__ import annotations

import os
import subprocess
from typing import Iterator

import pytest

import conformance
from cowdisk.store import Store
from testutil import managed_store

pytestmark = pytest.mark.lab


@pytest.fixture
def store(tmp_path) -> Iterator[Store]:
    with managed_store(str(tmp_path / "store"), "dm-snapshot") as s:
        yield s


def test_lifecycle(store: Store, tmp_path) -> None:
    conformance.check_lifecycle(store, str(tmp_path / "tree"))


def test_restore_new_id(store: Store, tmp_path) -> None:
    conformance.check_restore_new_id(store, str(tmp_path / "tree"))


def test_fork_flatten_usage(store: Store, tmp_path) -> None:
    conformance.check_fork_flatten_usage(store, str(tmp_path / "tree"))


def test_bad_input(store: Store, tmp_path) -> None:
    conformance.check_bad_input(store, str(tmp_path / "tree"), str(tmp_path))


def test_one_template_loop_shared_and_witnessed(store: Store, tmp_path) -> None:
    """Three volumes: one read-only template loop; dmsetup and losetup see exactly what cowdisk made."""
    t = store.build_template(conformance.make_tree(str(tmp_path / "tree")), "base")
    vols = [store.create_volume(f"v{i}", "base") for i in range(3)]
    out = subprocess.run(["losetup", "--list", "--noheadings", "-O", "NAME,RO,BACK-FILE"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    tl = [line for line in out if line.split()[2] == t.path]
    assert len(tl) == 1 and tl[0].split()[1] == "1", out
    ls = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True, check=True).stdout
    mine = sorted(line.split()[0] for line in ls.splitlines() if line.startswith(store.dm_prefix))
    assert mine == [store.dm_prefix + f"v{i}" for i in range(3)]
    for v in vols:
        table = subprocess.run(["dmsetup", "table", store.dm_prefix + v.id], capture_output=True, text=True,
                               check=True).stdout.split()
        assert table[2] == "snapshot" and table[5:] == ["P", "8"], table
        status = subprocess.run(["dmsetup", "status", store.dm_prefix + v.id], capture_output=True, text=True,
                                check=True).stdout.split()
        assert status[3].startswith("16/"), status
        assert os.path.realpath(v.link) == os.path.realpath(v.device)
    for v in vols:
        store.remove_volume(v.id)
    out = subprocess.run(["losetup", "--list", "--noheadings", "-O", "BACK-FILE"], capture_output=True,
                         text=True, check=True).stdout
    assert t.path not in out, "template loop outlived its last volume"
