"""The failure tests of tests/vmm/test_failures.py on dm-snapshot, in the kernel lab."""

from __future__ import annotations

from typing import Iterator

import pytest

from testutil import managed_store
from vmm.test_failures import (  # noqa: F401  (fixtures and tests reused as they are)
    immutable,
    test_restore_when_the_checkpoint_data_vanished,
    test_restore_with_the_links_root_immutable,
    test_restore_with_the_source_link_dir_immutable,
    tree,
)

import cowdisk.store as store_mod

pytestmark = pytest.mark.lab


@pytest.fixture
def store(tmp_path) -> Iterator[store_mod.Store]:
    with managed_store(str(tmp_path / "store"), "dm-snapshot") as s:
        yield s
