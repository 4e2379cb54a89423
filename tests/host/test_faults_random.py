"""The randomized fault harness (tests/faults/harness.py) on every host backend: random
operations SIGKILLed at random moments, recovered, and the invariants checked after each
recovery. At least 200 kills per backend per run; ``bench/faults.py`` runs thousands.
``COWDISK_FAULT_SEED=<seed>`` (or ``--fault-seed``) replays a seed a failure printed."""

from __future__ import annotations

import pytest

from faults.harness import kill_at_random, replay

pytestmark = pytest.mark.root

KILLS = 200


def test_random_kills(backend, store, tmp_path) -> None:
    kill_at_random(store, backend, str(tmp_path / "work"), KILLS)


CI_SEED = 1555571841
"""Drew, on reflink-btrfs, a restore-as killed between committing its retarget's row and
renaming the source's link (issue 21): the undo left the link pointing at an earlier copy
with no row, seen at round 111 when that copy was checkpointed."""


@pytest.mark.backends("reflink-btrfs")
def test_ci_seed_replayed(backend, store, tmp_path) -> None:
    """Seed 1555571841's rounds 1-111 on reflink-btrfs, with no violation.

    What it pins down: the harness's random stream from that seed (the images, the
    operation drawn each round from the same model, the delay draws as fractions of the
    measured median duration, which recoveries are killed, the blocks written), repeated
    exactly for as long as each kill ends as it did in CI. What it cannot: the kill
    moments, which scale with this host's measured durations, so a kill may land
    elsewhere in its operation (or after it), and from the first kill that ends
    differently the rounds part ways with CI's. The deterministic regression for what
    this seed found is the crash-matrix case restore-as:retarget-row
    (tests/host/test_crash_matrix.py, and in the lab on dm-snapshot and dm-thin)."""
    replay(store, backend, str(tmp_path / "work"), CI_SEED, 111)
