"""Helpers shared by the test tiers: scratch filesystems, a leak witness, the store a
backend name stands for (``backend_store``) and the data helpers the suites use.

Everything here checks from outside cowdisk where it can (sysfs, losetup, dmsetup,
/proc/self/mounts, data read back through the device), so a bug in cowdisk cannot hide
behind the same bug in its witness.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from cowdisk.kernel import loop

if TYPE_CHECKING:
    from cowdisk.store import Store


MiB = 1 << 20

# The backends the suites run on, by tier (tests/conftest.py parametrizes ``backend``
# with them). A reflink store lives on a scratch filesystem of the named type.
HOST_BACKENDS = ("copy", "reflink-xfs", "reflink-btrfs", "pool")
LAB_BACKENDS = ("dm-snapshot", "dm-thin")
BLOCK_BACKENDS = frozenset({"dm-snapshot", "dm-thin"})
TEMPLATE_LOOP_BACKENDS = frozenset({"dm-snapshot"})
"""Backends that attach the template file on one shared loop (dm-thin copies it into its pool)."""
FILE_BACKENDS = frozenset({"copy", "reflink-xfs", "reflink-btrfs", "pool"})
# tests/ceph: rbd on the Ceph cluster its session fixture starts (tests/ceph/conftest.py)
CEPH_BACKENDS = ("rbd",)
CEPH_ENV = "COWDISK_TEST_CEPH"
"""JSON of the session cluster's store options (conf, pool, client), set by the fixture."""


def ceph_options(namespace: str | None = None, map: str = "fuse") -> dict[str, str]:
    """Store options for the session's test cluster; each store its own RADOS namespace."""
    import json
    import secrets

    opts = dict(json.loads(os.environ[CEPH_ENV]))
    return {**opts, "namespace": namespace or f"t-{secrets.token_hex(4)}", "map": map}


def rbd_images(opts: dict[str, str]) -> list[str]:
    """Images in the store's namespace, as the ``rbd`` tool lists them ([] for no namespace)."""
    r = subprocess.run(["rbd", "-c", opts["conf"], "ls", "-p", opts["pool"], "--namespace", opts["namespace"]],
                       capture_output=True, text=True)
    if r.returncode != 0 and "does not exist" in r.stderr:
        return []
    assert r.returncode == 0, r.stderr
    return sorted(r.stdout.split())


@contextlib.contextmanager
def two_rbd_hosts(base: str, opts: dict[str, str]) -> Iterator[tuple["Store", "Store"]]:
    """Stores A and B (roots ``<base>/host-a`` and ``host-b``, standing for two hosts) on the
    one rbd pool and namespace of ``opts``; both destroyed afterwards, and nothing of theirs
    left in the pool."""
    from cowdisk.store import Store

    a = Store(os.path.join(base, "host-a"), backend="rbd", backend_options=opts)
    b = Store(os.path.join(base, "host-b"), backend="rbd", backend_options=opts)
    try:
        yield a, b
    finally:
        b.destroy()
        a.destroy()
        a.close()
        b.close()
    assert rbd_images(opts) == []


def in_lab() -> bool:
    return os.environ.get("COWDISK_IN_LAB") == "1"


# --------------------------------------------------------------------------- data


def make_tree(d: str) -> str:
    """A small root tree: /etc/hostname ("template") and 2 MiB of random payload."""
    os.makedirs(os.path.join(d, "etc"), exist_ok=True)
    with open(os.path.join(d, "etc", "hostname"), "w") as f:
        f.write("template\n")
    with open(os.path.join(d, "payload.bin"), "wb") as f:
        f.write(os.urandom(2 * MiB))
    return d


