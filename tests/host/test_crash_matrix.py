"""Crash-point matrix on the file backends (this host's kernel); dm-snapshot runs in the lab."""

from __future__ import annotations

import pytest

import crashmatrix
from cowdisk.store.transition import OPERATIONS
from testutil import assert_same_host, host_state

pytestmark = pytest.mark.root


def test_every_operation_has_a_runner() -> None:
    assert set(crashmatrix.RUNNERS) == set(OPERATIONS)


@pytest.mark.parametrize("case", crashmatrix.cases("copy"), ids=lambda c: f"{c.op}:{c.step}")
def test_crash_point_copy(case: crashmatrix.Case, tmp_path) -> None:
    before = host_state()
    crashmatrix.run_case(str(tmp_path / "store"), "copy", str(tmp_path / "tree"), case, lambda p: [])
    assert_same_host(before)
