"""Data: an ext4 written through a mounted volume survives checkpoint and restore under a
new id (e2fsck -fn passes, the file reads back bit for bit); the template never changes."""

from __future__ import annotations

import hashlib
import os
import subprocess

from testutil import MiB, assert_settled, host_state, mounted, sha


def test_ext4_data_survives_checkpoint_and_restore_under_new_id(store, base, tmp_path) -> None:
    digest = sha(base.path)
    v = store.create_volume("d1", "base")
    before = host_state()  # a mount leaves nothing behind (its loop, for a file, included)
    payload = os.urandom(3 * MiB + 123)
    with mounted(v.device, str(tmp_path / "m1")) as m:
        os.makedirs(os.path.join(m, "srv"))
        with open(os.path.join(m, "srv", "data.bin"), "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        assert open(os.path.join(m, "etc", "hostname")).read() == "template\n"
    assert_settled(before)
    store.checkpoint("d1")
    r = store.restore("d1", "d2")
    before = host_state()
    fsck = subprocess.run(["e2fsck", "-fn", r.device], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    with mounted(r.link, str(tmp_path / "m2")) as m:
        with open(os.path.join(m, "srv", "data.bin"), "rb") as f:
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(payload).digest()
    assert_settled(before)
    assert sha(base.path) == digest == base.digest
    store.verify_template("base")  # full digest check
    store.remove_volume("d2")
    store.remove_volume("d1")
