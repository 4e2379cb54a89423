"""Volumes over a lazy template on dm-thin and dm-snapshot (issue 25 item 3), against the
real kernel's nbd and device-mapper in the lab: the template's bytes come from its nbdkit
server through a read-only /dev/nbdN (dm-thin's external origin, dm-snapshot's origin), no
data copied.

The lab has no object store: the lazy cache is made with the project's own format and fetch
path (remoteutil.offline_lazy) from a small ext4 image, every chunk but one, and the remote
config's endpoint refuses connections: cached chunks read right, the missing one is EIO.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import signal
import subprocess
import time

import pytest

from cowdisk.kernel import loop, nbd
from cowdisk.kernel.procfs import process_name
from cowdisk.remote.cache import ChunkCache, loops_over, read_record
from cowdisk.remote.lazy import KEEPER_NAME, keeper
from cowdisk.store import Store
from remoteutil import chunked, offline_lazy
from testutil import MiB, make_tree, sha

pytestmark = [pytest.mark.lab, pytest.mark.backends("dm-thin", "dm-snapshot")]

CHUNK = 256 << 10
SIZE = 4 * MiB


def ext4_image(tmp_path) -> tuple[str, int]:
    """A 4 MiB ext4 image (no journal) of make_tree's tree, and a chunk that holds only file
    data (inside payload.bin: e2fsck never reads it), not chunk 3 or 4 (the test reads those)."""
    img = str(tmp_path / "lazy.img")
    with open(img, "wb") as f:
        f.truncate(SIZE)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-O", "^has_journal", "-d", make_tree(str(tmp_path / "tree")), img],
                   check=True, capture_output=True)
    out = subprocess.run(["debugfs", "-R", "blocks /payload.bin", img], check=True, capture_output=True,
                         text=True).stdout
    blocks = {int(b) for b in out.split()}
    per = CHUNK // 4096
    inside = [c for c in range(SIZE // CHUNK) if all(c * per + k in blocks for k in range(per)) and c not in (3, 4)]
    assert inside, out
    return img, inside[len(inside) // 2]


def pread_direct(dev: str, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` with O_DIRECT (no readahead into a neighbouring chunk)."""
    buf = mmap.mmap(-1, length)
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        n = os.preadv(fd, [buf], offset)
        assert n == length
        return bytes(buf)
    finally:
        os.close(fd)
        buf.close()


