"""Two hosts, one cluster: two stores with their own roots (standing for two hosts) share
one pool and namespace, through the Store, the command line and the daemon.

* A volume checkpointed on A is adopted and restored on B, which never saw the template's
  file (B knows the template by digest; nothing is copied, the template is written once);
  A may then only forget it.
* While A holds a volume attached, B's adopt is refused naming A's store and host;
  ``--steal`` fences A (its clients are blocklisted: A's writes never reach the volume).
* A's host dies (its daemon and its mapping daemon killed -9): B's restore is refused
  naming A, ``restore --adopt --steal`` takes the volume over, and when A's store comes
  back its attach is refused (the volume is B's), and removing it there only forgets it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cowdisk.errors import InUse
from cowdisk.store import Store
from daemonutil import Daemon, env
from testutil import MiB, ceph_options, make_tree, rbd_images, read_at, two_rbd_hosts, write_at

pytestmark = pytest.mark.root

A_DATA = b"from-a".ljust(4096, b".")
B_DATA = b"from-b".ljust(4096, b".")


def image_id(opts: dict[str, str], image: str) -> str:
    """The image's id as the rbd tool reports it (a rewritten image gets a new one)."""
    out = subprocess.run(["rbd", "-c", opts["conf"], "info", "-p", opts["pool"], "--namespace", opts["namespace"],
                          image, "--format", "json"], capture_output=True, text=True, check=True).stdout
    return str(json.loads(out)["id"])


def image_meta(opts: dict[str, str], image: str) -> dict[str, str]:
    """The image's metadata as the rbd tool reports it (the witness of owner and holder)."""
    out = subprocess.run(["rbd", "-c", opts["conf"], "image-meta", "list", "-p", opts["pool"], "--namespace",
                          opts["namespace"], image, "--format", "json"], capture_output=True, text=True,
                         check=True).stdout
    return dict(json.loads(out or "{}"))


def qsd_pid(store: Store, vid: str) -> int:
    with open(os.path.join(store.vol_dir(vid), "qsd.pid")) as f:
        return int(f.read())


def cli(root: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cowdisk", "--root", root, *args], capture_output=True,
                          text=True, env=env(), timeout=300)


def test_checkpointed_on_a_adopted_and_restored_on_b(tmp_path) -> None:
    opts = ceph_options()
    with two_rbd_hosts(str(tmp_path), opts) as (a, b):
        t = a.build_template(make_tree(str(tmp_path / "tree")), "base")
        v = a.create_volume("vm1", "base")
        tpl_image = image_id(opts, f"cowdisk-t-{t.id}")
        write_at(v.link, 7 * MiB, A_DATA)
        a.checkpoint("vm1")

        # what B sees in the pool: A's checkpointed volume, held by no one, never adopted (its
        # owner is the store that made it, recorded only once a store adopts it)
        (sv,) = b.shared_volumes()
        assert (sv.id, sv.template_id, sv.template_digest, sv.owner, sv.holder) == ("vm1", t.id, t.digest, "", "")

        # B adopts it through the command line: B has no file of the template, it knows it by digest
        r = cli(b.root, "--json", "volume", "shared")
        assert r.returncode == 0, r.stderr
        assert [(v["id"], v["holder"]) for v in json.loads(r.stdout)["volumes"]] == [("vm1", "")]
        r = cli(b.root, "--json", "volume", "adopt", "vm1")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["state"] == "checkpointed"
        # B's registry is lost: the manifests bring back the volume and the template it knows by digest only
        b.close()
        os.unlink(os.path.join(b.root, "registry.db"))
        b, rebuilt, _ = Store.rebuild_registry(b.root)
        assert sorted(rebuilt.adopted) == ["template " + t.id, "volume vm1 (checkpointed)"], rebuilt
        bt = b.template(t.id)
        assert (bt.path, bt.digest) == ("", t.digest)
        assert image_meta(opts, "cowdisk-v-vm1")["cowdisk.owner"] == b.backend.holder  # type: ignore[attr-defined]

        # restored on B: A's bytes, nothing copied; B's write lands in the cluster
        rv = b.restore("vm1")
        assert read_at(rv.link, 7 * MiB, 4096) == A_DATA
        write_at(rv.link, 8 * MiB, B_DATA)
        # a new volume on B from the template it knows by digest only: A's image, not written again
        other = b.create_volume("other", t.id)
        assert read_at(other.link, 7 * MiB, 4096) != A_DATA
        assert image_id(opts, f"cowdisk-t-{t.id}") == tpl_image, "B wrote the template again"

        # A may no longer attach it (B owns it now) and removing it on A only forgets it
        with pytest.raises(InUse) as ei:
            a.restore("vm1")
        assert b.tag in str(ei.value) and "adopted there" in str(ei.value), ei.value
        assert a.volume("vm1").state == "checkpointed"
        a.remove_volume("vm1")
        assert "cowdisk-v-vm1" in rbd_images(opts)
        assert read_at(rv.link, 8 * MiB, 4096) == B_DATA

        b.checkpoint("vm1")
        b.remove_volume("vm1")
        assert "cowdisk-v-vm1" not in rbd_images(opts)


