"""The random-kill harness over a lazy template's chunk cache (tests/faults/lazy.py):
reads, prefetches, evictions, gc's trims and NBD reads through the served nbdkit,
SIGKILLed at random moments (nbdkit too, now and then), the cache checked whole after each
round. No object store: the chunks come from a local source through the cache's own fetch
path. ``bench/faults.py --lazy ROUNDS`` runs it longer. ``COWDISK_FAULT_SEED=<seed>`` (or
``--fault-seed``) replays a seed a failure printed."""

from __future__ import annotations

import pytest

from faults.lazy import kill_at_random

pytestmark = [pytest.mark.root, pytest.mark.backends("copy")]

ROUNDS = 50


def test_random_kills_over_the_chunk_cache(store, tmp_path) -> None:
    kill_at_random(store, str(tmp_path / "work"), ROUNDS)
