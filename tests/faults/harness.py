"""The randomized fault harness: random operations, SIGKILLed at random moments, recovered, checked.

The crash matrix (tests/crashmatrix.py) kills each operation at its declared crash
points. This harness kills anywhere: between any two syscalls of an operation.

One *round*:

1. The parent picks an operation the current state allows, at random: create, remove,
   checkpoint, restore in place, restore as a new id, fork into N (one to three new ids,
   one batch: all of them or none),
   flatten, template import, template remove.
2. A forked child opens the store without recovery, tells the parent it is about to
   start (a byte on a pipe), runs the operation, and reports when it is done (with the
   time it took). The parent SIGKILLs it after a random delay drawn uniformly from
   0 .. 1.3 x the median duration of that operation on this store, measured on rounds
   left unkilled (the first two of each kind, then one in ten), so most kills land
   inside the operation, at a random point of it; the rest let it finish.
3. Outside witness before recovery: the intents table read with plain ``sqlite3``
   (read-only). A kill *landed mid-operation* when the child was killed before it
   reported done; an intent left behind confirms it for the operations that have one.
4. Sometimes (a third of the kills that left an intent) recovery itself is run in a
   child and killed at a random moment too; the next recovery must still make it whole.
5. The parent opens the store (recovery runs on open) and checks the invariants:

   * recovery reported no error, a second recovery does nothing, no intent is left;
   * the operation happened fully or not at all (an intent left behind decides which:
     an ``undo`` operation is rolled back, a ``finish`` operation completed), and every
     other volume and template is exactly as before;
   * every attached volume reads back, through its stable link, every block written to
     it (and the template's bytes under it); every template file holds its bytes;
   * no kernel object, mount or file the registry does not account for, seen from
     outside (temporary files of killed writers and lock files of gone volumes and
     templates included): loops from sysfs (backing files under the store), dm devices from sysfs
     (the store's prefix; store-wide ones, such as a thin pool, are those there before
     the first volume), mounts from /proc/self/mounts, the store's ``volumes/``,
     ``templates/`` and ``links/`` directories (every link resolves to an attached
     volume's device), and the registry's link rows against the files;
   * nothing that is live was quarantined (no quarantine entry carries a live volume's or
     template's id).

6. The parent writes a fresh random block into a random attached volume (the model
   records it), so data keeps changing under the operations.

A violation stops the run (``keep_going=False``, the tests) with the seed, the round, the
operation and the delay; ``bench/faults.py`` counts it, starts a fresh store and goes on.

Replaying a seed: ``COWDISK_FAULT_SEED=<seed>`` (or pytest's ``--fault-seed``, or
``bench/faults.py --seed``) makes every harness of the run draw from that seed instead
of a random one. One random stream serves every draw, so a replay repeats the images,
the operations chosen, the delay draws (as fractions of the measured median duration),
the recoveries chosen to be killed and the blocks written, for as long as every kill
ends the same way. It cannot repeat the kill moments themselves: a delay is a fraction
of this host's measured durations, so where in the operation a kill lands (or whether it
lands before the operation reported done) depends on timing, and once one kill ends
differently the model differs and the later choices part ways. A bug a seed found gets
a crash-matrix case at its declared point (tests/crashmatrix.py) for the deterministic
regression; the seed's own test replays its rounds up to the one that failed.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import random
import select
import signal
import sqlite3
import statistics
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Iterator

from cowdisk.store import Store

MiB = 1 << 20
IMAGE_SIZE = 16 * MiB
HEAD = 64 << 10  # random bytes at the start of every image: the template's bytes under a volume
BLOCK = 4096
SLOTS = [MiB + i * 256 * 1024 for i in range(16)]  # where the parent writes into volumes
VOLUME_IDS = [f"v{i}" for i in range(10)]
STORE_WIDE_LOOPS = {"pool": ("pool/pool.img",), "dm-thin": ("thin/data.img", "thin/meta.img")}
"""Backing files (under the store root) of each backend's store-wide loops, one loop each."""
STORE_WIDE_DM = {"dm-thin": (".pool",)}
"""dm names (after the store's prefix) of each backend's store-wide devices."""
MAX_VOLUMES = 5
MAX_TEMPLATES = 5


SEED_ENV = "COWDISK_FAULT_SEED"
"""The seed a harness draws from when none is given (see "Replaying a seed" above)."""


