"""The backend conformance suite on this host's kernel: reflink (xfs, btrfs), pool, copy."""

from __future__ import annotations

import os
from typing import Iterator

import pytest

import conformance
from cowdisk.store import Store
from testutil import assert_same_host, host_state, managed_store, scratch_fs

pytestmark = pytest.mark.root

BACKENDS = ["reflink-xfs", "reflink-btrfs", "pool", "copy"]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path) -> Iterator[Store]:
    before = host_state()
    kind = request.param
    if kind.startswith("reflink-"):
        with scratch_fs(kind.split("-", 1)[1]) as mnt, managed_store(os.path.join(mnt, "store"), "reflink") as s:
            yield s
    else:
        with managed_store(str(tmp_path / "store"), kind) as s:
            yield s
    assert_same_host(before)


def test_lifecycle(store: Store, tmp_path) -> None:
    conformance.check_lifecycle(store, str(tmp_path / "tree"))


def test_restore_new_id(store: Store, tmp_path) -> None:
    conformance.check_restore_new_id(store, str(tmp_path / "tree"))


def test_fork_flatten_usage(store: Store, tmp_path) -> None:
    conformance.check_fork_flatten_usage(store, str(tmp_path / "tree"))


def test_bad_input(store: Store, tmp_path) -> None:
    conformance.check_bad_input(store, str(tmp_path / "tree"), str(tmp_path))
