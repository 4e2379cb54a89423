"""Scripted faults (tests/faults/scripted.py) on the host backends: a store's registry,
links, volume directories, filesystem and pool broken from outside, one fault at a time.

Faults whose store fix has not landed yet are collected only when
``COWDISK_FAULTS_PENDING`` names them (/tmp/harness-findings.md says which and why)."""

from __future__ import annotations

import pytest

from faults import scripted
from faults.harness import pending
from faults.scripted import test_link_dir_removed_by_hand, test_volume_dir_removed_by_hand  # noqa: F401

pytestmark = pytest.mark.root


@pytest.mark.backends("pool")
@pytest.mark.parametrize("how", ["unmounted", "loop detached", "lazily unmounted with a holder"])
def test_pool_pulled(backend, store, tmp_path, how) -> None:
    scripted.pool_pulled(store, tmp_path, how)


PENDING = {
    "registry-lost": "test_registry_lost",
    "wal-deleted": "test_wal_deleted",
    "full-filesystem": "test_full_filesystem",
    "read-only-root": "test_read_only_root",
}
"""Finding name (COWDISK_FAULTS_PENDING) -> the test it holds back while open."""


@pytest.mark.parametrize("how", ["deleted", "truncated", "corrupted"])
def _registry_lost(backend, store, tmp_path, how) -> None:
    scripted.registry_lost(backend, store, tmp_path, how)


@pytest.mark.backends("copy", "pool")
def _wal_deleted(backend, store, tmp_path) -> None:
    scripted.wal_deleted(backend, store, tmp_path)


def _full_filesystem(tmp_path) -> None:
    scripted.full_filesystem(tmp_path, scripted.scratch_factory(str(tmp_path)))


def _read_only_root(tmp_path) -> None:
    scripted.read_only_root(tmp_path, scripted.scratch_factory(str(tmp_path)))


_TESTS = {
    "test_registry_lost": _registry_lost,
    "test_wal_deleted": _wal_deleted,
    "test_full_filesystem": _full_filesystem,
    "test_read_only_root": _read_only_root,
}
for _finding, _name in PENDING.items():
    if pending(_finding):
        globals()[_name] = _TESTS[_name]