def env_seed() -> int | None:
    """The seed $COWDISK_FAULT_SEED names (decimal or 0x...), None when unset."""
    v = os.environ.get(SEED_ENV, "").strip()
    if not v:
        return None
    try:
        return int(v, 0)
    except ValueError:
        raise ValueError(f"{SEED_ENV}={v!r}: not an integer seed") from None


class Violation(AssertionError):
    """An invariant did not hold after recovery."""


# --------------------------------------------------------------------------- the model


@dataclass
class Vol:
    state: str  # "attached" or "checkpointed"
    template: str
    data: dict[int, bytes]  # offset -> bytes expected there


@dataclass
class World:
    """What the store must hold: templates (id -> bytes expected at offsets) and volumes."""

    templates: dict[str, dict[int, bytes]] = field(default_factory=dict)
    volumes: dict[str, Vol] = field(default_factory=dict)

    def copy(self) -> "World":
        return copy.deepcopy(self)


@dataclass(frozen=True)
class Image:
    """A raw image outside the store that can be imported as a template."""

    path: str
    tid: str
    data: dict[int, bytes]


def make_image(path: str, rng: random.Random) -> Image:
    head = rng.randbytes(HEAD)
    tail = rng.randbytes(BLOCK)
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
        f.write(head)
        f.seek(IMAGE_SIZE - BLOCK)
        f.write(tail)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(MiB), b""):
            h.update(b)
    return Image(path, h.hexdigest()[:16], {0: head, IMAGE_SIZE - BLOCK: tail})


@dataclass(frozen=True)
class Op:
    kind: str
    subject: str  # a volume id, a template id, or (import) the image's index
    new: tuple[str, ...] = ()
    template: str = ""

    def __str__(self) -> str:
        extra = (f" -> {','.join(self.new)}" if self.new else "") + (f" over {self.template}" if self.template else "")
        return f"{self.kind} {self.subject}{extra}"

    def run(self, s: Store, images: list[Image]) -> None:
        k = self.kind
        if k == "create":
            s.create_volume(self.subject, self.template)
        elif k == "remove":
            s.remove_volume(self.subject)
        elif k == "checkpoint":
            s.checkpoint(self.subject)
        elif k == "restore":
            s.restore(self.subject)
        elif k == "restore-as":
            s.restore(self.subject, self.new[0])
        elif k == "fork":
            s.fork(self.subject, list(self.new))
        elif k == "flatten":
            s.flatten(self.subject)
        elif k == "import":
            s.import_template(images[int(self.subject)].path)
        elif k == "template-rm":
            s.remove_template(self.subject)
        else:
            raise ValueError(k)


# operations whose intent, when a kill leaves it, means "roll forward"
FINISH_OPS = {"remove", "checkpoint"}
INTENT_OPS = {"create", "remove", "checkpoint", "restore", "restore-as", "fork", "flatten"}
OP_KINDS = ("create", "remove", "checkpoint", "restore", "restore-as", "fork", "flatten", "import", "template-rm")


def choose(rng: random.Random, w: World, images: list[Image], base: str) -> Op:
    vols = w.volumes
    free = [v for v in VOLUME_IDS if v not in vols]
    attached = sorted(v for v, x in vols.items() if x.state == "attached")
    ckpt = sorted(v for v, x in vols.items() if x.state == "checkpointed")
    used = {x.template for x in vols.values()}
    removable = sorted(t for t in w.templates if t != base and t not in used)
    room = len(vols) < MAX_VOLUMES and free
    options: list[tuple[float, Callable[[], Op]]] = []
    if room:
        options.append((2.0, lambda: Op("create", rng.choice(free), template=rng.choice(sorted(w.templates)))))
    if vols:
        options.append((1.5 if room else 4.0, lambda: Op("remove", rng.choice(sorted(vols)))))
    if attached:
        options.append((2.0, lambda: Op("checkpoint", rng.choice(attached))))
        if len(w.templates) < MAX_TEMPLATES:
            options.append((0.7, lambda: Op("flatten", rng.choice(attached + ckpt))))
    if ckpt:
        options.append((2.0, lambda: Op("restore", rng.choice(ckpt))))
        if room:
            options.append((1.0, lambda: Op("restore-as", rng.choice(ckpt), (rng.choice(free),))))
    if room and (attached or ckpt):
        def fork() -> Op:
            most = min(3, len(free), MAX_VOLUMES - len(vols))
            n = rng.randint(1, most) if most > 1 and rng.random() < 0.5 else 1
            return Op("fork", rng.choice(attached + ckpt), tuple(rng.sample(free, n)))
        options.append((1.0, fork))
    if len(w.templates) < MAX_TEMPLATES:
        options.append((0.5, lambda: Op("import", str(rng.randrange(len(images))))))
    if removable:
        options.append((0.5 if len(w.templates) < MAX_TEMPLATES else 3.0,
                        lambda: Op("template-rm", rng.choice(removable))))
    weights = [o[0] for o in options]
    return rng.choices([o[1] for o in options], weights)[0]()


