"""Jail staging (suites/jail.py) on copy, reflink (xfs, btrfs) and pool, on this host's kernel."""

import pytest

from suites.jail import (  # noqa: F401  (collected here, parametrized by backend)
    test_jail,
    test_stale_entry_at_the_jail_path_is_replaced,
    test_jail_on_another_filesystem_is_refused,
)

pytestmark = pytest.mark.root
