"""Shared helpers for bench/volumes.py and bench/scale.py: stats, scratch filesystems,
templates with real data, the seed CLI ways, and cleanup that only touches what the
bench itself made.

Everything a bench makes is named or placed under ``cdbench-<random>`` (temp dirs, dm
names, loop labels), so cleanup can find exactly its own objects and never another
user's on this shared machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from cowdisk.kernel import loop  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

MKFS = {
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
    "ext4": ["mkfs.ext4", "-q", "-F"],
}


def in_lab() -> bool:
    return os.environ.get("COWDISK_IN_LAB") == "1"


def new_tag() -> str:
    return f"cdbench-{secrets.token_hex(3)}"


# -- stats --------------------------------------------------------------------


def percentile(samples: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    s = sorted(samples)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def summary(samples: list[float]) -> dict[str, float]:
    """median/p99/min in milliseconds of samples in seconds."""
    if not samples:
        return {"n": 0, "median_ms": float("nan"), "p99_ms": float("nan"), "min_ms": float("nan")}
    return {
        "n": len(samples),
        "median_ms": statistics.median(samples) * 1e3,
        "p99_ms": percentile(samples, 99) * 1e3,
        "min_ms": min(samples) * 1e3,
    }


def fmt_ms(ms: float) -> str:
    if ms != ms:  # nan
        return "-"
    if ms >= 10000:
        return f"{ms / 1000:.1f} s"
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 1:
        return f"{ms:.2f} ms"
    return f"{ms:.3f} ms"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def run(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# -- signals ------------------------------------------------------------------


def sigterm_as_interrupt() -> None:
    """SIGTERM/SIGHUP raise KeyboardInterrupt, so every ``finally`` cleanup runs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, handler)


# -- scratch filesystems ------------------------------------------------------


@contextlib.contextmanager
def workdir(tag: str, base: str | None = None) -> Iterator[str]:
    d = tempfile.mkdtemp(prefix=f"{tag}-", dir=base)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def scratch_fs(fstype: str, size: int, tag: str, base: str | None = None) -> Iterator[str]:
    """A fresh ``fstype`` on a sparse image, loop-mounted (autoclear: the mount holds the
    loop, unmount frees it); unmounted and deleted afterwards, also on failure."""
    d = tempfile.mkdtemp(prefix=f"{tag}-{fstype}-", dir=base)
    img = os.path.join(d, "fs.img")
    mnt = os.path.join(d, "mnt")
    mounted = False
    try:
        os.mkdir(mnt)
        with open(img, "wb") as f:
            f.truncate(size)
        run(*MKFS[fstype], img)
        lp = loop.attach(img, autoclear=True, label=f"{tag}-scratch")
        try:
            run("mount", lp.path, mnt)
            mounted = True
        finally:
            lp.close()  # the mount holds it now (or nothing does: autoclear frees it)
        yield mnt
    finally:
        if mounted:
            r = subprocess.run(["umount", mnt], capture_output=True, text=True)
            if r.returncode:
                time.sleep(0.5)
                subprocess.run(["umount", "-l", mnt], capture_output=True)
        # only loops backed by our own image, if any survived
        for li in loop.find_by_backing(img):
            loop.detach(li.number, missing_ok=True)
        shutil.rmtree(d, ignore_errors=True)


def can_mkfs(fstype: str) -> bool:
    return shutil.which(MKFS[fstype][0]) is not None


# -- templates with real data -------------------------------------------------


PIECES = 16


