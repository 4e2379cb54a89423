"""A lazy template's chunk cache (remote/cache.py) on this host, without an object store:
eviction of single chunks while the template is served and read (issue 25 item 4).

The chunks come from a local source (remoteutil.chunk_dir: the objects a push stores, as
files) through the cache's own fetch path (ChunkCache: fetched, checked, written, synced,
recorded); the store's server (nbdkit) runs with a config whose endpoint refuses
connections, so a chunk it lacks is EIO to its reader, never data. The random-kill run
over the same cache is tests/host/test_faults_random_lazy.py.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import signal
import struct
import threading
import time

import pytest

from cowdisk.backends.dm_common import TemplateLoops, template_label
from cowdisk.errors import RemoteError
from cowdisk.kernel import nbd
from cowdisk.remote.cache import LOOP_LOCK, ChunkCache, evict, last_used, loops_over, read_record
from remoteutil import chunk_dir, chunked, nbd_pread, offline_lazy
from testutil import MiB, cowdisk_cli

pytestmark = [pytest.mark.root, pytest.mark.backends("copy")]


def random_image(path: str, chunks: int, chunk_size: int) -> bytes:
    data = os.urandom(chunks * chunk_size)
    with open(path, "wb") as f:
        f.write(data)
    return data


def test_gc_evicts_single_chunks_of_a_served_template_least_recently_used_first(store, tmp_path) -> None:
    """8 chunks held, a cap of 4: gc evicts, while nbdkit serves the template, the 4 chunks
    used least recently (their holes punched), not the 4 a client read just now; the
    server reads on: the kept chunks right, an evicted one EIO (its endpoint refuses),
    never zeros. A reader with a source fetches an evicted chunk again, checked, and the
    server then serves it too."""
    img = str(tmp_path / "t.img")
    data = random_image(img, 8, MiB)
    url, m = offline_lazy(store, img, cache_cap=4 * MiB)
    d = store.lazy_template(url, "lz")
    cache = d["cache"]
    with open(os.path.join(cache, "state"), "r+b") as f:  # every chunk last used an hour ago
        f.seek(8)
        f.write(struct.pack("<8I", *[int(time.time()) - 3600] * 8))
    sock, _ = nbd.open_export(d["url"].split("socket=", 1)[1])
    try:
        for i in (6, 1, 4, 3):  # now used
            assert nbd_pread(sock, 4096, i * MiB) == data[i * MiB:i * MiB + 4096]
        notes = store.gc().orphans_removed
        assert f"lazy template {m.digest[:16]} (served): evicted 4 chunks ({4 * MiB} bytes), the least recently " \
               f"used, to keep the cache under {4 * MiB} bytes" in notes, notes
        assert sorted(read_record(cache)) == [1, 3, 4, 6]
        assert os.stat(os.path.join(cache, "data")).st_blocks * 512 == 4 * MiB  # the holes are punched
        assert max(last_used(cache, m)[i] for i in (0, 2, 5, 7)) < min(last_used(cache, m)[i] for i in (1, 3, 4, 6))
        for i in (1, 3, 4, 6):
            assert nbd_pread(sock, MiB, i * MiB) == data[i * MiB:(i + 1) * MiB]
        with pytest.raises(OSError) as e:
            nbd_pread(sock, 4096, 5 * MiB)  # evicted: fetched again, which fails here
        assert e.value.errno == 5
        _, blobs = chunked(img, MiB)
        c = ChunkCache(cache, m, chunk_dir(blobs, str(tmp_path / "src")), where=str)
        try:
            assert c.read(5 * MiB, MiB) == data[5 * MiB:6 * MiB] and c.stats.fetched_chunks == 1
        finally:
            c.close()
        assert nbd_pread(sock, MiB, 5 * MiB) == data[5 * MiB:6 * MiB]  # the server sees it held again
        assert store.gc().orphans_removed == [f"lazy template {m.digest[:16]} (served): evicted 1 chunks "
                                              f"({MiB} bytes), the least recently used, to keep the cache under "
                                              f"{4 * MiB} bytes"]
    finally:
        sock.close()


def _reader(cache: str, m, get, data: bytes, cs: int, seed: int, w: int) -> None:
    rng = random.Random(seed)
    c = ChunkCache(cache, m, get, where=str)
    n = 0
    while True:
        off = rng.randrange(0, len(data) - 1)
        length = rng.randrange(1, min(3 * cs, len(data) - off) + 1)
        try:
            got = c.read(off, length)
        except BaseException as e:
            os.write(w, f"read {length} at {off} (read {n}): {e!r}\n".encode())
            os._exit(1)
        n += 1
        if got != data[off:off + length]:
            os.write(w, f"wrong bytes: {length} at {off} (read {n})\n".encode())
            os._exit(1)


def _evictor(cache: str, m, seed: int) -> None:
    rng = random.Random(seed)
    while True:
        evict(cache, m, set(rng.sample(range(len(m.chunks)), rng.randrange(1, 4))))


def test_readers_in_other_processes_never_read_an_evicted_chunk(tmp_path) -> None:
    """Three processes read random ranges of the template through the cache while a fourth
    evicts random single chunks as fast as it can (each eviction punches holes a reader may
    be about to read): for 1.5 s every read is the template's bytes, and afterwards every
    chunk the record lists is right. Before the epoch (the seqlock), a reader that had
    looked at the record before an eviction read the punched zeros."""
    cs = 64 << 10
    img = str(tmp_path / "t.img")
    data = random_image(img, 16, cs)
    m, blobs = chunked(img, cs)
    get = chunk_dir(blobs, str(tmp_path / "src"))
    cache = str(tmp_path / "cache" / m.digest)
    ChunkCache.create(cache, m)
    r, w = os.pipe()
    pids = []
    try:
        for k in range(4):
            pid = os.fork()
            if pid == 0:
                try:
                    os.close(r)
                    if k < 3:
                        _reader(cache, m, get, data, cs, k, w)
                    else:
                        _evictor(cache, m, k)
                finally:
                    os._exit(3)
            pids.append(pid)
        os.close(w)
        os.set_blocking(r, False)
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            for pid in pids:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    time.sleep(0.1)  # its note, if it wrote one
                    try:
                        note = os.read(r, 4096).decode()
                    except BlockingIOError:
                        note = "no note"
                    pytest.fail(f"child {pid} ended (status {status:#x}): {note}")
            time.sleep(0.05)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        os.close(r)
    with open(os.path.join(cache, "data"), "rb") as f:
        for i in read_record(cache):
            f.seek(i * cs)
            assert hashlib.sha256(f.read(cs)).hexdigest() == m.chunks[i], i


def _waiting_on(path: str, byte: int) -> bool:
    """Whether /proc/locks shows a process waiting for a lock on byte ``byte`` of ``path``."""
    ino = os.stat(path).st_ino
    with open("/proc/locks") as f:
        for line in f:
            w = line.split()
            if "->" in w and w[w.index("->") + 5].endswith(f":{ino}") and w[w.index("->") + 6] == str(byte):
                return True
    return False


def test_no_chunk_is_evicted_while_a_loop_reads_a_whole_cache(store, tmp_path) -> None:
    """A whole cache's data file under a read-only loop (the origin dm volumes over the
    template get, made by the backend's own code over what the store's template ref gives:
    dm_common.TemplateLoops under TemplateRef.whole): gc with a cap of 1 byte evicts nothing,
    served or not (a loop reads a punched hole as zeros); evict() itself refuses (EBUSY),
    also when it was waiting for the lock while the loop was being set up; once the loop is
    gone (autoclear), gc evicts the whole cache."""
    img = str(tmp_path / "t.img")
    data = random_image(img, 4, MiB)
    url, m = offline_lazy(store, img, cache_cap=1)
    doc = store.lazy_template(url, "lz")
    cache, tid = doc["cache"], doc["id"]
    ref = store.template_ref(store._templates.row("lz"))
    assert ref.whole is not None
    refused: list[BaseException] = []

    def evictor() -> None:
        try:
            evict(cache, m, {0, 1, 2, 3})
        except RemoteError as e:
            refused.append(e)

    loops = TemplateLoops(lambda t: None, lambda t, n, d: None)
    with ref.whole() as whole:
        assert whole == os.path.join(cache, "data")
        t = threading.Thread(target=evictor)
        t.start()  # waits for the loop's setup
        deadline = time.monotonic() + 10
        while not _waiting_on(os.path.join(cache, "fetch.lock"), LOOP_LOCK):
            assert time.monotonic() < deadline and t.is_alive(), "the eviction did not wait for the loop's setup"
            time.sleep(0.005)
        fd, _ = loops.hold(tid, whole, template_label(store.tag, tid), direct_io=False)
    try:
        t.join(10)
        assert [e.errno for e in refused] == [errno.EBUSY], refused
        assert f"backs /dev/loop{loops_over(cache)[0]}" in str(refused[0])
        # what the template's documents and the command line say of it: whole, read by that loop
        lazy = store.template_doc(store.template("lz"))["lazy"]
        assert (lazy["whole"], lazy["loops"]) == (True, loops_over(cache)) and len(lazy["loops"]) == 1
        assert [(d["whole"], d["loops"]) for d in store.lazy_templates()] == [(True, lazy["loops"])]
        out = cowdisk_cli(store.root, "template", "inspect", "lz").stdout
        assert f"(4/4 chunks, whole, read by /dev/loop{lazy['loops'][0]})" in out, out
        for stopped in (False, True):  # served: single chunks; not served: the whole cache
            if stopped:
                store.stop_lazy_template(m.digest)
            notes = store.gc().orphans_removed
            assert any("not evicted" in n and "/dev/loop" in n for n in notes), notes
            assert sorted(read_record(cache)) == [0, 1, 2, 3]
            assert hashlib.sha256(open(os.path.join(cache, "data"), "rb").read()).hexdigest() == m.template
            assert os.pread(fd, 4 * MiB, 0) == data
    finally:
        os.close(fd)
    deadline = time.monotonic() + 10
    while loops_over(cache):  # autoclear: gone at the last close
        assert time.monotonic() < deadline, loops_over(cache)
        time.sleep(0.01)
    assert f"lazy template {m.digest[:16]}: evicted 4 chunks ({4 * MiB} bytes) to keep the cache under 1 bytes" \
        in store.gc().orphans_removed
    assert read_record(cache) == [] and os.stat(os.path.join(cache, "data")).st_blocks == 0
    assert [(d["whole"], d["loops"]) for d in store.lazy_templates()] == [(False, [])]
