"""The randomized fault harness (tests/faults/harness.py) on every host backend: random
operations SIGKILLed at random moments, recovered, and the invariants checked after each
recovery. At least 200 kills per backend per run; ``bench/faults.py`` runs thousands."""

from __future__ import annotations

import pytest

from faults.harness import Harness

pytestmark = pytest.mark.root

KILLS = 200


def test_random_kills(backend, store, tmp_path) -> None:
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
    # the kills landed inside the operations, not only between them
    assert c.mid_op >= KILLS // 2, c.line()
    assert c.intents_left >= KILLS // 10, c.line()
