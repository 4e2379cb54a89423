"""The random-kill harness over a lazy template's chunk cache (remote/cache.py, issue 25
item 4): fetches, publishes into the cache, its record, eviction and ``gc``'s trim,
SIGKILLed at random moments, and the cache checked whole after each round.

The cache is a store's (``<data root>/lazy/<manifest>/``), served by the store's nbdkit
under its keeper. The chunks come from a local source: the objects a push would store,
as files (tests/remoteutil.py ``chunk_dir``), read by the cache's own fetch path
(``ChunkCache``: fetched, checked against the manifest's SHA-256, written, fdatasynced,
then recorded); two of them are altered in the source (one garbage, one another chunk's
valid object), so a read of those is EIO, never data. The server's own config names an
endpoint that refuses connections: through it, a chunk the cache lacks is EIO.

One *round*: one to three children at once, each running one kind of work in a loop
until it is killed, each SIGKILLed after its own random delay (0 to 250 ms after it
started):

* ``read``: random ranges (up to three chunks, across chunk boundaries) through a
  ``ChunkCache`` of its own; every byte compared with the image (an altered chunk must be
  a RemoteError with EIO);
* ``prefetch``: four threads making random chunks held (``ensure``), as `pull --prefetch`;
* ``evict``: ``evict()`` of one to four random chunks, while the others read;
* ``trim``: the store's ``gc`` (recovery, then the trim to the cap: single chunks of the
  served template, least recently used first, and bytes kills left unlisted);
* ``nbd``: NBD reads through the served nbdkit (the real server, its plugin over the
  same cache): each the image's bytes or EIO.

Sometimes the parent SIGKILLs nbdkit too (its keeper starts it again; the ``nbd`` child
connects again). A child writes what it saw wrong to a pipe as it sees it. After the
round, with every child dead:

* nothing a child saw was wrong: never other bytes than the image's, never zeros for data;
* every chunk the record lists has its SHA-256 in the data file, and the record parses;
* recovery (a store opened) leaves no temporary file of a dead process in the cache;
* every fourth round (and at the end) a whole ``gc``: the listed bytes within the cap,
  and the data file holds no bytes the record does not list (a kill's leftovers punched);
* at the end: the whole template read through a cache of its own is the image's bytes
  (the altered chunks EIO), and through the server every listed chunk is right.

A violation raises with the seed, the round and what the round ran; ``bench/faults.py
--lazy`` counts them and goes on. ``COWDISK_FAULT_SEED`` (or ``--fault-seed``) replays a
seed: one random stream draws the image, the altered chunks, each round's children and
their delays and work; the kill moments land where this host's timing puts them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import select
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from cowdisk.errors import RemoteError
from cowdisk.kernel import fs
from cowdisk.kernel.procfs import process_alive
from cowdisk.remote import lazy
from cowdisk.remote.cache import ChunkCache, evict, read_record, unlisted
from cowdisk.store import Store

from .harness import Violation, env_seed

CS = 64 << 10
CHUNKS = 24
HOLES = (5, 11)
ZEROS = (17,)
CAP = 10
"""The cap, in chunks: fewer than the template's 21 data chunks, so trims evict."""
KINDS = ("read", "prefetch", "evict", "trim", "nbd")
WEIGHTS = (3, 2, 3, 1, 2)
MAX_DELAY = 0.25


@dataclass
class LazyCounts:
    seed: int
    rounds: int = 0
    children: int = 0
    kills: int = 0  # children that died of our SIGKILL (the rest: an error, a violation)
    server_kills: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    reads: int = 0  # reads a child checked (ChunkCache and NBD), of those reported
    strays_punched: int = 0  # chunks a kill left unlisted, punched by gc
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)

    def line(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.by_kind.items()))
        return (f"lazy cache: {self.rounds} rounds, {self.children} children ({kinds}), {self.kills} killed, "
                f"{self.reads} reads checked, "
                f"{self.server_kills} nbdkit kills, {self.strays_punched} unlisted chunks punched, "
                f"{len(self.violations)} violations, {self.seconds:.1f}s (seed {self.seed})")