@dataclass
class Outcome:
    """One way the operation can have ended."""

    label: str
    world: World
    new_template_data: dict[int, bytes] | None = None  # flatten: the new template's bytes (its id unknown)


def outcomes(w: World, op: Op, images: list[Image]) -> list[Outcome]:
    """Every way ``op`` may have ended, "not at all" first and "fully" last."""
    out = [Outcome("not at all", w.copy())]
    a = w.copy()
    k, x = op.kind, op.subject
    if k == "create":
        a.volumes[x] = Vol("attached", op.template, dict(w.templates[op.template]))
    elif k == "remove":
        del a.volumes[x]
    elif k == "checkpoint":
        a.volumes[x].state = "checkpointed"
    elif k == "restore":
        a.volumes[x].state = "attached"
    elif k in ("restore-as", "fork"):
        src = w.volumes[x]
        for n in op.new:  # a fork into N is one batch: every child or none
            a.volumes[n] = Vol("attached", src.template, dict(src.data))
    elif k == "flatten":
        out.append(Outcome("fully", a, dict(w.volumes[x].data)))
        return out
    elif k == "import":
        im = images[int(x)]
        a.templates[im.tid] = dict(im.data)
    elif k == "template-rm":
        del a.templates[x]
    out.append(Outcome("fully", a))
    return out


# --------------------------------------------------------------------------- witnesses


@contextlib.contextmanager
def held_template(s: Store, tid: str, size: int) -> Iterator[str]:
    """A template dm-thin holds in its pool (a flatten's: a descriptor file, no image): its
    thin activated read-only with dmsetup (the outside witness) while the caller reads it."""
    with open(os.path.join(s.root, "thin", "templates", tid)) as f:
        thin = f.read().split()[0]
    majmin = subprocess.run(["dmsetup", "info", "-c", "--noheadings", "-o", "major,minor", s.dm_prefix + ".pool"],
                            check=True, capture_output=True, text=True).stdout.strip()
    name = f"{s.dm_prefix}.chk-{tid}"
    subprocess.run(["dmsetup", "create", name, "--readonly", "--table", f"0 {size // 512} thin {majmin} {thin}"],
                   check=True, capture_output=True)
    try:
        subprocess.run(["dmsetup", "mknodes", name], check=True, capture_output=True)
        yield f"/dev/mapper/{name}"
    finally:
        subprocess.run(["dmsetup", "remove", name], check=True, capture_output=True)


def sysfs_loops() -> dict[str, str]:
    """loopN -> backing file, read from sysfs."""
    out = {}
    for name in os.listdir("/sys/block"):
        if name.startswith("loop"):
            try:
                with open(f"/sys/block/{name}/loop/backing_file") as f:
                    out[name] = f.read().strip()
            except OSError:
                continue
    return out


def sysfs_dm_names() -> set[str]:
    out = set()
    for name in os.listdir("/sys/block"):
        if name.startswith("dm-"):
            try:
                with open(f"/sys/block/{name}/dm/name") as f:
                    out.add(f.read().strip())
            except OSError:
                continue
    return out


def dm_suspended(device: str) -> bool:
    """Whether the dm device behind ``device`` is suspended, from sysfs (False for a file)."""
    try:
        with open(f"/sys/block/{os.path.basename(os.path.realpath(device))}/dm/suspended") as f:
            return f.read().strip() != "0"
    except FileNotFoundError:
        return False


def mountpoints_under(path: str) -> list[str]:
    p = os.path.abspath(path) + os.sep
    with open("/proc/self/mounts") as f:
        return [ln.split()[1] for ln in f if ln.split()[1].startswith(p)]


