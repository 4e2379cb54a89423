"""Two hosts, one cluster: two stores with their own roots (standing for two hosts) share
one pool and namespace. The template is written into the cluster once; a volume
checkpointed on A is attached on B at the backend level (the store has no "restore a
volume it does not know" yet: docs/rbd.md); while B holds it, A's restore is refused
naming B; once B's host is dead (its mapping daemon killed, its watch gone), A takes it
over explicitly (fencing: B's clients are blocklisted) and restores it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from cowdisk.backends import TemplateRef, VolumeCtx
from cowdisk.errors import InUse
from cowdisk.store import Store
from testutil import MiB, ceph_options, make_tree, rbd_images, read_at, write_at

pytestmark = pytest.mark.root


def image_id(opts: dict[str, str], image: str) -> str:
    """The image's id as the rbd tool reports it (a rewritten image gets a new one)."""
    out = subprocess.run(["rbd", "-c", opts["conf"], "info", "-p", opts["pool"], "--namespace", opts["namespace"],
                          image, "--format", "json"], capture_output=True, text=True, check=True).stdout
    return json.loads(out)["id"]


def test_checkpoint_on_a_restore_on_b_and_take_over(tmp_path) -> None:
    opts = ceph_options()
    a = Store(str(tmp_path / "host-a"), backend="rbd", backend_options=opts)
    b = Store(str(tmp_path / "host-b"), backend="rbd", backend_options=opts)
    try:
        t = a.build_template(make_tree(str(tmp_path / "tree")), "base")
        v = a.create_volume("vm1", "base")
        tid = image_id(opts, f"cowdisk-t-{t.id}")
        write_at(v.link, 7 * MiB, b"from-a".ljust(4096, b"."))
        a.checkpoint("vm1")

        # B knows the template by the same digest: its volumes clone the image A wrote
        bt = b.import_template(t.path, "base", adopt=True)
        assert bt.id == t.id
        b.create_volume("other", "base")
        assert image_id(opts, f"cowdisk-t-{t.id}") == tid, "B wrote the template again"

        # B attaches A's checkpointed volume: the bytes are in the cluster, nothing is copied
        ctx = VolumeCtx(id="vm1", template=TemplateRef(t.id, bt.path, bt.size), data_dir=b.vol_dir("vm1"),
                        tag=b.tag, dm_name="")
        dev = b.backend.attach(ctx)
        assert read_at(dev, 7 * MiB, 4096) == b"from-a".ljust(4096, b".")
        write_at(dev, 8 * MiB, b"from-b".ljust(4096, b"."))
        assert b.backend.holder_of("vm1") == b.backend.holder

        # A may not attach it while B holds it: the error names B and its live client
        with pytest.raises(InUse) as ei:
            a.restore("vm1")
        assert b.tag in str(ei.value) and "live client" in str(ei.value), ei.value
        assert a.volume("vm1").state == "checkpointed"

        # B's host dies: its mapping daemon is killed, its watch goes with it
        pid = int(open(os.path.join(b.vol_dir("vm1"), "qsd.pid")).read())
        os.kill(pid, signal.SIGKILL)
        end = time.monotonic() + 60
        while b.backend.watchers("vm1") and time.monotonic() < end:
            time.sleep(0.2)
        with pytest.raises(InUse) as ei:
            a.restore("vm1")
        assert "no client of it is alive" in str(ei.value), ei.value

        # the explicit fencing step, then A restores it with B's write in it
        assert a.backend.take_over("vm1") == b.backend.holder
        r = a.restore("vm1")
        assert read_at(r.link, 8 * MiB, 4096) == b"from-b".ljust(4096, b".")
        assert read_at(r.link, 7 * MiB, 4096) == b"from-a".ljust(4096, b".")

        # B cleans its dead mapping up; it no longer holds the volume, so A's hold stays
        for obj in list(b.backend.scan()):
            b.backend.release(obj)
        assert a.backend.holder_of("vm1") == a.backend.holder
    finally:
        b.destroy()
        a.destroy()
        a.close()
        b.close()
    assert rbd_images(opts) == []
