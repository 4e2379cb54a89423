"""Bad input (suites/bad_input.py) on dm-snapshot, against a real device-mapper in the kernel lab."""

import pytest

from suites.bad_input import (  # noqa: F401  (collected here, parametrized by backend)
    test_invalid_ids,
    test_missing_template,
    test_refused_calls_leave_no_lock_file,
    test_template_changed_on_disk,
)

pytestmark = pytest.mark.lab
