"""Failures under the store (suites/failures.py) on rbd. Not here: ENOSPC of the store's
filesystem (the data is in the cluster) and vanished checkpoint files (an rbd volume has
none: test_rbd.py removes the image behind the store's back instead)."""

import pytest

from suites.failures import (  # noqa: F401  (collected here, parametrized by backend)
    test_remove_while_held_open_by_another_process,
    test_restore_with_the_source_link_dir_immutable,
    test_restore_with_the_links_root_immutable,
)

pytestmark = pytest.mark.root