def raw_intents(root: str) -> list[tuple[str, str | None]]:
    """(op, volume id) of every intent, read with plain sqlite3, read-only."""
    db = os.path.join(root, "registry.db")
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return [(r[0], r[1]) for r in c.execute("SELECT op, volume_id FROM intents")]
    finally:
        c.close()


def quarantine_entries(root: str, data_root: str) -> list[str]:
    out = []
    for base in {root, data_root}:
        q = os.path.join(base, "quarantine")
        if os.path.isdir(q):
            out += [os.path.join(q, n) for n in os.listdir(q)]
    return out


# --------------------------------------------------------------------------- counts


@dataclass
class Counts:
    backend: str
    seed: int
    rounds: int = 0
    ops: int = 0  # operations started by a child
    completed: int = 0  # ... that reported done (not killed, or killed just after)
    kills: int = 0  # children that died of our SIGKILL
    mid_op: int = 0  # ... before they reported done: the kill landed inside the operation
    intents_left: int = 0  # ... with an intent left behind (the outside witness)
    recoveries_killed: int = 0  # recoveries SIGKILLed before they finished
    quarantined: int = 0  # entries seen in a quarantine (never a live one)
    by_op: dict[str, list[int]] = field(default_factory=dict)  # kind -> [started, killed mid-op]
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)

    def line(self) -> str:
        return (f"{self.backend}: {self.ops} operations, {self.kills} kills ({self.mid_op} mid-operation, "
                f"{self.intents_left} with an intent left), {self.recoveries_killed} recoveries killed, "
                f"{len(self.violations)} violations, {self.seconds:.1f}s (seed {self.seed})")


# --------------------------------------------------------------------------- the child


def _child(fn: Callable[[], None], pre: Callable[[], None] | None, w: int) -> None:
    """Runs in the forked child: ``pre``, then 'S', ``fn``, 'D<seconds>'; 'E<traceback>' on error."""
    code = 0
    try:
        if pre is not None:
            pre()
        os.write(w, b"S")
        t0 = time.perf_counter()
        fn()
        os.write(w, b"D%f" % (time.perf_counter() - t0))
    except BaseException:
        code = 3
        with contextlib.suppress(OSError):
            os.write(w, b"E" + traceback.format_exc()[-3000:].encode())
    os._exit(code)


@dataclass
class ChildResult:
    killed: bool
    done: bool
    seconds: float | None
    error: str | None
    status: int


