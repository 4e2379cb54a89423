"""Issue 25: a QEMU guest boots on host B from a lazy template B has never seen.

    store A: the tiny guest's ext4 template (plus a padding file the boot never reads), pushed
    store B (a second root: a second host): `template pull --lazy` (the manifest only)
    B, QEMU natively (docs/remote.md, "Booting QEMU over a lazy template"): a qcow2 overlay
      made by qemu-img whose backing file is the lazy template's NBD URL, QEMU's own NBD
      client reading it from B's nbdkit
    the superblock's chunk altered in the bucket while QEMU waits to start the guest: QEMU's
      read of it is EIO, nothing of it is cached; put back, the guest boots (COWDISK-READY)
      and writes
    the boot fetched a fraction of the template's chunks (chunk 0, none of the padding's,
      under half of those holding data); a second guest (its own overlay, the backing given
      with QEMU's reconnect-delay) boots, does not see the first one's write, fetches 0 chunks;
      its server SIGKILLed under it, the keeper starts it again and the guest reads on (its NBD
      client reconnects): 4 MiB of /root/pad, fetched now, hash right in the guest
    witness: the guest's writes are in its overlay (read back with debugfs), the cache holds
      the template's bytes and the bucket is what A pushed, object for object

The host has no device-mapper (volumes over a lazy template are dm-thin and dm-snapshot,
tested in the lab with reads and e2fsck, tests/lab/test_lazy_volume_dm.py): here QEMU is the
whole data path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import shutil
import subprocess
import sys

import pytest

from cowdisk.remote.cache import ChunkCache, read_record
from daemonutil import env
from remoteutil import s3
from testutil import MiB, sha
from vmm import guest as guestlib
from vmm.qemu import Vm, VmError, lazy_overlay, qcow2_drive

pytestmark = pytest.mark.root

PAD = 16 * MiB


@pytest.fixture(scope="module")
def guest():
    for tool in ("qemu-system-x86_64", "qemu-img", "mkfs.ext4", "debugfs"):
        assert shutil.which(tool), f"{tool} missing: run install.sh"
    return guestlib.build()


def guest_image(guest, work) -> str:
    """The guest's rootfs with ``/root/pad`` (16 MiB never read at boot), as a 64 MiB ext4."""
    tree = work / "rootfs"
    shutil.copytree(guest.rootfs_dir, tree, symlinks=True)
    with open(tree / "root" / "pad", "wb") as f:
        f.write(pad_bytes())
    img = guestlib.make_ext4_image(tree, work / "guest.img", size_mib=64)
    shutil.rmtree(tree)
    return str(img)


