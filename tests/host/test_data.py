"""Data through a mounted volume (suites/data.py) on copy, reflink (xfs, btrfs) and pool, on this host's kernel."""

import pytest

from suites.data import (  # noqa: F401  (collected here, parametrized by backend)
    test_ext4_data_survives_checkpoint_and_restore_under_new_id,
)

pytestmark = pytest.mark.root
