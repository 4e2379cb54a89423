"""Helpers shared by the test tiers: scratch filesystems and a leak witness."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from cowdisk.kernel import loop

if TYPE_CHECKING:
    from cowdisk.store import Store


def in_lab() -> bool:
    return os.environ.get("COWDISK_IN_LAB") == "1"


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


@contextlib.contextmanager
def managed_store(root: str, backend: str) -> Iterator["Store"]:
    """A store destroyed afterwards, pass or fail; the host must then be exactly as before."""
    from cowdisk.store import Store

    before = host_state()
    s = Store(root, backend=backend)
    try:
        yield s
    finally:
        try:
            s.destroy()
        finally:
            s.close()
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
                           if line.startswith("/dev/loop") and line.split()[1].startswith(scope))
    return HostState(loops, dm, mounts)


def assert_same_host(before: HostState, after: HostState | None = None) -> None:
    """No loop, dm device or loop mount was added (or lost) since ``before``."""
    after = after or host_state()
    assert after.loops == before.loops, f"loops differ: +{after.loops - before.loops} -{before.loops - after.loops}"
    assert after.dm == before.dm, f"dm devices differ: +{after.dm - before.dm} -{before.dm - after.dm}"
    assert after.mounts == before.mounts, f"mounts differ: +{after.mounts - before.mounts}"