def pad_bytes() -> bytes:
    """/root/pad: numbered lines, so no chunk of it is alike and it is quick to push."""
    return b"".join(b"cowdisk padding line %012d\n" % i for i in range(PAD // 34))


def pad_chunks(img: str, chunk_size: int) -> set[int]:
    """The chunks holding nothing but /root/pad's blocks (debugfs), which no boot reads."""
    p = subprocess.run(["debugfs", "-R", "blocks /root/pad", img], capture_output=True, text=True, check=True)
    blocks = {int(x) for x in p.stdout.split()}
    h = subprocess.run(["dumpe2fs", "-h", img], capture_output=True, text=True, check=True).stdout
    per = chunk_size // int(re.search(r"^Block size:\s+(\d+)", h, re.M).group(1))
    chunks = {b // per for b in blocks}
    return {c for c in chunks if all(c * per + i in blocks for i in range(per))}


def bucket(rgw, prefix: str) -> dict[str, str]:
    """Every object under ``prefix``: its key and ETag."""
    out = {}
    for page in s3(rgw).get_paginator("list_objects_v2").paginate(Bucket=rgw["bucket"], Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = o["ETag"]
    return out


def test_guest_boots_on_b_from_a_template_only_a_pushed(guest, tmp_path, hosts, rgw):
    import zstandard

    a, b, prefix = hosts
    img = guest_image(guest, tmp_path)
    a.import_template(img, "guest")
    url = a.push_template("guest")["url"]
    pushed = bucket(rgw, prefix)
    # `template pull --lazy` on B, as docs/remote.md runs it: its URL on stdout
    p = subprocess.run([sys.executable, "-m", "cowdisk", "--root", b.root, "-q", "template", "pull", "--lazy", url,
                        "--name", "guest"], capture_output=True, text=True, env=env(), timeout=60)
    assert p.returncode == 0, p.stderr
    served = p.stdout.strip()
    doc = b.lazy_templates()[0]
    cache = doc["cache"]
    assert doc["url"] == served and doc["cached_chunks"] == 0 and b.template("guest").digest == sha(img)
    m = ChunkCache.read_manifest(cache)
    pad = pad_chunks(img, m.chunk_size)

    # the first guest: QEMU's NBD client on the URL `pull --lazy` printed, a qcow2 overlay over
    # it; started paused while the superblock's chunk is altered in the bucket: QEMU's read
    # of it (the one the guest would make first) is EIO, nothing of it is cached
    vm1 = lazy_overlay(served, tmp_path / "vm1.qcow2")
    key0 = f"{prefix}/chunks/{m.chunks[0]}"
    good = s3(rgw).get_object(Bucket=rgw["bucket"], Key=key0)["Body"].read()
    s3(rgw).put_object(Bucket=rgw["bucket"], Key=key0,
                       Body=zstandard.ZstdCompressor().compress(os.urandom(m.length(0))))
    with Vm(guest, vm1, tmp_path, name="B1", drive_args=qcow2_drive(vm1), extra_args=["-S"]) as vm:
        try:  # (qemu-io's output is QEMU's stdout, which the serial console shares)
            vm.qmp.execute("human-monitor-command", {"command-line": 'qemu-io rootfs "read 0 4096"'})
            got = vm.wait_line(r"^read (failed: .*|\d+/\d+ bytes at offset 0)$", timeout=60).group(1)
        finally:
            s3(rgw).put_object(Bucket=rgw["bucket"], Key=key0, Body=good)
        assert got == "failed: Input/output error", got
        assert 0 not in read_record(cache) and b.lazy_templates()[0]["stats"]["check_failures"] >= 1
        vm.qmp.execute("cont")  # the chunk is right in the bucket again: fetched, checked, booted
        boot1 = vm.wait_ready(timeout=90)
        vm.command("write", "w", "written-on-B")
        assert vm.poweroff() == 0
    fetched = set(read_record(cache))
    d = b.lazy_templates()[0]
    assert d["stats"]["fetched_chunks"] == len(fetched) == d["cached_chunks"]
    assert 0 in fetched and not fetched & pad and len(fetched) * 2 < d["data_chunks"], (fetched, pad, d)
    # a second guest on this host (its own overlay; QEMU's reconnecting form): nothing fetched
    vm2 = lazy_overlay(served, tmp_path / "vm2.qcow2", reconnect_delay=10)
    with Vm(guest, vm2, tmp_path, name="B2", drive_args=qcow2_drive(vm2)) as vm:
        boot2 = vm.wait_ready(timeout=90)
        assert boot2 != boot1 and vm.command("cat", "a") == boot2
        with pytest.raises(VmError, match="no such file"):
            vm.command("cat", "w")  # the first guest's write is in its overlay only
        vm.command("write", "w", "written-on-B2")
        again = b.lazy_templates()[0]
        assert set(read_record(cache)) == fetched and again["stats"]["fetched_chunks"] == len(fetched), again["stats"]
        # the server SIGKILLed under the running guest: its keeper starts it again on the same
        # socket, QEMU's NBD client reconnects (reconnect-delay) and the guest's next reads,
        # of /root/pad's first 4 MiB whose chunks no one fetched yet, go on and are right
        os.kill(again["pid"], signal.SIGKILL)
        head = 4 * MiB
        assert vm.command("sum", "/root/pad", str(head), timeout=120) == hashlib.sha256(pad_bytes()[:head]).hexdigest()
        restarted = b.lazy_templates()[0]
        assert restarted["pid"] not in (None, again["pid"]), restarted
        new = set(read_record(cache)) - fetched
        assert len(new & pad) >= head // m.chunk_size - 2 and restarted["stats"]["fetched_chunks"] == len(new), restarted
        with open(os.path.join(cache, "nbdkit.log")) as f:
            assert f"(pid {again['pid']}) ended (signal 9); starting it again" in f.read()
        assert vm.poweroff() == 0
    print("VMM-LAZY-RESULT " + json.dumps({"data_chunks": d["data_chunks"], "fetched_chunks": len(fetched),
                                           "fetched_bytes": d["stats"]["fetched_bytes"], "size": d["size"]}))

    # the witness: the first overlay read whole (through the server: the rest of the template
    # is fetched now) holds its guest's writes; the cache holds the template; the bucket is A's push
    raw = tmp_path / "vm1.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", vm1, str(raw)], check=True, timeout=120, capture_output=True)
    assert guestlib.read_file(raw, "/data/a") == f"{boot1}\n".encode()
    assert guestlib.read_file(raw, "/data/w") == b"written-on-B\n"
    assert sha(os.path.join(cache, "data")) == m.template == sha(img)
    assert bucket(rgw, prefix) == pushed
