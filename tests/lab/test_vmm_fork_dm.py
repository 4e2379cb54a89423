"""The QEMU fork test (tests/vmm/test_qemu_fork.py) on dm-thin, in the kernel lab.

A paused guest's disk, a dm-thin volume its QEMU holds open, is forked into three (one
suspend, one ``create_snap`` of the source, the others from the first child); three
QEMUs resume from the one saved state, each on its child's link (the scenario's own
assertions). On top, what only dm-thin promises: the fork allocates no data block in the
pool (``dmsetup status``, an outside witness).

Nested TCG: opt-in like tests/lab/test_vmm_dm.py::

    COWDISK_NESTED_VMM=1 python3 -m pytest -q tests/lab/test_vmm_fork_dm.py --lab-timeout 1800
"""

from __future__ import annotations

import pytest

from cowdisk.store import Store
from testutil import thin_pool_status
from vmm.test_qemu_fork import guest, test_one_paused_vm_forked_into_three, work  # noqa: F401

pytestmark = [pytest.mark.lab, pytest.mark.nested_vmm]


def pool_data_used(store: Store) -> int:
    return int(thin_pool_status(store)[5].split("/")[0])


class ForkWatch:
    """The Store, with the pool's data blocks read around each fork."""

    def __init__(self, s: Store) -> None:
        self._s = s
        self.forks: list[int] = []

    def __getattr__(self, name: str):
        return getattr(self._s, name)

    def fork(self, vid: str, *a, **kw):
        before = pool_data_used(self._s)
        out = self._s.fork(vid, *a, **kw)
        self.forks.append(pool_data_used(self._s) - before)
        return out


@pytest.fixture
def store(work):  # noqa: F811 - test_qemu_fork's work fixture, imported above
    s = Store(str(work / "store"), backend="dm-thin")
    w = ForkWatch(s)
    try:
        yield w
    finally:
        try:
            s.destroy()
        finally:
            s.close()
    assert w.forks == [0], w.forks  # thin snapshots: the source paused, nothing written meanwhile
    print(f"VMM-THIN-FORKS {w.forks}")


__all__ = ["test_one_paused_vm_forked_into_three"]
