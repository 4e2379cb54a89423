"""The randomized fault harness (tests/faults/harness.py) on the lab's device-mapper
backends (testutil.LAB_BACKENDS): random operations SIGKILLed at random moments against a
real device-mapper, recovered, the invariants checked (dm devices and loops from sysfs).
At least 50 kills per backend per run; ``bench/faults.py`` in the lab runs more."""

from __future__ import annotations

import pytest

from faults.harness import Harness

pytestmark = pytest.mark.lab

KILLS = 50


def test_random_kills_dm(backend, store, tmp_path) -> None:
    store.close()  # the children open their own; none may inherit an open SQLite connection
    h = Harness(store.root, backend, str(tmp_path / "work"))
    try:
        c = h.run(KILLS)
    except BaseException:
        h.clear()
        raise
    print(c.line())
    assert c.violations == []
    assert c.kills >= KILLS, c.line()
    assert c.mid_op >= KILLS // 2, c.line()
    assert c.intents_left >= KILLS // 10, c.line()
