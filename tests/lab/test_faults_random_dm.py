"""The randomized fault harness (tests/faults/harness.py) on the lab's device-mapper
backends (testutil.LAB_BACKENDS): random operations SIGKILLed at random moments against a
real device-mapper, recovered, the invariants checked (dm devices and loops from sysfs).
At least 50 kills per backend per run; ``bench/faults.py`` in the lab runs more."""

from __future__ import annotations

import pytest

from faults.harness import kill_at_random

pytestmark = pytest.mark.lab

KILLS = 50


def test_random_kills_dm(backend, store, tmp_path) -> None:
    kill_at_random(store, backend, str(tmp_path / "work"), KILLS)
