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
        leaked = _end_mappings(c.conf)
        problems = c.down()
        assert not problems, problems
        assert not leaked, f"FUSE mappings left running at the end of the session: {leaked}"


@pytest.fixture(scope="session")
def rgw(ceph_cluster):
    """The session cluster's RADOS Gateway (S3), started on first use (a few seconds): its
    remote config (endpoint, keys, bucket). A test that stops it starts it again."""
    cfg = ceph_cluster.start_rgw()
    yield cfg
    ceph_cluster.stop_rgw()


@pytest.fixture
def hosts(tmp_path, rgw):
    """Stores A and B (two hosts), each with the remote config and one fresh prefix in the
    bucket; destroyed afterwards (lazy templates' servers and caches included)."""
    import secrets

    from cowdisk.store import Store
    from remoteutil import write_config

    prefix = f"t-{secrets.token_hex(4)}"
    stores = []
    for name in ("host-a", "host-b"):
        root = str(tmp_path / name)
        write_config(root, rgw, prefix)
        stores.append(Store(root, backend="copy"))
    yield stores[0], stores[1], prefix
    for s in stores:
        s.destroy()
        s.close()


def _end_mappings(conf: str) -> list[str]:
    """End the qemu-storage-daemons still serving images of this session's cluster (a
    failed test left them): SIGTERM by PID, found by the cluster's conf path in their
    command line; their FUSE mounts go with them (or are detached). Returns them."""
    import signal

    from cowdisk.kernel import mount as kmount

    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == "qemu-storage-daemon" and any(f"conf={conf}," in a for a in argv):
            mnt = next((a.split("mountpoint=", 1)[1].split(",")[0] for a in argv if "mountpoint=" in a), "")
            found.append(f"PID {pid} {mnt}")
            os.kill(int(pid), signal.SIGTERM)
            time.sleep(0.2)
            if mnt and kmount.mounted_at(mnt):
                kmount.umount(mnt, kmount.MNT_DETACH)
    return found
