"""Lazy templates on the session cluster's real RADOS Gateway: store A pushes, store B
serves the template from its manifest alone (nbdkit and its Python plugin over B's chunk
cache) and reads it as Firecracker or Cloud Hypervisor would, through a file (a
qemu-storage-daemon FUSE export, an NBD client of the server).

A read fetches only the chunks it touches, each checked before it is served; a chunk
altered in the bucket is EIO to the reader, never other bytes; with the gateway stopped,
cached chunks are still read and the others fail within the bound; a later server (a
later volume) fetches nothing the cache holds; a server killed in the middle of fetching
leaves a cache whose every recorded chunk is right.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from cowdisk.remote import lazy
from cowdisk.remote.cache import CRASH_POINTS, ChunkCache, evict, parse_record, read_record
from daemonutil import Daemon, env
from remoteutil import CHUNK, make_image, s3, write_config
from testutil import sha

pytestmark = pytest.mark.root


@pytest.fixture
def served(tmp_path, hosts):
    """A pushes a 16 MiB image (data in chunks 0, 3 and 7); B serves it lazily (fetch bound
    3 s) and exports it as a file. Yields (b, doc, file, image, chunks, prefix)."""
    a, b, prefix = hosts
    img = str(tmp_path / "img.raw")
    chunks = make_image(img)
    a.import_template(img, "base")
    url = a.push_template("base")["url"]
    doc = b.lazy_template(url, bound=3)
    f = str(tmp_path / "lazy.img")
    pid = tmp_path / "qsd.pid"
    lazy.export_file(lazy.server(doc["cache"]), f, str(pid))
    try:
        yield b, doc, f, img, chunks, prefix
    finally:
        lazy.unexport_file(f, str(pid))


def pread(path: str, length: int, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def held(cache: str) -> set[int]:
    with open(os.path.join(cache, "held"), "rb") as f:
        return parse_record(f.read())


def drop_page_cache(path: str) -> None:
    """Reads must reach the server, not the kernel's copy of the FUSE file's pages."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_reads_fetch_what_they_touch_and_later_servers_share_it(served):
    b, doc, f, img, chunks, _ = served
    assert doc["cached_bytes"] == 0 and doc["url"].startswith("nbd+unix:///?socket=")
    assert pread(f, 4096, 3 * CHUNK + 8192) == chunks[3][8192:12288]
    assert held(doc["cache"]) == {3}  # one chunk fetched for one read
    assert pread(f, 4096, 5 * CHUNK) == bytes(4096)  # a zero chunk: nothing fetched
    assert held(doc["cache"]) == {3}
    assert sha(f) == sha(img)  # every byte, through the file a VMM is given
    assert held(doc["cache"]) == {0, 3, 7}
    d = b.lazy_templates()[0]
    assert (d["cached_chunks"], d["cached_bytes"], d["stats"]["check_failures"]) == (3, 3 * CHUNK, 0)
    assert d["stats"]["fetched_chunks"] == 3
    p = subprocess.run([sys.executable, "-m", "cowdisk", "--root", b.root, "--json", "template", "ls", "--lazy"],
                       capture_output=True, text=True, env=env(), timeout=60)
    assert p.returncode == 0, p.stderr
    assert [(r["manifest"], r["cached_bytes"]) for r in json.loads(p.stdout)["templates"]] == [(doc["manifest"],
                                                                                                3 * CHUNK)]
    # the daemon's /metrics: the cache, the server's counters, its fetch-time histogram
    with Daemon(b.root, str(b.root) + "-d.sock").start() as dm:
        text = dm.client.metrics()
    m = doc["manifest"]
    got = {k: float(v) for k, _, v in (x.rpartition(" ") for x in text.splitlines() if x.startswith("cowdisk_lazy"))}
    for key, want in ((f'cowdisk_lazy_cached_bytes{{manifest="{m}"}}', 3 * CHUNK),
                      (f'cowdisk_lazy_served{{manifest="{m}"}}', 1),
                      (f'cowdisk_lazy_chunk_reads_total{{manifest="{m}",source="remote"}}', 3),
                      (f'cowdisk_lazy_check_failures_total{{manifest="{m}"}}', 0),
                      (f'cowdisk_lazy_fetch_seconds_count{{manifest="{m}"}}', 3),
                      (f'cowdisk_lazy_fetch_seconds_bucket{{le="+Inf",manifest="{m}"}}', 3)):
        assert got.get(key) == want, (key, got)
    # a later server (the next volume on this host): everything from the cache, no fetch
    assert b.stop_lazy_template(doc["manifest"])
    again = b.lazy_template(doc["manifest"])
    assert again["pid"] != doc["pid"]
    c = ChunkCache(doc["cache"], ChunkCache.read_manifest(doc["cache"]), lambda k: pytest.fail(f"fetched {k}"),
                   where=str)
    try:
        assert hashlib.sha256(c.read(0, c.m.size)).hexdigest() == sha(img)
    finally:
        c.close()


