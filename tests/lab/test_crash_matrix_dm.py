"""Crash-point matrix on both device-mapper backends against a real device-mapper (lab tier).

dm-snapshot: crashmatrix.check witnesses its dm devices and loops itself. dm-thin: the
pool's two loops and its device are store-wide (they stay while the store exists), so
before check runs, :func:`thin_witness` opens the store (recovery runs) and checks from
outside: ``dmsetup ls`` shows the pool and exactly one device per attached volume, the
only loops of the store are the pool's two, and ``thin_ls`` on a metadata snapshot finds
exactly one thin device per volume plus the template's (no leaked thin id).
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

import crashmatrix
from testutil import LAB_BACKENDS, assert_same_host, host_state
from cowdisk.store import Store

pytestmark = pytest.mark.lab


def dm_names(prefix: str) -> list[str]:
    """The outside witness: what `dmsetup ls` shows with the store's prefix."""
    out = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def thin_ids(pool: str, meta_dev: str) -> list[int]:
    """Thin device ids in the live pool's metadata, read by thin_ls from a metadata snapshot."""
    subprocess.run(["dmsetup", "message", pool, "0", "reserve_metadata_snap"], check=True, capture_output=True)
    try:
        out = subprocess.run(["thin_ls", "--no-headers", "-m", "-o", "DEV", meta_dev], capture_output=True,
                             text=True, check=True).stdout
    finally:
        subprocess.run(["dmsetup", "message", pool, "0", "release_metadata_snap"], check=True, capture_output=True)
    return sorted(int(w) for w in out.split())


def thin_witness(root: str) -> None:
    s = Store(root)  # recovery runs here
    try:
        pool = s.dm_prefix + ".pool"
        vols = s.volumes()
        attached = [v.id for v in vols if v.state == "attached"]
        assert sorted(dm_names(s.dm_prefix)) == sorted([pool] + [s.dm_prefix + v for v in attached])
        loops = crashmatrix.store_loops(root)
        assert sorted(li.backing_file.rsplit("/", 1)[1] for li in loops) == ["data.img", "meta.img"], loops
        meta = next(li for li in loops if li.backing_file.endswith("/meta.img"))
        assert len(thin_ids(pool, meta.path)) == len(vols) + len(s.templates()), (vols, s.templates())
    finally:
        s.close()


CASES = [(b, c) for b in LAB_BACKENDS for c in crashmatrix.cases(b)]


@pytest.mark.parametrize("backend,case", CASES, ids=[f"{b}-{c.op}:{c.step}" for b, c in CASES])
def test_crash_point_dm(backend: str, case: crashmatrix.Case, tmp_path, monkeypatch) -> None:
    before = host_state()
    root, tree = str(tmp_path / "store"), str(tmp_path / "tree")
    if backend == "dm-thin":
        crashmatrix.setup(root, backend, tree, case)
        status = crashmatrix.crash(root, case)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
            f"{case}: the child was not killed at the crash point (status {status}): the step was never reached")
        thin_witness(root)
        # check()'s own witness: no loop of the store but the pool's two
        real = crashmatrix.store_loops
        monkeypatch.setattr(crashmatrix, "store_loops",
                            lambda r: [li for li in real(r) if "/thin/" not in li.backing_file])
        crashmatrix.check(root, case, backend, dm_names)
    else:
        crashmatrix.run_case(root, backend, tree, case, dm_names)
    assert_same_host(before)
