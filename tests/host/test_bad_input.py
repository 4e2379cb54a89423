"""Bad input (suites/bad_input.py) on copy, reflink (xfs, btrfs) and pool, on this host's kernel."""

import pytest

from suites.bad_input import (  # noqa: F401  (collected here, parametrized by backend)
    test_invalid_ids,
    test_missing_template,
    test_refused_calls_leave_no_lock_file,
    test_template_changed_on_disk,
)

pytestmark = pytest.mark.root