def make_template(path: str, size: int, fill: str = "scattered") -> int:
    """A sparse raw image of ``size`` bytes with real data in it; returns the data bytes.

    * ``scattered``: 16 pieces of 1 MiB of random data at evenly spread offsets (first
      and last MiB included): the same 16 MiB in 16 extents whatever the size, so
      anything that scales with the size (not the data) shows up.
    * ``dense``: 1 MiB of every 16 MiB (6.25 %: 4 MiB of 64 MiB, 512 MiB of 8 GiB).
    * ``full``: every byte written.
    """
    chunk = os.urandom(MiB)
    written = 0
    with open(path, "wb") as f:
        f.truncate(size)
        if fill == "full":
            for off in range(0, size, MiB):
                f.write(chunk[: min(MiB, size - off)])
            written = size
        else:
            if fill == "scattered":
                step = max(MiB, (size // PIECES) // MiB * MiB)
                offsets = [min(i * step, size - MiB) for i in range(PIECES)]
                offsets[-1] = size - MiB
            elif fill == "dense":
                offsets = list(range(0, size, 16 * MiB))
            else:
                raise ValueError(f"unknown fill {fill!r}")
            for i, off in enumerate(sorted(set(offsets))):
                os.pwrite(f.fileno(), chunk[i % 7:] + chunk[: i % 7], off)
                written += MiB
        f.flush()
        os.fsync(f.fileno())
    return written


def parse_size(s: str) -> int:
    s = s.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": KiB, "M": MiB, "G": GiB, "T": 1024 * GiB}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def size_label(n: int) -> str:
    return f"{n // GiB} GiB" if n >= GiB and n % GiB == 0 else f"{n // MiB} MiB"


def drop_file(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# -- the seed CLI ways --------------------------------------------------------


class SeedDm:
    """The seeds' dm-snapshot sequence through losetup/blockdev/dmsetup subprocesses.

    ``losetup -f --show -r TEMPLATE`` once; per volume ``truncate -s SIZE COW``,
    ``losetup -f --show COW``, ``blockdev --getsz ORIGIN``, ``dmsetup create NAME
    --table '0 N snapshot ORIGIN COWLOOP P 8'``; remove: ``dmsetup remove NAME``,
    ``losetup -d COWLOOP``, ``rm -f COW``.  Tracks what it made; :meth:`close` removes
    whatever is left (only its own names and loops).
    """

    def __init__(self, template: str, workdir: str, tag: str) -> None:
        self.template = template
        self.dir = workdir
        self.tag = tag
        self.size = os.path.getsize(template)
        self.origin: str | None = None
        self.vols: dict[str, tuple[str, str | None]] = {}  # name -> (cow file, cow loop)
        self.names: set[str] = set()

    def open(self) -> None:
        self.origin = run("losetup", "-f", "--show", "-r", self.template).strip()

    def create(self, name: str) -> str:
        assert self.origin
        cow = os.path.join(self.dir, f"{name}.cow")
        self.vols[name] = (cow, None)
        run("truncate", "-s", str(self.size), cow)
        cl = run("losetup", "-f", "--show", cow).strip()
        self.vols[name] = (cow, cl)
        sectors = run("blockdev", "--getsz", self.origin).strip()
        self.names.add(name)
        run("dmsetup", "create", name, "--table", f"0 {sectors} snapshot {self.origin} {cl} P 8")
        return f"/dev/mapper/{name}"

    def remove(self, name: str) -> None:
        cow, cl = self.vols[name]
        run("dmsetup", "remove", name)
        self.names.discard(name)
        if cl:
            run("losetup", "-d", cl)
        self.vols[name] = (cow, None)
        run("rm", "-f", cow)
        del self.vols[name]

    def close(self) -> None:
        for name in list(self.names):
            subprocess.run(["dmsetup", "remove", "--retry", name], capture_output=True)
            node = f"/dev/mapper/{name}"
            if os.path.lexists(node) and not subprocess.run(["dmsetup", "info", name], capture_output=True).returncode == 0:
                with contextlib.suppress(OSError):
                    os.unlink(node)
        for name, (cow, cl) in list(self.vols.items()):
            if cl:
                subprocess.run(["losetup", "-d", cl], capture_output=True)
            drop_file(cow)
        self.vols.clear()
        if self.origin:
            subprocess.run(["losetup", "-d", self.origin], capture_output=True)
            self.origin = None


def own_loops(*paths: str) -> list[loop.LoopInfo]:
    """Bound loops whose backing file lies under one of ``paths`` (the bench's own dirs)."""
    out = []
    for li in loop.list_loops():
        bf = li.backing_file.removesuffix(" (deleted)")
        if any(bf == p or bf.startswith(p.rstrip("/") + "/") for p in paths):
            out.append(li)
    return out


def dm_names(prefix: str) -> list[str]:
    if not os.path.exists("/dev/mapper/control"):
        return []
    try:
        from cowdisk.kernel import dm

        return sorted(d.name for d in dm.control().list_devices() if d.name.startswith(prefix))
    except Exception:
        out = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True).stdout
        return sorted(line.split()[0] for line in out.splitlines() if line.startswith(prefix))


def dm_available() -> bool:
    try:
        from cowdisk.backends.dm_snapshot import snapshot_supported

        return bool(snapshot_supported()[0])
    except Exception:
        return False


def leftover_dirs(tag: str, base: str | None = None) -> list[str]:
    d = base or tempfile.gettempdir()
    return [os.path.join(d, n) for n in os.listdir(d) if n.startswith(tag)]
