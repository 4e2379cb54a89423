"""Jail staging (suites/jail.py) on dm-snapshot, against a real device-mapper in the kernel lab."""

import pytest

from suites.jail import (  # noqa: F401  (collected here, parametrized by backend)
    test_jail,
    test_stale_entry_at_the_jail_path_is_replaced,
)

pytestmark = pytest.mark.lab
