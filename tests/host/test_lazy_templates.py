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
from cowdisk.store import Store
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
                           "data_chunks": 3, "whole": False, "loops": [], "served": True}
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


def test_the_server_reads_held_chunks_and_never_serves_a_missing_one(store, tmp_path) -> None:
    """The server's read path (nbd_plugin.pread -> ChunkCache.read_into: one preadv of the
    cache's data file into nbdkit's buffer), read as the kernel's nbd device would: the held
    chunks' bytes and a zero chunk's zeros; a read that also touches a chunk the cache lacks
    and cannot fetch (the endpoint refuses) is EIO, never zeros nor the held part alone; the
    server's counters count each chunk read from the cache, and the failed fetch."""
    import errno

    from cowdisk.remote import lazy
    from remoteutil import nbd_pread, nbd_pread_many

    img = str(tmp_path / "t.img")
    chunks = make_image(img, 8 * MiB)  # data chunks 0, 3 and 7
    url, _ = offline_lazy(store, img, hold={0, 3})
    d = store.lazy_template(url)
    served = lazy.server(d["cache"])
    assert served is not None
    sock, _ = nbd.open_export(served.socket)
    try:
        assert nbd_pread(sock, 8192, MiB - 4096) == chunks[0][-4096:] + bytes(4096)  # chunk 0, then a hole
        assert nbd_pread(sock, 2 * MiB, 3 * MiB) == chunks[3] + bytes(MiB)
        with pytest.raises(OSError) as e:
            nbd_pread(sock, 8192, 7 * MiB - 4096)  # a hole, then chunk 7: not held, not fetchable
        assert e.value.errno == errno.EIO
        st = lazy.stats(d["cache"])  # written before the reply when a fetch count changes
        assert (st["cache_hits"], st["remote_reads"], st["fetched_chunks"]) == (2, 1, 0), st
        assert nbd_pread(sock, 4096, 7 * MiB - 4096) == bytes(4096)  # the connection reads on
        assert nbd_pread(sock, 4096, 0) == chunks[0][:4096]
    finally:
        sock.close()

    # connections come and go (volumes, guests, reconnects): each keeps the Python thread
    # states of the nbdkit workers that served it until it closes (nbd_plugin.close deletes
    # them), so the server neither fails at a close nor grows with the connections
    offsets = [i * 65536 for i in range(16)] + [3 * MiB + i * 65536 for i in range(16)]

    def connection() -> None:
        sock, _ = nbd.open_export(served.socket)
        try:
            got = nbd_pread_many(sock, 4096, offsets)
        finally:
            sock.close()
        assert got == {o: (chunks[0] if o < MiB else chunks[3])[o % MiB:o % MiB + 4096] for o in offsets}

    def rss() -> int:
        with open(f"/proc/{served.pid}/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) * 1024

    for _ in range(5):
        connection()
    before = rss()
    for _ in range(60):
        connection()
    assert rss() - before < MiB // 2, (before, rss())  # kept, never deleted: 2 MiB more (35 KiB a connection)
    assert lazy.server(d["cache"]) == served


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


def test_a_killed_keeper_is_noticed_and_the_template_served_again(store, tmp_path) -> None:
    """The keeper SIGKILLed: its nbdkit ends with it (nbdkit sets PR_SET_PDEATHSIG itself),
    and nothing would start a server again. Recovery serves the template again (a new
    keeper and server; the PID files the dead ones left are what tells it from a stopped
    template). So does an attach over it, and the daemon's periodic look
    (tests/host/test_daemon.py). A stopped template is left stopped."""
    import signal
    import time

    from cowdisk.remote import lazy
    from remoteutil import nbd_pread

    img = str(tmp_path / "t.img")
    chunks = make_image(img, 8 * MiB)
    url, m = offline_lazy(store, img)
    d = store.lazy_template(url, "lz")
    cache = d["cache"]
    assert store.recover().finished == []

    def kill_keeper() -> tuple[int, int]:
        k, s = lazy.keeper(cache), lazy.server(cache)
        assert k is not None and s is not None
        os.kill(k, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while process_name(s.pid) == "nbdkit" or process_name(k) == lazy.KEEPER_NAME:
            assert time.monotonic() < deadline, "nbdkit outlived its keeper"
            time.sleep(0.01)
        assert lazy.server(cache) is None and lazy.keeper(cache) is None
        return k, s.pid

    def served_anew(k: int, pid: int) -> None:
        s = lazy.server(cache)
        assert s is not None and s.pid != pid and lazy.keeper(cache) not in (None, k)
        sock, _ = nbd.open_export(s.socket)
        try:
            assert nbd_pread(sock, 4096, 3 * MiB) == chunks[3][:4096]
        finally:
            sock.close()

    k, pid = kill_keeper()
    rep = store.recover()
    assert rep.finished == [f"lazy template {m.digest[:16]}: its keeper was gone; served again"], rep
    served_anew(k, pid)
    assert store.recover().finished == []  # kept: nothing to do

    k, pid = kill_keeper()  # an attach serves it again too
    with Store(store.root, recover=False) as other:
        other.lazy_template(url)
    served_anew(k, pid)

    assert store.stop_lazy_template(m.digest)
    assert store.recover().finished == [] and lazy.server(cache) is None and lazy.keeper(cache) is None


def test_the_daemon_serves_again_a_template_whose_keeper_was_killed(store, tmp_path) -> None:
    """The daemon looks at its lazy templates every ``lazy_keep_interval`` seconds (here
    0.2): a keeper SIGKILLed under it (its nbdkit ends with it) is noticed without any
    call, the template served again and the daemon's log says so."""
    import signal

    from cowdisk.remote import lazy
    from daemonutil import Daemon, public_tmpdir, wait_for

    img = str(tmp_path / "t.img")
    make_image(img, 4 * MiB)
    url, m = offline_lazy(store, img)
    cache = store.lazy_template(url, "lz")["cache"]
    with public_tmpdir("cdd-") as sd, Daemon(store.root, os.path.join(sd, "d.sock"),
                                             extra_env={"COWDISK_LAZY_KEEP_INTERVAL": "0.2"}) as d:
        d.start()
        k, pid = lazy.keeper(cache), lazy.server(cache).pid
        os.kill(k, signal.SIGKILL)
        s = wait_for(lambda: (x := lazy.server(cache)) is not None and x.pid != pid and lazy.keeper(cache) and x,
                     10, "the daemon to serve the template again")
        assert lazy.keeper(cache) != k and process_name(pid) != "nbdkit"
        note = f"lazy template {m.digest[:16]}: its keeper was gone; served again"
        assert note in [r["msg"] for r in d.log_records(until=lambda rs: any(r["msg"] == note for r in rs))]
        assert d.stop() == 0
    assert lazy.server(cache) == s  # the daemon's stop leaves it served
