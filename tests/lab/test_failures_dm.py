"""Failures under the store (suites/failures.py) on dm-snapshot, against a real device-mapper in the kernel lab."""

import pytest

from suites.failures import (  # noqa: F401  (collected here, parametrized by backend)
    test_enospc_on_store_filesystem_during_create,
    test_remove_while_held_open_by_another_process,
    test_restore_with_the_source_link_dir_immutable,
    test_restore_with_the_links_root_immutable,
    test_restore_when_the_checkpoint_data_vanished,
)

pytestmark = pytest.mark.lab
