"""Concurrency (suites/concurrency.py) on copy, reflink (xfs, btrfs) and pool, on this host's kernel."""

import pytest

from suites.concurrency import (  # noqa: F401  (collected here, parametrized by backend)
    test_concurrent_processes,
    test_threads_share_one_store,
)

pytestmark = pytest.mark.root
