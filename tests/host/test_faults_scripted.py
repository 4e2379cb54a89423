"""Scripted faults (tests/faults/scripted.py) on the host backends: a store's registry,
links, volume directories, filesystem and pool broken from outside, one fault at a time."""

from __future__ import annotations

import pytest

from faults import scripted
from faults.scripted import test_link_dir_removed_by_hand, test_volume_dir_removed_by_hand  # noqa: F401

pytestmark = pytest.mark.root


@pytest.mark.backends("pool")
@pytest.mark.parametrize("how", ["unmounted", "loop detached", "lazily unmounted with a holder"])
def test_pool_pulled(backend, store, tmp_path, how) -> None:
    scripted.pool_pulled(store, tmp_path, how)


@pytest.mark.parametrize("how", ["deleted", "truncated", "corrupted"])
def test_registry_lost(backend, store, tmp_path, how) -> None:
    scripted.registry_lost(backend, store, tmp_path, how)


@pytest.mark.backends("copy", "pool")
def test_wal_deleted(backend, store, tmp_path) -> None:
    scripted.wal_deleted(backend, store, tmp_path)


def test_full_filesystem(tmp_path) -> None:
    scripted.full_filesystem(tmp_path, scripted.scratch_factory(str(tmp_path)))


def test_read_only_root(tmp_path) -> None:
    scripted.read_only_root(tmp_path, scripted.scratch_factory(str(tmp_path)))
