"""Concurrency (suites/concurrency.py) on rbd: processes and threads on one store."""

import pytest

from suites.concurrency import test_concurrent_processes, test_threads_share_one_store  # noqa: F401

pytestmark = pytest.mark.root