def sha(path: str) -> str:
    """sha256 hex digest of a file or device (hashlib: not cowdisk's own helper)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_at(dev: str, offset: int, data: bytes) -> None:
    fd = os.open(dev, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def fill(dev: str, offset: int, size: int) -> None:
    """Write ``size`` bytes of random data (the same random MiB over and over) at ``offset``
    of ``dev``, then fsync: every block written, none left as a hole."""
    fd = os.open(dev, os.O_WRONLY | os.O_CLOEXEC)
    try:
        block = os.urandom(MiB)
        for off in range(offset, offset + size, MiB):
            os.pwrite(fd, block, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def thin_pool_status(store: "Store") -> list[str]:
    """The store's thin pool's status line, as `dmsetup status` (the outside witness) prints it,
    split: ``start len thin-pool <transaction> <meta used>/<total> <data used>/<total> ...``."""
    out = subprocess.run(["dmsetup", "status", store.dm_prefix + ".pool"], capture_output=True, text=True,
                         check=True).stdout
    return out.split()


def read_at(dev: str, offset: int, n: int) -> bytes:
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, n, offset)
    finally:
        os.close(fd)


def debugfs_cat(image: str, path: str) -> bytes:
    r = subprocess.run(["debugfs", "-R", f"cat {path}", image], capture_output=True, check=True)
    return r.stdout


@contextlib.contextmanager
def mounted(path: str, mnt: str) -> Iterator[str]:
    """Mount the ext4 inside a volume: a block device directly, a file through an
    autoclear loop (the mount holds it; umount frees it)."""
    os.makedirs(mnt, exist_ok=True)
    if stat.S_ISBLK(os.stat(path).st_mode):
        subprocess.run(["mount", "-t", "ext4", path, mnt], check=True, capture_output=True)
    else:
        lp = loop.attach(path, autoclear=True, label="cowdisk-test-mount")
        try:
            subprocess.run(["mount", "-t", "ext4", lp.path, mnt], check=True, capture_output=True)
        finally:
            lp.close()
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=False, capture_output=True)


MKFS = {
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
    "ext4": ["mkfs.ext4", "-q", "-F"],
}


@contextlib.contextmanager
def scratch_fs(fstype: str, size: int = 2 << 30, base: str | None = None) -> Iterator[str]:
    """A fresh filesystem of ``fstype`` on a sparse image, loop-mounted; all gone afterwards."""
    d = tempfile.mkdtemp(prefix=f"cowdisk-test-{os.getpid()}-{fstype}-", dir=base)
    img = os.path.join(d, "fs.img")
    mnt = os.path.join(d, "mnt")
    os.mkdir(mnt)
    with open(img, "wb") as f:
        f.truncate(size)
    subprocess.run(MKFS[fstype] + [img], check=True, capture_output=True)
    lp = loop.attach(img, autoclear=True, label="cowdisk-test-scratch")
    try:
        subprocess.run(["mount", lp.path, mnt], check=True, capture_output=True)
    finally:
        lp.close()  # the mount holds it; unmount frees it
    try:
        yield mnt
    finally:
        _umount(mnt)
        shutil.rmtree(d, ignore_errors=True)


def _umount(mnt: str) -> None:
    """Unmount a test filesystem; a mount that stays busy is a leak and fails the test."""
    import gc
    import time

    for _ in range(50):
        r = subprocess.run(["umount", mnt], capture_output=True, text=True)
        if r.returncode == 0:
            return
        gc.collect()  # drop unreferenced stores and their open registry files
        time.sleep(0.1)
    holders = subprocess.run(["fuser", "-vm", mnt], capture_output=True, text=True)
    subprocess.run(["umount", "-l", mnt], capture_output=True)  # do not leave it mounted
    raise AssertionError(f"test filesystem {mnt} stayed busy: {r.stderr.strip()} {holders.stderr.strip()}")


SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def cowdisk_cli(root: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m cowdisk --root ROOT ARGS`` from this checkout, as a user runs it."""
    env = {**os.environ, "NO_COLOR": "1", "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("COWDISK_ROOT", None)
    return subprocess.run([sys.executable, "-m", "cowdisk", "--root", root, *args], capture_output=True,
                          text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)


def store_files(s: "Store") -> list[str]:
    """Every path under the store's volumes/ and links/ directories."""
    out = []
    for base in (os.path.join(s.data_root, "volumes"), os.path.join(s.root, "links")):
        for d, dirs, files in os.walk(base):
            out += [os.path.join(d, n) for n in dirs + files]
    return sorted(out)


def losetup_template_loops(path: str) -> list[str]:
    """Loop devices whose backing file is ``path``, as losetup(8) lists them."""
    out = subprocess.run(["losetup", "--list", "--noheadings", "-O", "NAME,BACK-FILE"], capture_output=True,
                         text=True, check=True).stdout
    return [ln.split()[0] for ln in out.splitlines() if len(ln.split()) >= 2 and ln.split(None, 1)[1] == path]


def sysfs_template_loops(path: str) -> int:
    """The same count from sysfs (no process start), for polling."""
    return sum(1 for li in loop.list_loops() if li.backing_file == path)


@contextlib.contextmanager
def backend_store(backend: str, base: str) -> Iterator["Store"]:
    """A fresh store for ``backend`` (one of HOST_BACKENDS or LAB_BACKENDS) under ``base``.

    ``reflink-xfs`` and ``reflink-btrfs`` put the store on a scratch filesystem of that
    type. Afterwards the store is destroyed (managed_store) and the host must be exactly
    as before, the scratch filesystem's loop included.
    """
    before = host_state()
    if backend.startswith("reflink-"):
        with scratch_fs(backend.split("-", 1)[1], base=base) as mnt, \
                managed_store(os.path.join(mnt, "store"), "reflink") as s:
            yield s
    elif backend == "rbd":
        opts = ceph_options()
        with managed_store(os.path.join(base, "store"), backend, opts) as s:
            yield s
        assert rbd_images(opts) == [], f"images left in the cluster: {rbd_images(opts)}"
    else:
        with managed_store(os.path.join(base, "store"), backend) as s:
            yield s
    assert_settled(before)


@contextlib.contextmanager
def managed_store(root: str, backend: str, options: dict[str, str] | None = None) -> Iterator["Store"]:
    """A store destroyed afterwards, pass or fail; the host must then be exactly as before."""
    from cowdisk.store import Store

    from cowdisk.store import release_pool

    before = host_state()
    s = Store(root, backend=backend, backend_options=options)
    try:
        yield s
    finally:
        try:
            s.destroy()
        finally:
            s.close()
            # a test that broke the store (a damaged registry) must not leave its pool mounted
            left = release_pool(root) if os.path.isdir(os.path.join(root, "pool")) else []
    assert left == [], left
    assert_same_host(before)


@dataclass(frozen=True)
class HostState:
    """What the host has: loops (number, backing), dm names, loop mounts."""

    loops: frozenset[tuple[int, str]]
    dm: frozenset[str]
    mounts: frozenset[str]


def _test_paths() -> tuple[str, ...]:
    """Where test-made backing files live: pytest's temp dirs and scratch filesystems.

    The witness looks only there (and at dm names of cowdisk and the tests), so other
    users of this shared machine do not disturb it; every object a test makes is there.
    """
    t = tempfile.gettempdir()
    session = os.environ.get("COWDISK_TEST_SCOPE") or os.path.join(t, "pytest-of-")
    return (session, os.path.join(t, f"cowdisk-test-{os.getpid()}-"))


def host_state() -> HostState:
    scope = _test_paths()
    loops = frozenset((li.number, li.backing_file) for li in loop.list_loops()
                      if li.backing_file.startswith(scope))
    dm: frozenset[str] = frozenset()
    if os.path.exists("/dev/mapper/control"):
        out = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True).stdout
        dm = frozenset(line.split()[0] for line in out.splitlines()
                       if line.startswith(("cowdisk-", "cdtest-")))
    with open("/proc/self/mounts") as f:
        mounts = frozenset(line.split()[1] for line in f
                           if line.startswith(("/dev/loop", "/dev/fuse")) and line.split()[1].startswith(scope))
    return HostState(loops, dm, mounts)


def assert_same_host(before: HostState, after: HostState | None = None) -> None:
    """No loop, dm device or loop mount was added (or lost) since ``before``."""
    after = after or host_state()
    assert after.loops == before.loops, f"loops differ: +{after.loops - before.loops} -{before.loops - after.loops}"
    assert after.dm == before.dm, f"dm devices differ: +{after.dm - before.dm} -{before.dm - after.dm}"
    assert after.mounts == before.mounts, f"mounts differ: +{after.mounts - before.mounts}"


def assert_settled(before: HostState, wait_s: float = 10.0) -> None:
    """assert_same_host, allowing an autoclear loop a moment to detach: the kernel
    releases it at the last close, which may come just after umount returns."""
    end = time.monotonic() + wait_s
    while True:
        try:
            assert_same_host(before)
            return
        except AssertionError:
            if time.monotonic() > end:
                raise
        time.sleep(0.05)
