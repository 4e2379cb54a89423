"""Private by default (suites/private.py) on dm-snapshot and dm-thin, in the kernel lab."""

import pytest

from suites.private import test_every_store_file_is_private_to_root, umask0  # noqa: F401

pytestmark = pytest.mark.lab
