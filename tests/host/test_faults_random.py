"""The randomized fault harness (tests/faults/harness.py) on every host backend: random
operations SIGKILLed at random moments, recovered, and the invariants checked after each
recovery. At least 200 kills per backend per run; ``bench/faults.py`` runs thousands."""

from __future__ import annotations

import pytest

from faults.harness import kill_at_random

pytestmark = pytest.mark.root

KILLS = 200


def test_random_kills(backend, store, tmp_path) -> None:
    kill_at_random(store, backend, str(tmp_path / "work"), KILLS)