def test_a_corrupt_chunk_is_eio_never_data(served, rgw):
    import zstandard

    b, doc, f, img, chunks, prefix = served
    key = f"{prefix}/chunks/{hashlib.sha256(chunks[3]).hexdigest()}"
    s3(rgw).put_object(Bucket=rgw["bucket"], Key=key, Body=zstandard.ZstdCompressor().compress(os.urandom(CHUNK)))
    with pytest.raises(OSError) as e:
        pread(f, 4096, 3 * CHUNK)
    assert e.value.errno == errno.EIO
    assert 3 not in held(doc["cache"])
    assert pread(f, 4096, 0) == chunks[0][:4096]  # the others read on
    assert b.lazy_templates()[0]["stats"]["check_failures"] >= 1


def test_gateway_down_cached_reads_go_on_others_fail_within_the_bound(served, ceph_cluster):
    b, doc, f, img, chunks, _ = served
    assert pread(f, 4096, 0) == chunks[0][:4096]
    ceph_cluster.stop_rgw()
    try:
        drop_page_cache(f)
        assert pread(f, 4096, 4096) == chunks[0][4096:8192]  # cached: read on
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:
            pread(f, 4096, 3 * CHUNK)
        assert time.monotonic() - t0 < 30  # the bound is 3 s per fetch; QEMU's client may retry once
        assert e.value.errno == errno.EIO, e.value
        assert 3 not in held(doc["cache"])
    finally:
        ceph_cluster.start_rgw()
    assert pread(f, 4096, 3 * CHUNK) == chunks[3][:4096]