def pwrite_direct(dev: str, offset: int, data: bytes) -> None:
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        assert os.pwritev(fd, [buf], offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()


def ours(store: Store) -> list[nbd.NbdDevice]:
    """The store's connected nbd devices (by the backend identifier it names them with)."""
    return [d for d in nbd.devices() if d.connected and d.backend.startswith(store.tag + ":")]


def nbdkits() -> set[int]:
    """The servers and their keepers running on the host."""
    return {int(p) for p in os.listdir("/proc") if p.isdigit() and process_name(int(p)) in ("nbdkit", KEEPER_NAME)}


def wait_for(cond, what: str, deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while not cond():
        assert time.monotonic() < end, what
        time.sleep(0.02)


def test_volumes_over_a_lazy_template(store, backend, tmp_path) -> None:
    servers = nbdkits()
    img, missing = ext4_image(tmp_path)
    url, m = offline_lazy(store, img, hold=set(range(SIZE // CHUNK)) - {missing}, chunk_size=CHUNK,
                          timeout=0.2)
    data_file = os.path.join(store.data_root, "lazy", m.digest, "data")
    cached = sha(data_file)
    tid = store.lazy_template(url, "lz")["id"]

    v1 = store.create_volume("v1", "lz")
    nb = ours(store)
    assert len(nb) == 1 and nb[0].backend == f"{store.tag}:t:{tid}" and nb[0].size == SIZE, nb
    table = subprocess.run(["dmsetup", "table", store.dm_prefix + "v1"], capture_output=True, text=True,
                           check=True).stdout.split()
    origin = nb[0].devno
    if backend == "dm-thin":  # <pool> <id> <external origin>
        assert table[2] == "thin" and table[5] == origin, table
    else:  # <origin> <cow> P <chunk>
        assert table[2] == "snapshot" and table[3] == origin, table
    fsck = subprocess.run(["e2fsck", "-f", "-n", v1.device], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    # a cached chunk reads as the template's bytes; the missing one is EIO (the endpoint refuses)
    with open(img, "rb") as f:
        f.seek(3 * CHUNK)
        want = f.read(CHUNK)
    assert pread_direct(v1.device, 3 * CHUNK, CHUNK) == want
    with pytest.raises(OSError) as e:
        pread_direct(v1.device, missing * CHUNK, 4096)
    assert e.value.errno == errno.EIO

    # a write lands in the volume only: not in the cache, not in a second volume
    new = os.urandom(64 << 10)
    pwrite_direct(v1.device, 3 * CHUNK, new)
    assert pread_direct(v1.device, 3 * CHUNK, len(new)) == new
    v2 = store.create_volume("v2", "lz")
    assert len(ours(store)) == 1  # one nbd device per template, shared
    assert pread_direct(v2.device, 3 * CHUNK, CHUNK) == want
    assert sha(data_file) == cached

    # (what follows is dm_common's and the keeper's, the same on both backends: split between them)
    chunks = open(img, "rb").read()[3 * CHUNK:5 * CHUNK]
    if backend == "dm-thin":
        server_killed_keeper_reconnects(store, chunks)
        devices_come_and_go(store, new)
    else:
        killed_create_is_undone(store)
        host_down_next_attach_reconnects(store, chunks)

    for v in ("v1", "v2"):
        store.remove_volume(v)
    wait_for(lambda: ours(store) == [], f"nbd devices left connected: {ours(store)}")
    whole_cache_reads_through_a_loop(store, backend, img, m, missing)
    store.remove_template("lz")
    wait_for(lambda: nbdkits() == servers, "the template's nbdkit outlived it")


def whole_cache_reads_through_a_loop(store: Store, backend: str, img: str, m, missing: int) -> None:
    """The missing chunk fetched (the cache's own fetch path: checked, written, synced,
    recorded), the cache is whole: a new volume's origin is a read-only autoclear loop
    over the cache's data file, not the nbd device, and reads the template (e2fsck, every
    byte). gc with a cap of 1 byte while it is attached evicts nothing (a loop reads a
    punched hole as zeros): every chunk listed, the data file the template's bytes, the
    volume reads right. Once the volume is gone the loop is gone too (autoclear) and gc
    evicts. On dm-snapshot, first a create killed between the loop's setup and the table
    (crash point create:template_loop): recovery undoes it and no loop is left."""
    cache = os.path.join(store.data_root, "lazy", m.digest)
    data_file = os.path.join(cache, "data")
    _, blobs = chunked(img, CHUNK)
    c = ChunkCache(cache, m, lambda key: blobs[key], where=str)
    try:
        assert c.ensure(missing)
    finally:
        c.close()
    template = open(img, "rb").read()
    assert sha(data_file) == hashlib.sha256(template).hexdigest()
    if backend == "dm-snapshot":
        create_killed_at(store, "create:template_loop")
        wait_for(lambda: loops_over(cache) == [], f"loops left over the cache: {loops_over(cache)}")

    v3 = store.create_volume("v3", "lz")
    table = subprocess.run(["dmsetup", "table", store.dm_prefix + "v3"], capture_output=True, text=True,
                           check=True).stdout.split()
    origin = table[5] if backend == "dm-thin" else table[3]
    n = loop.number_from_path(os.readlink(f"/sys/dev/block/{origin}"))
    li = loop.info(n)
    assert origin.startswith(f"{loop.LOOP_MAJOR}:") and li is not None, (table, li)
    assert li.read_only and li.autoclear and os.path.samefile(li.backing_file, data_file), li
    assert loops_over(cache) == [n] and ours(store) == []  # no nbd device for it
    lazy = store.template_doc(store.template("lz"))["lazy"]  # what template inspect and ls show
    assert (lazy["whole"], lazy["loops"]) == (True, [n]), lazy
    fsck = subprocess.run(["e2fsck", "-f", "-n", v3.device], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert pread_direct(v3.device, 0, SIZE) == template

    with open(os.path.join(store.root, "remote.toml"), "a") as f:
        f.write("cache_cap = 1\n")
    notes = store.gc().orphans_removed
    assert f"lazy template {m.digest[:16]}: not evicted: its cache file backs /dev/loop{n} (the origin of volumes " \
           "over it)" in notes, notes
    assert sorted(read_record(cache)) == [i for i, k in enumerate(m.chunks) if k is not None]
    assert sha(data_file) == hashlib.sha256(template).hexdigest()
    assert pread_direct(v3.device, 0, SIZE) == template

    store.remove_volume("v3")
    wait_for(lambda: loops_over(cache) == [], f"loops left over the cache: {loops_over(cache)}")
    notes = store.gc().orphans_removed
    assert read_record(cache) == [] and os.stat(data_file).st_blocks == 0, notes


def server_killed_keeper_reconnects(store: Store, chunks: bytes) -> None:
    """The server SIGKILLed under an attached volume: its keeper starts it again and has the
    kernel's device reconnected (remote/keeper.py, kernel/nbd.py reconnect_noted); the
    volume's read of a block it has not written, sent while the server was gone, waits for
    the new connection and returns the template's bytes."""
    pid = store.lazy_templates()[0]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: process_name(pid) != "nbdkit", "nbdkit outlived its SIGKILL")
    assert pread_direct(store.volume("v1").device or "", 4 * CHUNK, CHUNK) == chunks[CHUNK:]
    assert store.lazy_templates()[0]["pid"] not in (None, pid) and len(ours(store)) == 1


def host_down_next_attach_reconnects(store: Store, chunks: bytes) -> None:
    """The keeper and the server both killed (the host's processes gone, the kernel's
    devices not): the next attach starts a server and gives the device a new connection
    in place of the dead one; the attached volume reads on."""
    store.checkpoint("v2")
    doc = store.lazy_templates()[0]
    gone = [keeper(doc["cache"]), doc["pid"]]
    for p in gone:
        os.kill(p, signal.SIGKILL)
    wait_for(lambda: not {process_name(p) for p in gone} & {"nbdkit", KEEPER_NAME}, "nbdkit outlived its SIGKILL")
    v2 = store.restore("v2")
    assert pread_direct(store.volume("v1").device or "", 4 * CHUNK, CHUNK) == chunks[CHUNK:]
    assert pread_direct(v2.device or "", 3 * CHUNK, CHUNK) == chunks[:CHUNK] and len(ours(store)) == 1


def devices_come_and_go(store: Store, new: bytes) -> None:
    """Checkpointed: nothing opens the nbd device, the kernel disconnected it; restore
    connects one."""
    store.checkpoint("v1")
    store.checkpoint("v2")
    wait_for(lambda: ours(store) == [], f"nbd devices left connected: {ours(store)}")
    v1 = store.restore("v1")
    assert pread_direct(v1.device or "", 3 * CHUNK, len(new)) == new and len(ours(store)) == 1
    store.restore("v2")


def killed_create_is_undone(store: Store) -> None:
    """A create killed once its dm device exists: recovery undoes it, and the nbd device is
    left to the two other volumes."""
    create_killed_at(store, "create:dm")
    wait_for(lambda: [len(d.holders) for d in ours(store)] == [2], f"nbd devices: {ours(store)}")


def create_killed_at(store: Store, point: str) -> None:
    """A create of volume "crash" over "lz" in a child SIGKILLed at crash point ``point``;
    recovery (a store opened again) undoes it."""
    pid = os.fork()
    if pid == 0:
        os.environ["COWDISK_CRASH_AT"] = point
        Store(store.root, recover=False).create_volume("crash", "lz")
        os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    with Store(store.root) as again:  # recovery runs on open
        assert "crash" not in [v.id for v in again.volumes()]
