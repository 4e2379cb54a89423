"""A lazy template's local cache: the chunks of one template this host has fetched.

One directory per template (by its manifest digest)::

    manifest      the manifest's bytes (checked against the directory's name on open)
    data          sparse file of the template's size: a held chunk's bytes at its offset
    held          the record: one 8-byte entry per held chunk (index, check), appended
    fetch.lock    record locks (byte N: chunk N): one fetcher per chunk across processes

A read of a chunk the record does not list fetches it, checks its SHA-256 (the
manifest's name for it), writes it into ``data``, fdatasyncs ``data``, and only then
appends its entry to ``held`` and fdatasyncs that: a chunk is listed only once its
bytes are on disk. A kill at any point leaves the cache whole: bytes written but not
listed are fetched again (the same bytes), and a torn last entry (a kill inside the
append) fails its check and is ignored. A chunk that fails its check, or whose fetch
does not finish within the bound, is an error (EIO, ETIMEDOUT) to the reader: never
wrong or zero data. Every process serving the template reads the same record, so a
chunk fetched once serves every later volume on the host.

    state         shared memory of the processes using the cache (mmap): the eviction
                  epoch (8 bytes), then each chunk's last use (4 bytes, seconds)

A cache whose record lists every data chunk is *whole* (:func:`whole`): ``data`` is then
the template's bytes, and the volumes made over it read ``data`` through a read-only loop
device (:func:`whole_data`), not through the server. A loop reads a punched hole as zeros,
so :func:`evict` drops nothing while a loop is bound to ``data``; one lock byte
(``LOOP_LOCK``) orders the two.

Eviction (:func:`evict`) drops single chunks while servers read the template: it takes
the byte locks of the chunks it drops (no fetch of them in flight), rewrites the record
without them (temporary file, fsync, rename, directory fsync: never a listed chunk
without its bytes), bumps the epoch, and only then punches the holes. A read is a
seqlock's reader: it notes the epoch, checks its chunks are held, reads, and reads again
if the epoch moved meanwhile (after reloading the record): bytes read across a punch are
never served, and a chunk evicted is fetched again (checked) when read. The last-use
times are what ``gc`` evicts by (least recently used first); they are a hint, not
crash-critical.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import errno
import fcntl
import mmap
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .. import failpoints
from ..errors import RemoteError
from .chunks import Manifest, chunk_key, decode

CRASH_POINTS = ("fetch:written", "fetch:synced", "fetch:recorded", "evict:written", "evict:recorded",
                "evict:punched")
"""Where tests/ceph/test_lazy.py kills a fetch or an eviction (COWDISK_CRASH_AT)."""
ENTRY = struct.Struct("<II")
FETCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MAGIC = 0x636F7764  # "cowd"
STATE_HEAD = 8
"""The state file: the epoch (little-endian u64), then a u32 last-use time per chunk."""
RECORD_LOCK = 1 << 40
"""Byte of fetch.lock an eviction holds exclusively while it replaces the record, and a
fetch shared while it appends to it (a chunk's lock is its index's byte)."""
EVICT_LOCK = RECORD_LOCK + 1
"""Byte of fetch.lock that keeps evictions of one cache one at a time."""
LOOP_LOCK = RECORD_LOCK + 2
"""Byte of fetch.lock held exclusively by an eviction from before it looks for loops over
``data`` until its holes are punched, and by a volume's origin from its look at the record
(:func:`whole_data`) until its loop over ``data`` exists: a loop is only made over a whole
cache, and no chunk of a cache a loop reads is dropped."""


def _entry(index: int) -> bytes:
    return ENTRY.pack(index, zlib.crc32(struct.pack("<II", index, MAGIC)))


def parse_record(data: bytes) -> set[int]:
    """The chunk indexes a record lists (a torn or damaged entry is skipped)."""
    return set(record_order(data))


def record_order(data: bytes) -> list[int]:
    """The chunk indexes a record lists, in the order they were fetched (each once)."""
    out: dict[int, None] = {}
    for off in range(0, len(data) - len(data) % ENTRY.size, ENTRY.size):
        index, check = ENTRY.unpack_from(data, off)
        if check == zlib.crc32(struct.pack("<II", index, MAGIC)):
            out.setdefault(index, None)
    return list(out)


def read_record(dir: str) -> list[int]:
    """The chunks the cache in ``dir`` holds, in fetch order."""
    with open(os.path.join(dir, "held"), "rb") as f:
        return record_order(f.read())


def last_used(dir: str, manifest: Manifest) -> list[int]:
    """Each chunk's last use (seconds since the epoch; 0: never) in the cache in ``dir``."""
    try:
        with open(os.path.join(dir, "state"), "rb") as f:
            f.seek(STATE_HEAD)
            raw = f.read(4 * len(manifest.chunks))
    except FileNotFoundError:
        raw = b""
    raw = raw[:len(raw) - len(raw) % 4]
    return list(struct.unpack(f"<{len(raw) // 4}I", raw)) + [0] * (len(manifest.chunks) - len(raw) // 4)


def evict(dir: str, manifest: Manifest, drop: set[int], stray: set[int] | frozenset[int] = frozenset()) -> int:
    """Drop chunks ``drop`` from the cache in ``dir``, while servers may read it, and punch
    the chunks ``stray`` unless the record lists them (bytes a kill left unlisted:
    :func:`unlisted`; one a fetch recorded meanwhile stays); returns the bytes freed (of the
    chunks the record listed). Under the byte locks of the chunks
    (no fetch of them in flight; OFD locks: they keep out a fetch of this process too),
    the new record goes first (written to a temporary file, fsynced, renamed over
    ``held``, the directory fsynced), then the epoch is bumped (a reader reading across
    it reads again, knowing the chunks gone), then the holes are punched: a kill in
    between leaves chunks on disk that the record no longer lists, fetched again when
    read (a later eviction of them punches them). Never a listed chunk without its bytes."""
    from ..kernel import fs

    if not drop and not stray:
        return 0
    lock = os.open(os.path.join(dir, "fetch.lock"), os.O_RDWR | os.O_CLOEXEC)
    try:  # (closing it releases every lock taken on it)
        _ofd_lock(lock, LOOP_LOCK, fcntl.F_WRLCK)  # no loop made over data until the holes are punched
        busy = loops_over(dir)
        if busy:  # a loop reads a hole as zeros: wrong bytes to the volumes over it
            raise RemoteError("evict chunks", os.path.join(dir, "data"), errno.EBUSY,
                              detail=f"it backs /dev/loop{busy[0]} (the origin of volumes over the template): no "
                                     "chunk is dropped while a loop reads it")
        _ofd_lock(lock, EVICT_LOCK, fcntl.F_WRLCK)
        for i in sorted(drop | stray):  # ascending, as every evictor: no deadlock; a fetcher holds one only
            _ofd_lock(lock, i, fcntl.F_WRLCK)
        _ofd_lock(lock, RECORD_LOCK, fcntl.F_WRLCK)  # no append while it is replaced
        order = read_record(dir)
        keep = [i for i in order if i not in drop]
        gone = [i for i in order if i in drop]
        if gone:
            held = os.path.join(dir, "held")
            tmp = held + f".tmp-{os.getpid()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, b"".join(_entry(i) for i in keep))
                os.fsync(fd)
            finally:
                os.close(fd)
            failpoints.hit("evict", "written")
            os.replace(tmp, held)
            dfd = os.open(dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            failpoints.hit("evict", "recorded")
        _bump_epoch(dir, manifest)
        _ofd_lock(lock, RECORD_LOCK, fcntl.F_UNLCK)
        data = os.open(os.path.join(dir, "data"), os.O_RDWR | os.O_CLOEXEC)
        try:
            for i in sorted((drop | stray) - set(keep)):  # listed no more, or bytes a kill left unlisted
                if 0 <= i < len(manifest.chunks) and manifest.chunks[i] is not None:
                    fs.punch_hole(data, i * manifest.chunk_size, manifest.length(i))
                    failpoints.hit("evict", "punched")
        finally:
            os.close(data)
    finally:
        os.close(lock)
    return sum(manifest.length(i) for i in gone)


def whole(dir: str, manifest: Manifest) -> bool:
    """Whether the record of the cache in ``dir`` lists every data chunk of ``manifest`` (each
    was checked against its SHA-256 and its bytes synced before it was listed): ``data`` then
    holds the template's bytes, its holes the zero chunks."""
    return holds_every_chunk(manifest, set(read_record(dir)))


def holds_every_chunk(manifest: Manifest, held: set[int]) -> bool:
    """Whether ``held`` (a record's chunk indexes) lists every data chunk of ``manifest``."""
    return all(i in held for i, c in enumerate(manifest.chunks) if c is not None)


def loops_over(dir: str) -> list[int]:
    """The loop devices bound to the cache's ``data`` file (by its device and inode)."""
    from ..kernel import loop

    return [li.number for li in loop.find_by_backing(os.path.join(dir, "data"))]


@contextlib.contextmanager
def whole_data(dir: str) -> Iterator[str | None]:
    """The cache's ``data`` file when the cache is :func:`whole`, else None, under LOOP_LOCK:
    a loop made over the file inside the block is bound before an eviction can look for
    one (:func:`evict` refuses while any is), and no eviction is between the look at the
    record and the loop. A cache without its lock file (never made whole) gives None."""
    try:
        lock = os.open(os.path.join(dir, "fetch.lock"), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        lock = -1
    if lock < 0:
        yield None
        return
    try:
        _ofd_lock(lock, LOOP_LOCK, fcntl.F_WRLCK)
        yield os.path.join(dir, "data") if whole(dir, ChunkCache.read_manifest(dir)) else None
    finally:
        os.close(lock)  # (releases the lock)


def unlisted(dir: str, manifest: Manifest) -> set[int]:
    """Chunks with bytes in ``data`` that the record does not list (a kill between a fetch's
    write and its record, or inside an eviction): space the cap does not see; an eviction
    of them punches them."""
    from ..kernel import fs

    held = set(read_record(dir))
    cs = manifest.chunk_size
    out: set[int] = set()
    fd = os.open(os.path.join(dir, "data"), os.O_RDONLY | os.O_CLOEXEC)
    try:
        for off, length in fs.data_segments(fd, manifest.size):
            out.update(i for i in range(off // cs, (off + length + cs - 1) // cs) if i not in held)
    finally:
        os.close(fd)
    return {i for i in out if manifest.chunks[i] is not None}


def _state_size(manifest: Manifest) -> int:
    return STATE_HEAD + 4 * len(manifest.chunks)


def _open_state(dir: str, manifest: Manifest) -> int:
    """The state file (made, or grown, to its size: a cache made before it existed)."""
    fd = os.open(os.path.join(dir, "state"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    if os.fstat(fd).st_size < _state_size(manifest):
        os.ftruncate(fd, _state_size(manifest))
    return fd


def _bump_epoch(dir: str, manifest: Manifest) -> None:
    """One more eviction (under EVICT_LOCK: one writer). Written through the page cache the
    readers' maps share."""
    fd = _open_state(dir, manifest)
    try:
        (e,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        os.pwrite(fd, struct.pack("<Q", e + 1), 0)
    finally:
        os.close(fd)


@dataclass
class Stats:
    """What one process's cache did (the metrics)."""
    fetched_chunks: int = 0
    fetched_bytes: int = 0
    """Bytes received from the object store (compressed)."""
    cache_hits: int = 0
    """Chunk reads served from the cache."""
    remote_reads: int = 0
    """Chunk reads that had to fetch."""
    check_failures: int = 0
    fetch_seconds: list[float] = field(default_factory=list)
    """The last fetches' times (the newest 1000)."""
    fetch_buckets: list[int] = field(default_factory=lambda: [0] * len(FETCH_BUCKETS))
    """Fetches that took at most each of FETCH_BUCKETS seconds (cumulative, as Prometheus')."""
    fetch_sum: float = 0.0

    def observe(self, seconds: float) -> None:
        self.fetch_seconds.append(seconds)
        del self.fetch_seconds[:-1000]
        self.fetch_sum += seconds
        for i, b in enumerate(FETCH_BUCKETS):
            if seconds <= b:
                self.fetch_buckets[i] += 1


class ChunkCache:
    """The cache of one template (``dir``), reading missing chunks through ``get``."""

    def __init__(self, dir: str, manifest: Manifest, get: Callable[[str], bytes], *, where: Callable[[str], str],
                 bound: float = 30.0) -> None:
        """``get(key)``: the object's bytes (``key`` the chunk's key under the location);
        ``where(key)``: its URL for errors; ``bound``: seconds a chunk's fetch may take."""
        self.dir = dir
        self.m = manifest
        self._get = get
        self._where = where
        self.bound = bound
        self.stats = Stats()
        self._held: set[int] = set()
        self._record_pos = 0
        self._lock = threading.Lock()
        self._append_lock = threading.Lock()
        self._chunk_locks: dict[int, threading.Lock] = {}
        self._data = os.open(os.path.join(dir, "data"), os.O_RDWR | os.O_CLOEXEC)
        self._record = os.open(os.path.join(dir, "held"), os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        self._flock = os.open(os.path.join(dir, "fetch.lock"), os.O_RDWR | os.O_CLOEXEC)
        sfd = _open_state(dir, manifest)
        try:
            self._state = mmap.mmap(sfd, _state_size(manifest))
        finally:
            os.close(sfd)
        self._used = memoryview(self._state)[STATE_HEAD:].cast("I")
        self._epoch = -1
        self.refresh()

    @staticmethod
    def create(dir: str, manifest: Manifest) -> None:
        """Make the cache directory of ``manifest`` (once; an existing one is kept, whole)."""
        os.makedirs(dir, mode=0o700, exist_ok=True)
        mpath = os.path.join(dir, "manifest")
        if not os.path.exists(mpath):
            tmp = mpath + f".tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(manifest.to_bytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, mpath)
        for name in ("data", "fetch.lock", "held"):  # held last: a cache with it is whole
            fd = os.open(os.path.join(dir, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                if name == "data" and os.fstat(fd).st_size != manifest.size:
                    os.ftruncate(fd, manifest.size)
            finally:
                os.close(fd)
            if name == "fetch.lock":
                os.close(_open_state(dir, manifest))

    @staticmethod
    def read_manifest(dir: str) -> Manifest:
        with open(os.path.join(dir, "manifest"), "rb") as f:
            return Manifest.from_bytes(f.read(), os.path.basename(dir.rstrip("/")))

    def close(self) -> None:
        self._used.release()
        self._state.close()
        for fd in (self._data, self._record, self._flock):
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- the record ----------------------------------------------------------------------

    def refresh(self) -> None:
        """Read the entries other processes appended since the last look; the whole record
        again when an eviction replaced it (the epoch moved, or the file was renamed over)."""
        with self._lock:
            e = self._epoch_now()
            if e != self._epoch or os.fstat(self._record).st_nlink == 0:
                self._reload(e)
                return
            size = os.fstat(self._record).st_size
            if size > self._record_pos:
                start = self._record_pos - self._record_pos % ENTRY.size
                self._held |= parse_record(os.pread(self._record, size - start, start))
                self._record_pos = size - size % ENTRY.size

    def _reload(self, epoch: int) -> None:
        """The record read whole from its path (``self._lock`` held), as of ``epoch`` (read
        before it: an eviction renames before it bumps)."""
        fd = os.open(os.path.join(self.dir, "held"), os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        os.close(self._record)
        self._record = fd
        size = os.fstat(fd).st_size
        self._held = parse_record(os.pread(fd, size, 0))
        self._record_pos = size - size % ENTRY.size
        self._epoch = epoch

    def _epoch_now(self) -> int:
        return int(struct.unpack_from("<Q", self._state, 0)[0])

    def held(self) -> set[int]:
        self.refresh()
        with self._lock:
            return set(self._held)

    def held_bytes(self) -> int:
        return sum(self.m.length(i) for i in self.held())

    # -- reading -------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of the template; the chunks they touch are fetched
        first when the cache lacks them (RemoteError when one cannot be had)."""
        if length < 0:
            raise RemoteError("read lazy template", self.dir, errno.EINVAL, detail=f"{length} bytes at {offset}")
        buf = bytearray(length)
        self.read_into(buf, offset)
        return bytes(buf)

    def read_into(self, buf: bytearray | memoryview, offset: int) -> None:
        """Fill ``buf`` with the template's bytes at ``offset``, as :meth:`read` (the server's
        path: one preadv into the client's buffer, no copy). A chunk the record lists is
        served at once, as :meth:`ensure` would after its first look (its last use noted,
        counted as a cache hit); the others go through :meth:`ensure`."""
        length = len(buf)
        if offset < 0 or offset + length > self.m.size:
            raise RemoteError("read lazy template", self.dir, errno.EINVAL,
                              detail=f"{length} bytes at {offset} past its size {self.m.size}")
        cs, chunks, used = self.m.chunk_size, self.m.chunks, self._used
        while True:  # a seqlock's reader: an eviction between the look and the read reads again
            e = self._epoch_now()
            if e != self._epoch:
                self.refresh()
            now = int(time.time())
            for i in range(offset // cs, (offset + length + cs - 1) // cs):
                if chunks[i] is None:
                    continue  # zeros: a hole in data
                if i in self._held:
                    if used[i] != now:
                        used[i] = now  # the least recently used are evicted first
                    with self._lock:
                        self.stats.cache_hits += 1
                else:
                    self.ensure(i)
            n = os.preadv(self._data, [buf], offset)
            if self._epoch_now() == e:
                break
        if n != length:
            raise RemoteError("read lazy template", self.dir, errno.EIO, detail=f"short read at {offset}")

    def ensure(self, index: int) -> bool:
        """Make chunk ``index`` held (fetch, check, write, record); True when it had to fetch."""
        if self.m.chunks[index] is None:
            return False  # zeros: a hole in data
        now = int(time.time())
        if self._used[index] != now:
            self._used[index] = now  # the least recently used are evicted first
        with self._lock:
            if index in self._held:
                self.stats.cache_hits += 1
                return False
            lock = self._chunk_locks.setdefault(index, threading.Lock())
        with lock:
            self.refresh()
            with self._lock:
                if index in self._held:
                    self.stats.cache_hits += 1
                    return False
            with _range_lock(self._flock, index):  # another process may be fetching it (or evicting it): look again
                self.refresh()
                with self._lock:
                    if index in self._held:
                        self.stats.cache_hits += 1
                        return False
                self._fetch(index)
        return True

    def _fetch(self, index: int) -> None:
        name = self.m.chunks[index]
        assert name is not None
        key = chunk_key(name)
        t0 = time.monotonic()
        self.stats.remote_reads += 1
        fut = _in_daemon_thread(self._get, key)
        try:
            blob = fut.result(timeout=self.bound)
        except cf.TimeoutError:
            raise RemoteError("fetch chunk", self._where(key), errno.ETIMEDOUT,
                              detail=f"not fetched within {self.bound:g} s") from None
        try:
            data = decode(blob, name, self.m.length(index), self._where(key))
        except RemoteError:
            self.stats.check_failures += 1
            raise
        off = index * self.m.chunk_size
        _pwrite_all(self._data, data, off)
        failpoints.hit("fetch", "written")
        os.fdatasync(self._data)  # the bytes are on disk before the record lists them
        failpoints.hit("fetch", "synced")
        with self._append_lock, _range_lock(self._flock, RECORD_LOCK, shared=True):  # not while it is replaced
            with self._lock:  # (a reload replaces the descriptor: its own copy, synced outside the lock)
                if os.fstat(self._record).st_nlink == 0:  # an eviction renamed a new record over it
                    self._reload(self._epoch)
                fd = os.dup(self._record)
            try:
                os.write(fd, _entry(index))
                os.fdatasync(fd)
            finally:
                os.close(fd)
        failpoints.hit("fetch", "recorded")
        with self._lock:
            self._held.add(index)
        self.stats.fetched_chunks += 1
        self.stats.fetched_bytes += len(blob)
        self.stats.observe(time.monotonic() - t0)


def _in_daemon_thread(fn: Callable[[str], bytes], key: str) -> "cf.Future[bytes]":
    """``fn(key)`` in a thread of its own that does not hold up the process's exit: a server
    stopped while a fetch is still waiting on the object store (or importing its client)
    exits at once, as a SIGKILL would stop it (the record is written last: an abandoned
    fetch left nothing listed). A pool's threads are joined at exit."""
    fut: "cf.Future[bytes]" = cf.Future()

    def run() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(key))
        except BaseException as e:  # handed to the waiting reader
            fut.set_exception(e)

    threading.Thread(target=run, name="cowdisk-fetch", daemon=True).start()
    return fut


def _pwrite_all(fd: int, data: bytes, off: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, off)
        view = view[n:]
        off += n


def _ofd_lock(fd: int, byte: int, kind: int) -> None:
    """An open file description lock (F_OFD_SETLKW) on byte ``byte`` of ``fd``: ``kind``
    F_RDLCK, F_WRLCK or F_UNLCK. Unlike a POSIX record lock it belongs to the open file,
    not the process: it conflicts with another open of the file in this process too (an
    eviction beside a fetch), and closing another descriptor of the file keeps it."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, struct.pack("hhqqi4x", kind, os.SEEK_SET, byte, 1, 0))


@contextlib.contextmanager
def _range_lock(fd: int, index: int, *, shared: bool = False) -> Iterator[None]:
    """Byte ``index`` of fetch.lock (exclusive: one fetcher of a chunk across processes; the
    threads of one process, which share the open file, are kept apart by their own lock)."""
    _ofd_lock(fd, index, fcntl.F_RDLCK if shared else fcntl.F_WRLCK)
    try:
        yield
    finally:
        _ofd_lock(fd, index, fcntl.F_UNLCK)
