"""Concurrency (suites/concurrency.py) on dm-snapshot, against a real device-mapper in the kernel lab."""

import pytest

from suites.concurrency import (  # noqa: F401  (collected here, parametrized by backend)
    test_concurrent_processes,
    test_threads_share_one_store,
)

pytestmark = pytest.mark.lab
