"""Crash-point matrix on dm-snapshot against a real device-mapper (lab tier)."""

from __future__ import annotations

import subprocess

import pytest

import crashmatrix
from testutil import assert_same_host, host_state

pytestmark = pytest.mark.lab


def dm_names(prefix: str) -> list[str]:
    """The outside witness: what `dmsetup ls` shows with the store's prefix."""
    out = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


@pytest.mark.parametrize("case", crashmatrix.cases("dm-snapshot"), ids=lambda c: f"{c.op}:{c.step}")
def test_crash_point_dm(case: crashmatrix.Case, tmp_path) -> None:
    before = host_state()
    crashmatrix.run_case(str(tmp_path / "store"), "dm-snapshot", str(tmp_path / "tree"), case, dm_names)
    assert_same_host(before)
