"""Bad input (suites/bad_input.py) on rbd."""

import pytest

from suites.bad_input import test_invalid_ids, test_missing_template, test_template_changed_on_disk  # noqa: F401

pytestmark = pytest.mark.root