def run_child(fn: Callable[[], None], delay: float | None, *, pre: Callable[[], None] | None = None,
              timeout: float = 300.0) -> ChildResult:
    """Fork a child running ``pre`` then ``fn``; SIGKILL it ``delay`` seconds after ``fn``
    started (None: never)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(fn, pre, w)
    os.close(w)
    buf = b""
    killed = False
    try:
        end = time.monotonic() + timeout
        while not buf.startswith(b"S"):  # wait for "about to start"
            ready, _, _ = select.select([r], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                raise TimeoutError("child never started")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            buf += chunk
        if buf.startswith(b"S") and delay is not None and len(buf) == 1:
            ready, _, _ = select.select([r], [], [], delay)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                killed = True
        while True:  # the rest, until the child's end closes the pipe
            ready, _, _ = select.select([r], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise TimeoutError(f"child still running after {timeout}s")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            buf += chunk
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    killed = killed and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    msg = buf[1:]
    done = msg.startswith(b"D")
    return ChildResult(killed, done, float(msg[1:]) if done else None,
                       msg[1:].decode(errors="replace") if msg.startswith(b"E") else None, status)


# --------------------------------------------------------------------------- the harness


class Harness:
    """Random kills over one store (see the module docstring)."""

    def __init__(self, root: str, backend: str, work: str, *, seed: int | None = None,
                 keep_going: bool = False, log: Callable[[str], None] | None = None) -> None:
        self.root = os.path.abspath(root)
        self.backend = backend
        self.kind = "reflink" if backend.startswith("reflink-") else backend
        self.work = work
        if seed is None:
            seed = env_seed()
        self.seed = seed if seed is not None else random.SystemRandom().randrange(1 << 32)
        self.rng = random.Random(self.seed)
        self.keep_going = keep_going
        self.log = log or (lambda m: None)
        self.counts = Counts(backend, self.seed)
        self.t0 = time.perf_counter()
        self.est: dict[str, list[float]] = {}
        self.est_recover: list[float] = []
        os.makedirs(work, exist_ok=True)
        self.images = [make_image(os.path.join(work, f"image{i}.img"), self.rng) for i in range(3)]
        self.world = World()
        self.base = ""
        self.dm_baseline: set[str] = set()
        self.loop_baseline: set[str] = set()
        self.dm_prefix = ""
        self.data_root = ""

    # -- setup and teardown -----------------------------------------------------------------

    def open(self) -> Store:
        return Store(self.root, backend=self.kind)

    def setup(self) -> None:
        """The base template (image 0), recorded in the model."""
        with self.open() as s:
            t = s.import_template(self.images[0].path, "base")
            self.base = t.id
            self.dm_prefix = s.dm_prefix
            self.data_root = s.data_root
            self.dm_baseline = {s.dm_prefix + n for n in STORE_WIDE_DM.get(self.kind, ())}
            self.loop_baseline = {os.path.join(self.root, p) for p in STORE_WIDE_LOOPS.get(self.kind, ())}
            existing = {v.id for v in s.volumes()}
        assert t.id == self.images[0].tid, (t.id, self.images[0].tid)
        assert not existing, f"the store already has volumes: {existing}"
        self.world = World({t.id: dict(self.images[0].data)}, {})

    def teardown(self) -> None:
        """Restore and check every checkpointed volume, then remove every volume and every
        template but base (the final sweep)."""
        with self.open() as s:
            for vid, v in sorted(self.world.volumes.items()):
                if v.state == "checkpointed":
                    s.restore(vid)
                    v.state = "attached"
            self.check_data(s)
            for vid in sorted(self.world.volumes):
                s.remove_volume(vid)
            self.world.volumes.clear()
            for tid in sorted(self.world.templates):
                if tid != self.base:
                    s.remove_template(tid)
            self.world.templates = {self.base: self.world.templates[self.base]}
            self.check(s)

    # -- one round --------------------------------------------------------------------------

    def delay_for(self, kind: str) -> float | None:
        """When to kill an operation of ``kind``: None (not at all) for one round in ten and
        for the first two of each kind, whose durations are the estimate (durations of killed
        rounds would bias it short); else uniform over 0 .. 1.3 x the median, 5% at once."""
        d = self.est.get(kind, [])
        if len(d) < 2 or self.rng.random() < 0.1:
            return None
        if self.rng.random() < 0.05:
            return 0.0
        return self.rng.uniform(0, 1.3 * statistics.median(d[-25:]))

    def round(self) -> None:
        c = self.counts
        c.rounds += 1
        op = choose(self.rng, self.world, self.images, self.base)
        delay = self.delay_for(op.kind)
        where = f"round {c.rounds} (seed {self.seed}): {op}, " + (
            "not to be killed" if delay is None else f"kill after {delay * 1000:.2f} ms")
        root, images = self.root, self.images
        opened: list[Store] = []
        # the child opens the store before it says "S", so the delay spans the operation alone
        res = run_child(lambda: op.run(opened[0], images), delay,
                        pre=lambda: opened.append(Store(root, recover=False)))
        c.ops += 1
        st = c.by_op.setdefault(op.kind, [0, 0])
        st[0] += 1
        if res.done:
            c.completed += 1
            if delay is None:
                self.est.setdefault(op.kind, []).append(res.seconds or 0.0)
        if res.error is not None and not res.killed:
            self.fail(where, f"the operation failed without a kill:\n{res.error}")
            return
        if not res.killed and not res.done:
            self.fail(where, f"the child ended without a report (wait status {res.status})")
            return
        intents = raw_intents(self.root)
        if res.killed:
            c.kills += 1
            if not res.done:
                c.mid_op += 1
                st[1] += 1
            if intents:
                c.intents_left += 1
        where += (" (killed" + (" mid-operation" if res.killed and not res.done else " after it finished")
                  + (f", intents left: {intents}" if intents else "") + ")") if res.killed else " (not killed)"
        if intents and self.rng.random() < 1 / 3:
            self.kill_a_recovery()
        self.settle(op, res, intents, where)

    def kill_a_recovery(self) -> None:
        est = statistics.median(self.est_recover[-25:]) if self.est_recover else 0.05
        root = self.root
        res = run_child(lambda: Store(root).close(), self.rng.uniform(0, 1.3 * est))
        if res.killed and not res.done:
            self.counts.recoveries_killed += 1

    def settle(self, op: Op, res: ChildResult, intents: list[tuple[str, str | None]], where: str) -> None:
        """Recover, match the outcome, check the invariants, write a fresh block."""
        t0 = time.perf_counter()
        try:
            s = self.open()
        except Exception:
            self.fail(where, f"the store does not open after the kill:\n{traceback.format_exc()}")
            return
        with s:
            took = time.perf_counter() - t0
            try:
                rep = s.recover()
                if intents:
                    self.est_recover.append(took)
                self.match(s, op, res, intents)
                if rep.actions or rep.errors:
                    raise Violation(f"a second recovery still acted: {rep.as_dict()}")
                self.check(s)
                self.scribble(s)
            except Violation as e:
                self.fail(where, str(e))
            except Exception:
                self.fail(where, traceback.format_exc())

    def match(self, s: Store, op: Op, res: ChildResult, intents: list[tuple[str, str | None]]) -> None:
        """Which way did the operation end? It must be one the operation allows."""
        cands = outcomes(self.world, op, self.images)
        if res.done:
            cands = cands[-1:]  # it reported done: it happened
        elif intents and op.kind in INTENT_OPS:
            if op.kind in FINISH_OPS:
                cands = cands[-1:]  # recovery finishes it
            else:
                cands = cands[:-1]  # recovery rolls the interrupted part back
        vols = {v.id: (str(v.state), v.template_id) for v in s.volumes()}
        tpls = {t.id for t in s.templates()}
        for cand in cands:
            want = {k: (v.state, v.template) for k, v in cand.world.volumes.items()}
            if vols != want:
                continue
            before = set(cand.world.templates)
            if tpls == before:
                self.world = cand.world
                return
            new = tpls - before
            if cand.new_template_data is not None and before <= tpls and len(new) == 1:
                cand.world.templates[new.pop()] = cand.new_template_data
                self.world = cand.world
                return
        raise Violation(
            f"the operation neither happened fully nor not at all: the registry has volumes {vols}, "
            f"templates {sorted(tpls)}; allowed: "
            + "; ".join(f"{c.label}: {({k: v.state for k, v in c.world.volumes.items()})} "
                        f"{sorted(c.world.templates)}" + (" + 1 new" if c.new_template_data else "")
                        for c in cands))

    # -- the invariants -------------------------------------------------------------------

    def check(self, s: Store) -> None:
        left = raw_intents(self.root)
        if left:
            raise Violation(f"intents left after recovery: {left}")
        self.check_states(s)
        self.check_data(s)
        self.check_templates(s)
        self.check_leaks(s)

    def check_states(self, s: Store) -> None:
        got = {v.id: str(v.state) for v in s.volumes()}
        want = {k: v.state for k, v in self.world.volumes.items()}
        if got != want:
            raise Violation(f"volumes {got}, the model says {want}")

    def check_data(self, s: Store) -> None:
        for vid, v in sorted(self.world.volumes.items()):
            if v.state != "attached":
                continue
            vol = s.volume(vid)
            if vol.device and dm_suspended(vol.device):  # a kill inside a fork's hold: recovery resumes it
                raise Violation(f"attached volume {vid}: its device {vol.device} is left suspended")
            link = vol.link
            if not os.path.exists(link):
                raise Violation(f"attached volume {vid}: its link {link} does not resolve")
            if vol.device is None or os.path.realpath(link) != os.path.realpath(vol.device):
                raise Violation(f"attached volume {vid}: link {link} -> {os.path.realpath(link)}, "
                                f"its device is {vol.device}")
            fd = os.open(link, os.O_RDONLY | os.O_CLOEXEC)
            try:
                for off, want in sorted(v.data.items()):
                    got = os.pread(fd, len(want), off)
                    if got != want:
                        raise Violation(f"attached volume {vid}: {len(want)} bytes at {off} differ "
                                        f"from what was written there")
            finally:
                os.close(fd)

    def check_templates(self, s: Store) -> None:
        for t in s.templates():
            want = self.world.templates.get(t.id)
            if want is None:
                raise Violation(f"template {t.id} is not in the model")
            path = s.registry.get_template(t.id).path
            if not os.path.exists(path):
                raise Violation(f"template {t.id}: its file {path} is gone, the registry still has it")
            held = path.endswith("/disk.thin")
            with held_template(s, t.id, t.size) if held else contextlib.nullcontext(path) as p:
                with open(p, "rb") as f:
                    for off, data in sorted(want.items()):
                        f.seek(off)
                        if f.read(len(data)) != data:
                            raise Violation(f"template {t.id}: {p} differs at {off}")

    def check_leaks(self, s: Store) -> None:
        root, data_root = self.root, s.data_root
        vols = {v.id: v for v in s.volumes()}
        attached = {k for k, v in vols.items() if v.state == "attached"}
        tpl_rows = {t.id: s.registry.get_template(t.id) for t in s.templates()}
        in_use = {tpl_rows[v.template_id].path for v in vols.values() if v.id in attached}
        # loops backed by the store's files (sysfs)
        store_wide: dict[str, int] = {}
        for name, back in sysfs_loops().items():
            b = back.removesuffix(" (deleted)")
            if not b.startswith(root + os.sep):
                continue
            if back.endswith(" (deleted)"):
                raise Violation(f"{name} is backed by a deleted file {b}")
            if b in self.loop_baseline:
                store_wide[b] = store_wide.get(b, 0) + 1
                continue
            rel = os.path.relpath(b, data_root).split(os.sep)
            if rel[0] == "volumes" and len(rel) > 1 and rel[1] in attached:
                continue
            if b in in_use:
                continue
            raise Violation(f"{name} backed by {b}: no attached volume accounts for it")
        if any(n > 1 for n in store_wide.values()) or (self.kind == "pool" and not store_wide):
            raise Violation(f"store-wide loops: {store_wide}")
        # dm devices (sysfs)
        names = {n for n in sysfs_dm_names() if n.startswith(self.dm_prefix)}
        if names - self.dm_baseline - {self.dm_prefix + v for v in attached}:
            raise Violation(f"dm devices no attached volume accounts for: "
                            f"{sorted(names - self.dm_baseline - {self.dm_prefix + v for v in attached})}")
        # mounts (/proc/self/mounts)
        mounts = mountpoints_under(root)
        want_mounts = [os.path.join(root, "pool", "mnt")] if self.kind == "pool" else []
        if sorted(mounts) != want_mounts:
            raise Violation(f"mounts under the store: {mounts}, expected {want_mounts}")
        # files: volumes/, templates/, links/
        vdir = os.path.join(data_root, "volumes")
        if not set(os.listdir(vdir)) <= set(vols):
            raise Violation(f"{vdir} holds {sorted(os.listdir(vdir))}, the registry {sorted(vols)}")
        tdir = os.path.join(data_root, "templates")
        owned = {tid for tid, t in tpl_rows.items() if t.owned}
        if set(os.listdir(tdir)) != owned:
            raise Violation(f"{tdir} holds {sorted(os.listdir(tdir))}, the registry's templates {sorted(owned)}")
        ldir = os.path.join(root, "links")
        devices = {os.path.realpath(vols[v].device or "") for v in attached}
        rows = {path: target for path, _, target in s.registry.links()}
        for name in os.listdir(ldir):
            if name not in vols:
                raise Violation(f"{ldir}/{name}: no volume {name}")
            for entry in os.listdir(os.path.join(ldir, name)):
                p = os.path.join(ldir, name, entry)
                if entry != "rootfs":
                    raise Violation(f"{p}: a stray file in a link directory")
                if os.path.realpath(p) not in devices:
                    raise Violation(f"{p} -> {os.readlink(p)}: not the device of an attached volume")
                if rows.get(p) != os.readlink(p):
                    raise Violation(f"{p} -> {os.readlink(p)}: the registry's row says {rows.get(p)}")
        for path, owner, target in s.registry.links():
            if not os.path.lexists(path):
                raise Violation(f"the registry's link {path} (of {owner}, to {target}) is not on disk")
        # temporary files of killed writers (manifests, the reserve), lock files of gone objects
        for d in [root, data_root] + [os.path.join(vdir, n) for n in os.listdir(vdir)] \
                + [os.path.join(tdir, n) for n in os.listdir(tdir)]:
            tmp = [n for n in os.listdir(d) if ".tmp-" in n] if os.path.isdir(d) else []
            if tmp:
                raise Violation(f"{d}: temporary files left: {sorted(tmp)}")
        lockdir = os.path.join(root, "locks")
        stale = []
        for n in os.listdir(lockdir):
            kind, _, rest = n.partition("-")
            oid = rest.removesuffix(".lock")
            if (kind == "volume" and oid not in vols) or (kind == "template" and oid not in tpl_rows
                                                           and not oid.startswith("recipe-")):
                stale.append(n)
        if stale:
            raise Violation(f"{lockdir}: lock files of volumes or templates that do not exist: {sorted(stale)}")
        # quarantine: never anything live
        live = set(vols) | set(tpl_rows)
        q = quarantine_entries(root, data_root)
        self.counts.quarantined = max(self.counts.quarantined, len(q))
        bad = [e for e in q if any(x in os.path.basename(e) for x in live)]
        if bad:
            raise Violation(f"live objects quarantined: {bad}")

    def scribble(self, s: Store) -> None:
        """A fresh random block into a random attached volume, as its VM would write."""
        attached = sorted(k for k, v in self.world.volumes.items() if v.state == "attached")
        if not attached:
            return
        vid = self.rng.choice(attached)
        off = self.rng.choice(SLOTS)
        data = self.rng.randbytes(BLOCK)
        fd = os.open(s.volume(vid).link, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, data, off)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.world.volumes[vid].data[off] = data

    # -- violations and the run ---------------------------------------------------------------

    def fail(self, where: str, what: str) -> None:
        msg = f"{self.backend} {where}: {what}"
        self.counts.violations.append(msg)
        self.log("VIOLATION " + msg)
        raise Violation(msg)

    def run(self, kills: int, *, max_rounds: int | None = None, progress_every: int = 0) -> Counts:
        """Rounds until ``kills`` children were killed (at most ``max_rounds``, default 4x)."""
        t0 = time.perf_counter()
        self.setup()
        max_rounds = max_rounds or 4 * kills
        try:
            while self.counts.kills < kills and self.counts.rounds < max_rounds:
                try:
                    self.round()
                except Violation:
                    if not self.keep_going:
                        raise
                    if not self.restart():
                        self.counts.violations.append(f"{self.backend}: the store cannot be opened any more; "
                                                      "the run stops here")
                        raise
                if progress_every and self.counts.rounds % progress_every == 0:
                    self.counts.seconds = time.perf_counter() - t0
                    self.log(self.counts.line())
            self.teardown()
        finally:
            self.counts.seconds = time.perf_counter() - t0
        return self.counts

    def clear(self) -> None:
        """Best effort, for a test that failed: remove every volume and template but base, so
        the store fixture can destroy the store."""
        self.restart()

    def restart(self) -> bool:
        """After a violation (keep_going): the model is wrong now; remove what the store has
        (best effort) and go on from a fresh base. False when the store does not open."""
        try:
            s = self.open()
        except Exception:
            return False
        with s:
            for v in s.volumes():
                with contextlib.suppress(Exception):
                    s.remove_volume(v.id)
            for t in s.templates():
                if t.id != self.base:
                    with contextlib.suppress(Exception):
                        s.remove_template(t.id)
        self.world = World({self.base: dict(self.images[0].data)}, {})
        return True


def replay(store: Store, backend: str, work: str, seed: int, rounds: int) -> Counts:
    """The harness's first ``rounds`` rounds from ``seed`` (what a seed replays: see the
    module docstring), then its final sweep; no violation."""
    store.close()
    h = Harness(store.root, backend, work, seed=seed)
    try:
        c = h.run(rounds, max_rounds=rounds)
    except BaseException:
        h.clear()
        raise
    print(c.line())
    assert c.violations == [] and c.rounds == rounds, c.line()
    return c


def kill_at_random(store: Store, backend: str, work: str, kills: int) -> Counts:
    """The harness as a test runs it, on any backend: ``kills`` random kills with no
    violation, and the kills landed inside the operations, not only between them (at least
    half mid-operation, a tenth leaving an intent behind). A failed run clears the store so
    its fixture can destroy it."""
    store.close()  # the children open their own; none may inherit an open SQLite connection
    h = Harness(store.root, backend, work)
    try:
        c = h.run(kills)
    except BaseException:
        h.clear()
        raise
    print(c.line())
    assert c.violations == []
    assert c.kills >= kills, c.line()
    assert c.mid_op >= kills // 2, c.line()
    assert c.intents_left >= kills // 10, c.line()
    return c
