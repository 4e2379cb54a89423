"""Kept for tests/crashmatrix.py, which imports its data helpers from here.

The helpers live in testutil.py and the conformance suite in suites/conformance.py;
import from there. This module goes once crashmatrix.py imports testutil.
"""

from testutil import MiB, debugfs_cat, make_tree, read_at, sha, write_at

__all__ = ["MiB", "debugfs_cat", "make_tree", "read_at", "sha", "write_at"]
