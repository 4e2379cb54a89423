"""The crash-point matrix (tests/crashmatrix.py) on rbd: every operation SIGKILLed after
each of its steps and of the rbd backend's declared steps (template, clone, hold, map,
snapshot), recovery, then the cluster holds exactly the images the registry needs and a
FUSE mapping per attached volume, nothing more."""

from __future__ import annotations

import pytest

import crashmatrix
from testutil import assert_same_host, ceph_options, host_state, rbd_images

pytestmark = pytest.mark.root


@pytest.mark.parametrize("case", crashmatrix.cases("rbd"), ids=lambda c: f"{c.op}:{c.step}")
def test_crash_point_rbd(case: crashmatrix.Case, tmp_path) -> None:
    before = host_state()
    opts = ceph_options()
    crashmatrix.run_case(str(tmp_path / "store"), "rbd", str(tmp_path / "tree"), case, lambda p: [], opts)
    assert rbd_images(opts) == [], "the store's destroy left images in the cluster"
    assert_same_host(before)
