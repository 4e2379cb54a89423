"""The ceph tier: a real single-node Ceph cluster (lab/ceph_cluster.py), started once per
pytest session when a test of this tier runs, torn down at the end (daemons by PID,
files), also on failure; the daemons also die with the pytest process if it is killed.
About 15 s to start on this machine."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import pytest

from testutil import CEPH_ENV

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "lab"))
from ceph_cluster import Cluster  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def ceph_cluster():
    """The session's cluster; its store options are in $COWDISK_TEST_CEPH for the tests
    (and for the processes they fork or start)."""
    d = tempfile.mkdtemp(prefix=f"cowdisk-ceph-{os.getpid()}-")
    c = Cluster(d, die_with_parent=True)
    t0 = time.monotonic()
    opts = c.up()
    sys.stderr.write(f"\nceph test cluster up in {time.monotonic() - t0:.1f} s ({d})\n")
    os.environ[CEPH_ENV] = json.dumps(opts)
    try:
        yield c
    finally:
        os.environ.pop(CEPH_ENV, None)
        problems = c.down()
        assert not problems, problems
