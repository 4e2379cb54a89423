"""The VMM end-to-end test (tests/vmm/test_qemu_cowdisk.py) on a dm-thin volume, in the lab.

QEMU (TCG) boots the test guest from a dm-thin volume inside the kernel lab's guest (itself
QEMU TCG: nested emulation), the guest writes, QEMU checkpoints, the volume is checkpointed
and restored twice as new ids (thin snapshots), two QEMUs resume from the same state on
them; the guests' writes are in the volumes, the checkpoint and the template unchanged
(the scenario's own assertions). On top, what only dm-thin promises: a restore allocates
no data block in the pool (``dmsetup status``, an outside witness).

Nested TCG makes this slow (minutes; docs/vmm.md, "In the kernel lab"), so it is not in the
default lab tier: it runs only with ``COWDISK_NESTED_VMM=1`` (tests/conftest.py deselects it
otherwise)::

    COWDISK_NESTED_VMM=1 python3 -m pytest -q tests/lab/test_vmm_dm.py --lab-timeout 1800
"""

from __future__ import annotations

import subprocess

import pytest

from cowdisk.store import Store
from vmm.test_qemu_cowdisk import guest, test_two_sandboxes_restored_from_one_checkpoint, work  # noqa: F401

pytestmark = [pytest.mark.lab, pytest.mark.nested_vmm]


def pool_data_used(store: Store) -> int:
    """Data blocks the store's thin pool has mapped, from `dmsetup status`."""
    out = subprocess.run(["dmsetup", "status", store.dm_prefix + ".pool"], capture_output=True, text=True,
                         check=True).stdout.split()
    return int(out[5].split("/")[0])


class ThinWatch:
    """The Store, with the pool's data blocks read around each restore."""

    def __init__(self, s: Store) -> None:
        self._s = s
        self.restores: list[tuple[str, int]] = []

    def __getattr__(self, name: str):
        return getattr(self._s, name)

    def restore(self, vid: str, new_id: str | None = None, **kw):
        before = pool_data_used(self._s)
        v = self._s.restore(vid, new_id, **kw)
        self.restores.append((new_id or vid, pool_data_used(self._s) - before))
        return v


@pytest.fixture
def store(work):  # noqa: F811 - test_qemu_cowdisk's work fixture, imported above
    s = Store(str(work / "store"), backend="dm-thin")
    w = ThinWatch(s)
    try:
        yield w
    finally:
        try:
            s.destroy()
        finally:
            s.close()
    # both restores were thin snapshots: the first (no VM running) allocated nothing; the
    # second at most what the running sandbox B's guest flushed meanwhile (a copy of the
    # template's data would be tens of blocks)
    assert [n for n, _ in w.restores] == ["vm-b", "vm-c"], w.restores
    assert w.restores[0][1] == 0, w.restores
    assert w.restores[1][1] <= 4, w.restores
    print(f"VMM-THIN-RESTORES {w.restores}")


__all__ = ["test_two_sandboxes_restored_from_one_checkpoint"]
