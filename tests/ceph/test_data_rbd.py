"""The data suite (suites/data.py) on rbd: an ext4 through the mapped volume."""

import pytest

from suites.data import test_ext4_data_survives_checkpoint_and_restore_under_new_id  # noqa: F401

pytestmark = pytest.mark.root
