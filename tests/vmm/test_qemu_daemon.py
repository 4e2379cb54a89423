"""The VMM end-to-end test (test_qemu_cowdisk.py) run through cowdiskd: every store call of
the test goes over the daemon's socket (cowdisk.client.Client, the Store's API), while QEMU
boots, checkpoints and restores two sandboxes from one checkpoint on the volumes it made."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from cowdisk.store import Store
from daemonutil import Daemon
from vmm.test_qemu_cowdisk import guest, test_two_sandboxes_restored_from_one_checkpoint, work  # noqa: F401

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices, volumes)"),
]


class DaemonStore:
    """The daemon's Client, plus what the test reads from a Store: its dm prefix, and a
    destroy that stops the daemon (exit 0) and destroys the store."""

    def __init__(self, d: Daemon) -> None:
        self._d = d
        self._c = d.client

    def __getattr__(self, name: str):
        return getattr(self._c, name)

    @property
    def dm_prefix(self) -> str:
        return f"cowdisk-{self._c.id}-"

    def destroy(self) -> None:
        if self._d.proc is not None and self._d.proc.poll() is None:
            assert self._d.stop() == 0, self._d.log()
        with Store(self._d.root) as s:
            s.destroy()


@pytest.fixture
def store(work, guest):  # noqa: F811 - the fixtures of test_qemu_cowdisk, imported above
    sockdir = tempfile.mkdtemp(prefix="cdd-", dir="/tmp")
    d = Daemon(str(work / "store"), os.path.join(sockdir, "d.sock"),
               "--import-root", os.path.dirname(os.path.abspath(guest.rootfs_dir)),
               backend=os.environ.get("COWDISK_TEST_BACKEND", "auto"))
    try:
        with d:
            d.start(timeout=120)
            s = DaemonStore(d)
            yield s
            s.destroy()
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


__all__ = ["test_two_sandboxes_restored_from_one_checkpoint"]
