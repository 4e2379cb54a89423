"""The conformance suite (suites/conformance.py) on dm-snapshot, against a real device-mapper in the kernel lab."""

import pytest

from suites.conformance import (  # noqa: F401  (collected here, parametrized by backend)
    test_lifecycle,
    test_restore_new_id,
    test_fork_flatten_usage,
    test_fork_into_n_at_one_instant,
    test_fork_resets_identity,
    test_larger_volume,
    test_bad_input,
)

pytestmark = pytest.mark.lab