def test_steal_fences_a_live_holder(tmp_path) -> None:
    """A still has the volume attached (its mapping daemon is a live client): B's adopt is
    refused naming A; with steal A's client is blocklisted, and A's writes never reach
    the volume B now has."""
    opts = ceph_options()
    with two_rbd_hosts(str(tmp_path), opts) as (a, b):
        a.build_template(make_tree(str(tmp_path / "tree")), "base")
        v = a.create_volume("vm1", "base")
        write_at(v.link, 7 * MiB, A_DATA)

        with pytest.raises(InUse) as ei:
            b.adopt_volume("vm1")
        host = a.backend.holder.rpartition("@")[2]  # type: ignore[attr-defined]
        assert f"store {a.tag} on host {host}" in str(ei.value) and "1 live client" in str(ei.value), ei.value
        assert b.volumes() == [] and "cowdisk.owner" not in image_meta(opts, "cowdisk-v-vm1")

        rv = b.restore("vm1", adopt=True, steal=True)
        assert rv.state == "attached" and read_at(rv.link, 7 * MiB, 4096) == A_DATA
        write_at(rv.link, 8 * MiB, B_DATA)

        # A's client is fenced: its write fails or is lost, never reaches B's volume
        with pytest.raises(OSError):
            write_at(v.link, 9 * MiB, A_DATA)
        assert read_at(rv.link, 9 * MiB, 4096) == b"\0" * 4096
        assert read_at(rv.link, 8 * MiB, 4096) == B_DATA

        # A lets go: its checkpoint and removal leave B's volume alone
        a.checkpoint("vm1", deadline_s=30)
        a.remove_volume("vm1")
        assert image_meta(opts, "cowdisk-v-vm1")["cowdisk.holder"] == b.backend.holder  # type: ignore[attr-defined]
        assert read_at(rv.link, 7 * MiB, 4096) == A_DATA


def test_dead_host_taken_over_through_cli_and_daemon(tmp_path) -> None:
    """Host A is a daemon: it creates the volume and dies (daemon and mapping daemon killed
    -9). B's restore through the command line is refused naming A; B's daemon takes it over
    with adopt + steal; A's store, back up, cannot attach it and only forgets it."""
    opts = ceph_options()
    a = Store(str(tmp_path / "host-a"), backend="rbd", backend_options=opts)
    a.build_template(make_tree(str(tmp_path / "tree")), "base")
    a.close()
    b = Store(str(tmp_path / "host-b"), backend="rbd", backend_options=opts)
    b.close()
    da = Daemon(a.root, str(tmp_path / "a.sock"), backend="rbd").start()
    db = Daemon(b.root, str(tmp_path / "b.sock"), backend="rbd")
    try:
        v = da.client.create_volume("vm1", "base")
        write_at(v.link, 7 * MiB, A_DATA)
        holder_a = image_meta(opts, "cowdisk-v-vm1")["cowdisk.holder"]
        assert holder_a.startswith(a.tag + "@")
        qsd = qsd_pid(a, "vm1")
        # host A dies
        assert da.proc is not None
        os.kill(da.proc.pid, signal.SIGKILL)
        os.kill(qsd, signal.SIGKILL)
        da.proc.wait(30)
        end = time.monotonic() + 30
        while os.path.exists(f"/proc/{qsd}") and time.monotonic() < end:
            time.sleep(0.05)

        r = cli(b.root, "volume", "restore", "vm1", "--adopt")
        assert r.returncode == 6, (r.returncode, r.stderr)
        assert f"held by store {a.tag} on host {holder_a.rpartition('@')[2]}" in r.stderr, r.stderr
        assert "--steal" in r.stderr, r.stderr

        db.start()
        with pytest.raises(InUse) as ei:
            db.client.restore("vm1", adopt=True)
        assert a.tag in str(ei.value), ei.value
        rv = db.client.restore("vm1", adopt=True, steal=True)
        assert rv.state == "attached" and read_at(rv.link, 7 * MiB, 4096) == A_DATA
        write_at(rv.link, 8 * MiB, B_DATA)
        (sv,) = db.client.shared_volumes()
        assert sv.owner.startswith(b.tag + "@") and sv.holder.startswith(b.tag + "@")

        # A's store comes back: recovery cannot attach vm1 again (B owns it), says so, keeps it
        a = Store(a.root)
        va = a.volume("vm1")
        assert va.state == "error" and b.tag in (va.error or ""), va
        a.remove_volume("vm1")  # forgets it here; B's volume stays
        assert read_at(rv.link, 8 * MiB, 4096) == B_DATA
        a.close()
    finally:
        for d in (da, db):
            if d.proc is not None and d.proc.poll() is None:
                d.proc.send_signal(signal.SIGTERM)
                d.proc.wait(60)
        for root in (b.root, a.root):
            s = Store(root)
            s.destroy()
            s.close()
    assert rbd_images(opts) == []