class LazyHarness:
    def __init__(self, root: str, work: str, *, seed: int | None = None, keep_going: bool = False,
                 log: Callable[[str], None] | None = None) -> None:
        if seed is None:
            seed = env_seed()
        if seed is None:
            seed = random.SystemRandom().randrange(1 << 32)
        self.root, self.work, self.seed = root, work, seed
        self.rng = random.Random(seed)
        self.keep_going = keep_going
        self.log = log or (lambda _m: None)
        self.counts = LazyCounts(seed)
        self.image = b""
        self.bad: set[int] = set()
        self.m: Any = None
        self.get: Callable[[str], bytes] | None = None
        self.cache = ""
        self.url = ""

    # -- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        from remoteutil import chunk_dir, chunked, offline_lazy

        os.makedirs(self.work, exist_ok=True)
        parts = []
        for i in range(CHUNKS):
            parts.append(bytes(CS) if i in HOLES or i in ZEROS else self.rng.randbytes(CS))
        parts[20] = parts[2]  # a chunk twice: one object
        self.image = b"".join(parts)
        img = os.path.join(self.work, "image.raw")
        with open(img, "wb") as f:
            f.truncate(len(self.image))
            for i, p in enumerate(parts):
                if i not in HOLES:
                    f.seek(i * CS)
                    f.write(p)
        m, blobs = chunked(img, CS)
        self.m = m
        self.get = chunk_dir(blobs, os.path.join(self.work, "source"))
        data = [i for i, c in enumerate(m.chunks) if c is not None and c != m.chunks[2]]
        garbage, other = self.rng.sample(data, 2)
        self.bad = {garbage, other}
        src = os.path.join(self.work, "source", "chunks")
        with open(os.path.join(src, m.chunks[garbage]), "wb") as f:
            f.write(self.rng.randbytes(300))
        good = next(i for i in data if i not in self.bad)
        with open(os.path.join(src, m.chunks[other]), "wb") as f:
            f.write(blobs[f"chunks/{m.chunks[good]}"])  # a valid object of other bytes
        with Store(self.root) as s:
            self.url, _ = offline_lazy(s, img, hold=set(), chunk_size=CS, timeout=0.5, cache_cap=CAP * CS)
            doc = s.lazy_template(self.url, "lz")
        self.cache = doc["cache"]

    # -- the children --------------------------------------------------------------------

    def _expect(self, off: int, length: int) -> bytes | None:
        """The image's bytes, or None when the range touches an altered chunk (EIO)."""
        if any(i in self.bad for i in range(off // CS, (off + length + CS - 1) // CS)):
            return None
        return self.image[off:off + length]

    def _range(self, rng: random.Random) -> tuple[int, int]:
        off = rng.randrange(len(self.image) - 1)
        return off, rng.randrange(1, min(3 * CS, len(self.image) - off) + 1)

    def _work(self, kind: int, seed: int, w: int) -> None:
        rng = random.Random(seed)
        assert self.get is not None

        def bad(text: str) -> None:
            os.write(w, f"{KINDS[kind]}: {text}\n".encode())

        if KINDS[kind] in ("read", "prefetch"):
            c = ChunkCache(self.cache, self.m, self.get, where=str, bound=5)
        os.write(w, b"S\n")
        if KINDS[kind] == "read":
            while True:
                off, length = self._range(rng)
                want = self._expect(off, length)
                try:
                    got = c.read(off, length)
                except RemoteError as e:
                    if want is not None or e.errno != errno.EIO:
                        bad(f"{length} at {off}: {e} (errno {e.errno})")
                    continue
                if want is None:
                    bad(f"{length} at {off}: bytes served from an altered chunk")
                elif got != want:
                    bad(f"{length} at {off}: wrong bytes (zeros: {got == bytes(length)})")
                os.write(w, b".\n")
        elif KINDS[kind] == "prefetch":
            def one(tseed: int) -> None:
                trng = random.Random(tseed)
                while True:
                    i = trng.randrange(CHUNKS)
                    try:
                        c.ensure(i)
                    except RemoteError as e:
                        if i not in self.bad or e.errno != errno.EIO:
                            bad(f"chunk {i}: {e}")
                    except BaseException:
                        bad(f"chunk {i}: {traceback.format_exc()[-1500:]}")
                        raise
            for t in range(4):
                threading.Thread(target=one, args=(rng.randrange(1 << 32),), daemon=True).start()
            while True:
                time.sleep(1)
        elif KINDS[kind] == "evict":
            while True:
                evict(self.cache, self.m, set(rng.sample(range(CHUNKS), rng.randrange(1, 5))))
        elif KINDS[kind] == "trim":
            with Store(self.root, recover=False) as s:
                while True:
                    s.gc()
        else:
            self._nbd(rng, w, bad)

    def _nbd(self, rng: random.Random, w: int, bad: Callable[[str], None]) -> None:
        from cowdisk.kernel import nbd
        from remoteutil import nbd_pread

        sock = None
        while True:
            if sock is None:
                try:
                    sock, _ = nbd.open_export(lazy.socket_path(self.cache), timeout=5)
                except Exception:  # the server killed: its keeper starts it again
                    time.sleep(0.01)
                    continue
            off, length = self._range(rng)
            want = self._expect(off, length)
            try:
                got = nbd_pread(sock, length, off)
            except OSError as e:
                if e.errno == errno.EIO:
                    continue  # not held (its endpoint refuses), or altered: never data
                sock.close()  # the connection: the server went away
                sock = None
                continue
            if want is not None and got != want:
                bad(f"NBD {length} at {off}: wrong bytes (zeros: {got == bytes(length)})")
            elif want is None:
                bad(f"NBD {length} at {off}: bytes served from an altered chunk")
            os.write(w, b".\n")

    # -- a round -------------------------------------------------------------------------

    def round(self) -> None:
        self.counts.rounds += 1
        n = self.rng.choice((1, 2, 2, 3))
        kinds = [self.rng.choices(range(len(KINDS)), WEIGHTS)[0] for _ in range(n)]
        delays = [self.rng.uniform(0, MAX_DELAY) for _ in kinds]
        seeds = [self.rng.randrange(1 << 32) for _ in kinds]
        server_kill = self.rng.uniform(0, MAX_DELAY) if self.rng.random() < 0.1 else None
        what = (f"round {self.counts.rounds}: " + ", ".join(f"{KINDS[k]} killed at {d * 1000:.0f} ms"
                                                              for k, d in zip(kinds, delays))
                + (f", nbdkit killed at {server_kill * 1000:.0f} ms" if server_kill is not None else ""))
        r, w = os.pipe()
        pids = []
        for k, seed in zip(kinds, seeds):
            pid = os.fork()
            if pid == 0:
                code = 3
                try:
                    os.close(r)
                    self._work(k, seed, w)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.write(w, f"{KINDS[k]}: {traceback.format_exc()[-1500:]}\n".encode())
                finally:
                    os._exit(code)
            pids.append(pid)
            self.counts.children += 1
            self.counts.by_kind[KINDS[k]] = self.counts.by_kind.get(KINDS[k], 0) + 1
        os.close(w)
        out = b""
        try:
            out = self._kill_all(r, pids, delays, server_kill)
        finally:
            os.close(r)
        lines = out.decode(errors="replace").splitlines()
        self.counts.reads += lines.count(".")
        seen = [x for x in lines if x not in (".", "S")]
        if seen:
            self.violation(what, "; ".join(seen))
        self.check(what, full=self.counts.rounds % 4 == 0)

    def _kill_all(self, r: int, pids: list[int], delays: list[float], server_kill: float | None) -> bytes:
        """Each child SIGKILLed ``delay`` after it said it started (nbdkit at ``server_kill``
        after the round began); the pipe's text."""
        out = b""
        started = 0
        t0 = time.monotonic()
        deadline = t0 + 30
        while started < len(pids) and time.monotonic() < deadline:  # every child started its work
            if not select.select([r], [], [], 0.1)[0]:
                if any(os.waitpid(p, os.WNOHANG)[0] for p in pids):
                    break  # one ended before it started: its note says why
                continue
            part = os.read(r, 65536)
            if not part:
                break
            out += part
            started = out.count(b"S\n")
        t0 = time.monotonic()
        plan = sorted([(d, p) for d, p in zip(delays, pids)] + ([(server_kill, 0)] if server_kill is not None else []))
        os.set_blocking(r, False)
        for d, pid in plan:
            while time.monotonic() < t0 + d:
                time.sleep(min(0.005, max(0.0, t0 + d - time.monotonic())))
                out += self._drain(r)
            if pid == 0:
                s = lazy.server(self.cache)
                if s is not None:
                    os.kill(s.pid, signal.SIGKILL)
                    self.counts.server_kills += 1
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
                self.counts.kills += 1
        os.set_blocking(r, True)
        while part := os.read(r, 65536):
            out += part
        return out

    @staticmethod
    def _drain(r: int) -> bytes:
        try:
            return os.read(r, 65536)
        except BlockingIOError:
            return b""

    # -- the checks ----------------------------------------------------------------------

    def listed_right(self, what: str) -> list[int]:
        listed = read_record(self.cache)
        with open(os.path.join(self.cache, "data"), "rb") as f:
            for i in listed:
                if self.m.chunks[i] is None:
                    self.violation(what, f"chunk {i}, a hole in the manifest, is listed")
                f.seek(i * CS)
                if hashlib.sha256(f.read(self.m.length(i))).hexdigest() != self.m.chunks[i]:
                    self.violation(what, f"chunk {i} is listed but its bytes are not its SHA-256")
        return listed

    def check(self, what: str, full: bool) -> None:
        self.listed_right(what)
        with Store(self.root) as s:  # recovery on open
            if full:
                notes = s.gc().orphans_removed
                for n in notes:
                    if "a kill left unlisted" in n:
                        self.counts.strays_punched += int(n.split("punched ", 1)[1].split()[0])
        for entry in os.listdir(self.cache):
            _, sep, who = entry.rpartition(".tmp-")
            if sep and who.isdigit() and not process_alive(int(who)):
                self.violation(what, f"{entry}: a dead writer's temporary file left after recovery")
        if full:
            listed = self.listed_right(what)
            held_bytes = sum(self.m.length(i) for i in listed)
            if held_bytes > CAP * CS:
                self.violation(what, f"{held_bytes} bytes listed after gc, over the cap of {CAP * CS}")
            stray = unlisted(self.cache, self.m)
            if stray:
                self.violation(what, f"chunks {sorted(stray)} have bytes the record does not list after gc")
            fd = os.open(os.path.join(self.cache, "data"), os.O_RDONLY)
            try:  # its data extents (st_blocks counts the extent tree's blocks too)
                allocated = sum(n for _, n in fs.data_segments(fd, self.m.size))
            finally:
                os.close(fd)
            if allocated > held_bytes:
                self.violation(what, f"the data file holds {allocated} bytes of data, the record lists {held_bytes}")

    def final(self) -> None:
        """The whole template through a cache of its own, and the listed chunks through the server."""
        from cowdisk.kernel import nbd
        from remoteutil import nbd_pread

        assert self.get is not None
        what = "final read"
        c = ChunkCache(self.cache, self.m, self.get, where=str, bound=5)
        try:
            for i in range(CHUNKS):
                want = self._expect(i * CS, CS)
                try:
                    got: bytes | None = c.read(i * CS, CS)
                except RemoteError as e:
                    got = None
                    if want is not None or e.errno != errno.EIO:
                        self.violation(what, f"chunk {i}: {e}")
                if want is not None and got != want:
                    self.violation(what, f"chunk {i}: wrong bytes")
        finally:
            c.close()
        deadline = time.monotonic() + 15  # the keeper's pause after repeated kills: up to 5 s
        while lazy.server(self.cache) is None:
            if time.monotonic() > deadline:
                self.violation(what, "nbdkit is not served again by its keeper")
            time.sleep(0.02)
        sock, _ = nbd.open_export(lazy.socket_path(self.cache))
        try:
            for i in read_record(self.cache):
                if nbd_pread(sock, CS, i * CS) != self.image[i * CS:(i + 1) * CS]:
                    self.violation(what, f"chunk {i}: wrong bytes through the server")
        finally:
            sock.close()
        self.check(what, full=True)

    def violation(self, what: str, text: str) -> None:
        v = f"seed {self.seed}, {what}: {text}"
        self.counts.violations.append(v)
        self.log(v)
        if not self.keep_going:
            raise Violation(f"{v} (replay: {'COWDISK_FAULT_SEED'}={self.seed})")

    def run(self, rounds: int, *, progress_every: int = 0) -> LazyCounts:
        t0 = time.perf_counter()
        self.setup()
        try:
            for _ in range(rounds):
                self.round()
                if progress_every and self.counts.rounds % progress_every == 0:
                    self.counts.seconds = time.perf_counter() - t0
                    self.log(self.counts.line())
            self.final()
        finally:
            self.counts.seconds = time.perf_counter() - t0
        return self.counts


def kill_at_random(store: Store, work: str, rounds: int) -> LazyCounts:
    """The harness as a test runs it: ``rounds`` rounds with no violation, most children
    killed (not ended by an error)."""
    store.close()  # the children open their own; none may inherit an open SQLite connection
    h = LazyHarness(store.root, work)
    c = h.run(rounds)
    print(c.line())
    assert c.violations == [], c.line()
    assert c.kills == c.children, c.line()  # every child ran until its kill
    return c


