"""A lazy template is a template of the store (issue 25 item 3): registered by `template pull
--lazy` under its content's digest, owned by the caller that pulled it, listed and inspected
as lazy with the bytes its cache holds, refused with a clear error by a backend that cannot
read it through its server's block device (here copy: dm-thin and dm-snapshot make volumes
over it in the lab, tests/lab/test_lazy_volume_dm.py), and removed with its server stopped.

No object store: the cache is made by the project's own format and fetch path
(remoteutil.offline_lazy) and the config's endpoint refuses connections.
"""

from __future__ import annotations

import json
import os

import pytest

from cowdisk.errors import KernelError, NotFound, Unsupported
from cowdisk.kernel import nbd
from cowdisk.kernel.procfs import process_name
from remoteutil import make_image, offline_lazy
from testutil import MiB, cowdisk_cli

pytestmark = [pytest.mark.root, pytest.mark.backends("copy")]


def test_a_lazy_template_is_a_template_of_the_store(store, tmp_path) -> None:
    img = str(tmp_path / "t.img")
    make_image(img, 8 * MiB)  # data chunks 0, 3 and 7
    url, m = offline_lazy(store, img, hold={0})
    d = store.lazy_template(url, "lz")
    assert d["id"] == m.template[:16] and d["pid"] and process_name(d["pid"]) == "nbdkit"

    t = store.template("lz")
    assert (t.id, t.digest, t.size, t.source) == (m.template[:16], m.template, 8 * MiB, url)
    assert os.path.basename(t.path) == "disk.lazy" and t.owner == 0
    doc = store.template_doc(t)
    assert doc["lazy"] == {"manifest": m.digest, "source": url, "cached_bytes": MiB, "cached_chunks": 1,
                           "data_chunks": 3, "served": True}
    assert doc["disk_bytes"] == MiB  # its bytes on this host: what the cache holds
    assert [x.id for x in store.templates()] == [t.id]
    ls = cowdisk_cli(store.root, "template", "ls", "-o", "id,lazy").stdout.splitlines()  # raw: not a terminal
    assert ls[0] == "ID\tLAZY" and ls[1].split("\t")[0] == t.id and json.loads(ls[1].split("\t")[1]) == doc["lazy"]

    # the server the volumes' nbd devices would connect to: the NBD handshake the store does
    # before handing the socket to the kernel (kernel/nbd.py), against the real nbdkit
    sock, export = nbd.open_export(store.lazy_templates()[0]["url"].split("socket=", 1)[1])
    sock.close()
    assert export.size == 8 * MiB and export.read_only

    # copy cannot read it through a block device: refused, naming the template and the way out
    with pytest.raises(Unsupported) as e:
        store.create_volume("v", "lz")
    assert f"template {t.id} (lz) is lazy" in str(e.value) and "copy backend" in str(e.value)
    assert f"`cowdisk template pull {url}` (without --lazy)" in (e.value.hint or "")
    assert store.volumes() == [] and not os.path.exists(os.path.join(store.data_root, "volumes", "v"))
    with pytest.raises(Unsupported, match="it is lazy"):
        store.verify_template("lz")

    # pulled again: the same template (the manifest is not fetched: the cache holds it)
    assert store.lazy_template(url, "lz2")["id"] == t.id
    assert store.template(t.id).names == ("lz", "lz2")

    # removed: its server stopped, its cache kept for gc
    store.remove_template("lz")
    with pytest.raises(NotFound):
        store.template(t.id)
    assert process_name(d["pid"]) != "nbdkit"
    assert os.path.exists(os.path.join(store.data_root, "lazy", m.digest, "held"))
    assert not os.path.exists(os.path.join(store.data_root, "templates", t.id))

    # unnamed and unused: gc keeps it while it is served (a VMM may read its NBD URL), not after
    assert store.lazy_template(url)["id"] == t.id
    assert f"template {t.id}" not in store.gc().orphans_removed
    assert store.stop_lazy_template(m.digest)
    assert f"template {t.id}" in store.gc().orphans_removed


def test_nbd_handshake_errors_name_the_socket(tmp_path) -> None:
    """Nothing listening, or not an NBD server: an error naming the socket, no hang."""
    import socket

    gone = str(tmp_path / "gone.sock")
    with pytest.raises(KernelError) as e:
        nbd.open_export(gone)
    assert e.value.errno in (2, 111) and gone in str(e.value)  # ENOENT, ECONNREFUSED
    path = str(tmp_path / "not-nbd.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    try:
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(path)
            peer, _ = srv.accept()
            peer.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            with pytest.raises(KernelError, match="not a newstyle NBD server"):
                nbd.handshake(c, path)
            peer.close()
    finally:
        srv.close()


def test_the_caller_that_pulled_it_owns_it(store, tmp_path) -> None:
    img = str(tmp_path / "t.img")
    make_image(img, 4 * MiB)
    url, m = offline_lazy(store, img)
    alice, bob = store.as_caller(4242), store.as_caller(4343)
    tid = alice.lazy_template(url, "mine")["id"]
    assert alice.template("mine").owner == 4242 and store.template(tid).owner == 4242
    with pytest.raises(NotFound):
        bob.template(tid)
    with pytest.raises(NotFound):
        bob.remove_template(tid)
    alice.remove_template(tid)
    assert store.templates() == []