def test_server_killed_while_fetching_leaves_a_whole_cache(tmp_path, hosts):
    """SIGKILL to nbdkit in the middle of fetching 48 chunks: every chunk the record lists has
    its right bytes in the data file, and a new server completes the template."""
    a, b, _ = hosts
    img = str(tmp_path / "big.raw")
    with open(img, "wb") as out:
        for _ in range(48):
            out.write(os.urandom(CHUNK))
    a.import_template(img, "big")
    doc = b.lazy_template(a.push_template("big")["url"], bound=10)
    f, pidf = str(tmp_path / "lazy.img"), str(tmp_path / "qsd.pid")
    lazy.export_file(lazy.server(doc["cache"]), f, pidf)
    reader = threading.Thread(target=lambda: _read_all_ignoring_errors(f), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while len(held(doc["cache"])) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    keeper = lazy.keeper(doc["cache"])
    assert keeper is not None
    os.kill(keeper, signal.SIGKILL)  # as a host going down: nothing starts the server again
    os.kill(doc["pid"], signal.SIGKILL)
    reader.join(60)
    lazy.unexport_file(f, pidf)
    listed = held(doc["cache"])
    assert 5 <= len(listed) < 48, listed
    m = ChunkCache.read_manifest(doc["cache"])
    with open(os.path.join(doc["cache"], "data"), "rb") as data:
        for i in listed:
            data.seek(i * CHUNK)
            assert hashlib.sha256(data.read(CHUNK)).hexdigest() == m.chunks[i], i
    b.lazy_template(doc["manifest"])
    lazy.export_file(lazy.server(doc["cache"]), f, pidf)
    try:
        assert sha(f) == sha(img)
    finally:
        lazy.unexport_file(f, pidf)


def _read_all_ignoring_errors(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            off = 0
            while os.pread(fd, CHUNK, off):
                off += CHUNK
        finally:
            os.close(fd)
    except OSError:
        pass


def test_read_order_prefetch_and_the_cache_cap(tmp_path, rgw, hosts):
    """B reads chunks 9, 2, 5 and records that order as the manifest's sidecar; C's
    ``--prefetch`` fetches those first, then the rest. C's cap of 4 MiB: gc evicts 12 single
    chunks of the served template (the least recently used) and it reads on, right
    (fetching them again); once it is no longer served gc evicts it whole (holes punched,
    the record emptied first); served again, it reads right."""
    from cowdisk.store import Store

    a, b, prefix = hosts
    img = str(tmp_path / "img16.raw")
    with open(img, "wb") as out:
        out.write(os.urandom(16 * CHUNK))
    a.import_template(img, "base")
    url = a.push_template("base")["url"]
    doc = b.lazy_template(url)
    f, pidf = str(tmp_path / "b.img"), str(tmp_path / "b.pid")
    lazy.export_file(lazy.server(doc["cache"]), f, pidf)
    try:
        for i in (9, 2, 5):
            pread(f, 4096, i * CHUNK)
    finally:
        lazy.unexport_file(f, pidf)
    r = b.record_read_order(doc["manifest"])
    body = s3(rgw).get_object(Bucket=rgw["bucket"], Key=f"{prefix}/manifests/{doc['manifest']}.order")["Body"]
    assert json.loads(body.read()) == [9, 2, 5] and r["chunks"] == 3

    root_c = str(tmp_path / "host-c")
    write_config(root_c, rgw, prefix, cache_cap=4 * CHUNK)
    c = Store(root_c, backend="copy")
    try:
        dc = c.lazy_template(url, prefetch=True)
        order = read_record(dc["cache"])
        assert set(order[:3]) == {9, 2, 5} and sorted(order) == list(range(16))  # those first (8 in flight)
        assert dc["cached_bytes"] == 16 * CHUNK
        notes = c.gc().orphans_removed
        assert any("(served): evicted 12 chunks" in n for n in notes), notes  # served: the least recently used
        assert c.lazy_templates()[0]["cached_bytes"] == 4 * CHUNK
        f3, pid3 = str(tmp_path / "c0.img"), str(tmp_path / "c0.pid")
        lazy.export_file(lazy.server(dc["cache"]), f3, pid3)
        try:
            assert sha(f3) == sha(img)  # the evicted ones fetched again
        finally:
            lazy.unexport_file(f3, pid3)
        assert c.stop_lazy_template(dc["manifest"])
        notes = c.gc().orphans_removed
        assert any("evicted 16 chunks" in n for n in notes), notes
        assert c.lazy_templates()[0]["cached_bytes"] == 0
        assert os.stat(os.path.join(dc["cache"], "data")).st_blocks * 512 < CHUNK  # the holes are punched
        again = c.lazy_template(url)
        f2, pid2 = str(tmp_path / "c.img"), str(tmp_path / "c.pid")
        lazy.export_file(lazy.server(again["cache"]), f2, pid2)
        try:
            assert sha(f2) == sha(img)
        finally:
            lazy.unexport_file(f2, pid2)
    finally:
        c.destroy()
        c.close()


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_kill_in_fetch_or_eviction_leaves_the_cache_whole(tmp_path, hosts, point):
    """A process SIGKILLed at each point of a fetch (bytes written, synced, recorded) or an
    eviction (new record written, renamed, a hole punched): every chunk the record lists
    has its right bytes, and the cache then serves the whole template right."""
    a, b, _ = hosts
    img = str(tmp_path / "img4.raw")
    with open(img, "wb") as out:
        out.write(os.urandom(4 * CHUNK))
    from cowdisk.remote import load
    from cowdisk.remote.s3 import ObjectStore
    from cowdisk.remote.transfer import fetch_manifest

    a.import_template(img, "base")
    m = fetch_manifest(ObjectStore(load(b.root)), a.push_template("base")["manifest"])
    cache = str(tmp_path / "cache" / m.digest)  # the cache alone: no server needed here
    ChunkCache.create(cache, m)

    def open_cache() -> ChunkCache:
        objects = ObjectStore(load(b.root))
        return ChunkCache(cache, m, lambda k: objects.get(objects.cfg.key(k)), where=str)

    if point.startswith("evict"):
        c = open_cache()
        c.read(0, m.size)  # all four held
        c.close()
    pid = os.fork()
    if pid == 0:  # the child: dies at the point (or exits 3 if it never got there)
        try:
            os.environ["COWDISK_CRASH_AT"] = point
            if point.startswith("fetch"):
                open_cache().ensure(2)
            else:
                evict(cache, m, {0, 1, 2, 3})
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    listed = held(cache)
    with open(os.path.join(cache, "data"), "rb") as data:
        for i in listed:
            data.seek(i * CHUNK)
            assert hashlib.sha256(data.read(CHUNK)).hexdigest() == m.chunks[i], (point, i)
    if point == "fetch:recorded":
        assert 2 in listed
    if point == "fetch:written":
        assert 2 not in listed
    c = open_cache()
    try:
        assert hashlib.sha256(c.read(0, m.size)).hexdigest() == sha(img)
    finally:
        c.close()


def test_a_killed_server_is_started_again_and_the_reader_goes_on(served):
    """nbdkit SIGKILLed under the FUSE file's reader (qemu-storage-daemon, QEMU's own NBD
    client, reconnect-delay 5 s): its keeper starts it again on the same socket, by itself,
    and the same open file reads on, right, from the cache and from the store. Serving the
    template again finds that server (no second one); stopping it stops the keeper too."""
    b, doc, f, img, chunks, _ = served
    keeper = lazy.keeper(doc["cache"])
    assert keeper is not None
    fd = os.open(f, os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == chunks[0][:4096]
        os.kill(doc["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while ((s := lazy.server(doc["cache"])) is None or s.pid == doc["pid"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        if s is None or s.pid == doc["pid"]:
            with open(os.path.join(doc["cache"], "nbdkit.log")) as log:
                pytest.fail(f"the keeper did not start nbdkit again: {log.read()[-3000:]}")
        assert lazy.keeper(doc["cache"]) == keeper
        drop_page_cache(f)
        got = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the client notices the new server on its next request
            try:
                got = os.pread(fd, 4096, 4096)
                break
            except OSError:
                time.sleep(0.2)
        assert got == chunks[0][4096:8192]
        assert os.pread(fd, 4096, 3 * CHUNK) == chunks[3][:4096]  # a chunk not cached before: fetched
        assert b.lazy_template(doc["manifest"])["pid"] == s.pid
        with open(os.path.join(doc["cache"], "nbdkit.log")) as log:
            assert f"nbdkit (pid {doc['pid']}) ended (signal 9); starting it again" in log.read()
    finally:
        os.close(fd)
    assert b.stop_lazy_template(doc["manifest"]) is True
    assert lazy.keeper(doc["cache"]) is None and lazy.server(doc["cache"]) is None
