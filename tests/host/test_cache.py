"""Template cache on this host: real mkfs, real flock, real processes (no mocks).

Child processes are started with subprocess (``python -c``), so each is a fresh
interpreter with its own open file descriptions, exactly like a second cowdisk process.
Every child is ended by PID in a finalizer.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Iterator

import pytest

from cowdisk import cache as cc
from cowdisk.cache import FilesRecipe, TarRecipe, TemplateCache, TreeRecipe
from cowdisk.digest import sha256_file
from cowdisk.errors import CowdiskError, KernelError, LockTimeout, Unsupported
from cowdisk.kernel import fs as kfs
from cowdisk.kernel import procfs

SRC = str(Path(__file__).resolve().parents[2] / "src")
MiB = 1 << 20
IS_ROOT = os.geteuid() == 0

needs_e2fs = pytest.mark.skipif(shutil.which("mkfs.ext4", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
                                is None, reason="e2fsprogs not installed")
pytestmark = [pytest.mark.root, needs_e2fs]


# --------------------------------------------------------------------------- helpers


def sbin(name: str) -> str:
    p = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    assert p, name
    return p


def e2fsck_ok(img: str) -> None:
    r = subprocess.run([sbin("e2fsck"), "-fn", img], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def debugfs(img: str, request: str) -> str:
    r = subprocess.run([sbin("debugfs"), "-R", request, img], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def make_tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("cowdisk-test\n")
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "tool").write_bytes(b"#!/bin/sh\necho tool\n")
    os.chmod(root / "usr" / "bin" / "tool", 0o4755)
    os.symlink("/etc/hostname", root / "etc" / "alias")
    (root / "var" / "empty").mkdir(parents=True)
    if IS_ROOT:
        os.chown(root / "etc" / "hostname", 1234, 4321)
    return root


@pytest.fixture
def cowdisk_cache_tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "cowdisk-tree")


@pytest.fixture
def cowdisk_cache(tmp_path: Path) -> TemplateCache:
    return TemplateCache(tmp_path / "cowdisk-cache", lock_timeout=60)


class Children:
    """Child processes started by a test; each is ended by PID at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.extra_pids: list[int] = []

    def python(self, code: str, *args: str) -> subprocess.Popen[str]:
        env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
        p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for pid in self.extra_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(Exception):
                p.communicate(timeout=10)


@pytest.fixture
def cowdisk_children() -> Iterator[Children]:
    c = Children()
    try:
        yield c
    finally:
        c.close()


def readline(p: subprocess.Popen[str], timeout: float = 30) -> str:
    """The child's next stdout line, failing (with its stderr) if it exits or takes too long."""
    import selectors
    sel = selectors.DefaultSelector()
    assert p.stdout is not None
    sel.register(p.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        pytest.fail(f"child {p.pid} printed nothing within {timeout} s")
    line = p.stdout.readline()
    if not line:
        p.wait(5)
        pytest.fail(f"child {p.pid} exited {p.returncode}: {p.stderr.read() if p.stderr else ''}")
    return line.strip()


def stages(into: list[str]):
    """A Progress that records the stage reports (the phase texts) into ``into``."""
    def progress(done: int, total: int, stage: str = "") -> None:
        if stage:
            into.append(stage)
    return progress


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --------------------------------------------------------------------------- keys (moved from tests/unit)


def test_mkfs_fingerprint_is_stable():
    a = cc.mkfs_fingerprint("ext4")
    b = cc.mkfs_fingerprint("ext4")
    assert a == b
    assert len(a.fingerprint) == 64
    assert "mke2fs" in a.version


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="chown needs root")
def test_tree_digest_sensitive_to_owner(tmp_path: Path):
    a = make_tree(tmp_path / "a")
    before = cc.tree_digest(a)
    os.chown(a / "etc" / "hostname", 1234, 1234)
    assert cc.tree_digest(a) != before


# --------------------------------------------------------------------------- build and reuse


def test_build_then_reuse_tree_recipe(cowdisk_cache: TemplateCache, cowdisk_cache_tree: Path):
    steps: list[str] = []
    r = TreeRecipe(str(cowdisk_cache_tree), 64 * MiB)
    first = cowdisk_cache.get_or_build(r, progress=stages(steps))
    assert first.built
    assert any(s.startswith("formatting ext4") for s in steps)
    e = first.entry
    assert e.key == cowdisk_cache.key_for(r)
    assert e.image == os.path.join(cowdisk_cache.root, e.key, "disk.img")
    assert os.stat(e.image).st_size == 64 * MiB == e.size == e.capacity
    assert os.stat(e.image).st_mode & 0o777 == 0o400
    assert kfs.disk_usage(e.image) < 16 * MiB  # sparse
    e2fsck_ok(e.image)
    assert "cowdisk-test" in debugfs(e.image, "cat /etc/hostname")
    st = debugfs(e.image, "stat /usr/bin/tool")
    assert "Mode:  04755" in st
    if IS_ROOT:
        assert "User:  1234" in debugfs(e.image, "stat /etc/hostname")
    meta = json.loads(Path(e.path, "meta.json").read_text())
    assert meta["key"] == e.key and meta["fs"] == "ext4" and meta["capacity"] == 64 * MiB
    assert meta["sha256"] == sha256_file(e.image) == e.sha256
    assert meta["mkfs"]["fingerprint"] == cc.mkfs_fingerprint("ext4").fingerprint
    assert meta["recipe"]["kind"] == "tree" and meta["recipe"]["source"] == str(cowdisk_cache_tree)
    assert not [n for n in os.listdir(cowdisk_cache.root) if n.startswith(".staging-")]
    assert not os.path.exists(os.path.join(e.path, ".owner"))

    again = cowdisk_cache.get_or_build(TreeRecipe(str(cowdisk_cache_tree), 64 * MiB))
    assert not again.built and again.entry == e
    assert cowdisk_cache.lookup(e.key) == e
    assert [x.key for x in cowdisk_cache.list()] == [e.key]
    assert cowdisk_cache.verify(e.key)

    # reproducible: the same key rebuilt gives the same bytes
    assert cowdisk_cache.remove(e.key)
    assert cowdisk_cache.lookup(e.key) is None and not cowdisk_cache.remove(e.key)
    rebuilt = cowdisk_cache.get_or_build(r)
    assert rebuilt.built and rebuilt.entry.sha256 == e.sha256


def test_content_change_gives_new_entry(cowdisk_cache: TemplateCache, cowdisk_cache_tree: Path):
    a = cowdisk_cache.get_or_build(TreeRecipe(str(cowdisk_cache_tree), 64 * MiB)).entry
    (cowdisk_cache_tree / "etc" / "hostname").write_text("changed\n")
    b = cowdisk_cache.get_or_build(TreeRecipe(str(cowdisk_cache_tree), 64 * MiB))
    assert b.built and b.entry.key != a.key
    assert "changed" in debugfs(b.entry.image, "cat /etc/hostname")
    assert len(cowdisk_cache.list()) == 2


def test_tarball_recipe(cowdisk_cache: TemplateCache, cowdisk_cache_tree: Path, tmp_path: Path):
    tb = tmp_path / "cowdisk-rootfs.tar.gz"
    with tarfile.open(tb, "w:gz") as t:
        t.add(cowdisk_cache_tree, arcname=".")
    res = cowdisk_cache.get_or_build(TarRecipe(str(tb), 64 * MiB))
    assert res.built
    e2fsck_ok(res.entry.image)
    assert "cowdisk-test" in debugfs(res.entry.image, "cat /etc/hostname")
    assert "Mode:  04755" in debugfs(res.entry.image, "stat /usr/bin/tool")
    assert "/etc/hostname" in debugfs(res.entry.image, "stat /etc/alias")  # symlink kept
    assert not cowdisk_cache.get_or_build(TarRecipe(str(tb), 64 * MiB)).built
    # the unpacked tree was not published
    assert sorted(os.listdir(res.entry.path)) == ["disk.img", "meta.json"]


def test_files_recipe(cowdisk_cache: TemplateCache, cowdisk_cache_tree: Path, tmp_path: Path):
    conf = tmp_path / "cowdisk-app.conf"
    conf.write_text("answer=42\n")
    os.chmod(conf, 0o600)
    r = FilesRecipe(((str(cowdisk_cache_tree), "/"), (str(conf), "/etc/app/app.conf"),
                     (str(cowdisk_cache_tree / "usr"), "/opt/usr")), 64 * MiB)
    res = cowdisk_cache.get_or_build(r, progress=lambda done, total, stage="": None)
    assert res.built
    img = res.entry.image
    e2fsck_ok(img)
    assert "answer=42" in debugfs(img, "cat /etc/app/app.conf")
    assert "Mode:  0600" in debugfs(img, "stat /etc/app/app.conf")
    assert "Mode:  0755" in debugfs(img, "stat /etc/app")  # implicit parent
    assert "cowdisk-test" in debugfs(img, "cat /etc/hostname")  # from the "/" entry
    assert "Mode:  04755" in debugfs(img, "stat /opt/usr/bin/tool")
    assert res.entry.meta["recipe"]["count"] == 3
    assert not cowdisk_cache.get_or_build(r).built


def test_btrfs_recipe(cowdisk_cache: TemplateCache, cowdisk_cache_tree: Path):
    if shutil.which("mkfs.btrfs", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
        pytest.skip("btrfs-progs not installed")
    res = cowdisk_cache.get_or_build(TreeRecipe(str(cowdisk_cache_tree), 256 * MiB, fs="btrfs"))
    assert res.built and res.entry.fs == "btrfs"
    r = subprocess.run([sbin("btrfs"), "check", "--readonly", res.entry.image], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_import_image_by_content_digest(cowdisk_cache: TemplateCache, tmp_path: Path):
    img = tmp_path / "cowdisk-raw.img"
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(b"template bytes")
    res = cowdisk_cache.import_image(img, fs="raw")
    assert res.built and res.entry.key == sha256_file(str(img)) == res.entry.sha256
    assert res.entry.meta["recipe"] == {"kind": "image", "source": str(img)}
    assert Path(res.entry.image).read_bytes() == img.read_bytes()
    assert kfs.disk_usage(res.entry.image) < 2 * MiB
    assert not cowdisk_cache.import_image(img).built


# --------------------------------------------------------------------------- failures leave nothing


def staging_dirs(c: TemplateCache) -> list[str]:
    return [n for n in os.listdir(c.root) if n.startswith(".staging-")] if os.path.isdir(c.root) else []


def test_failed_build_leaves_nothing(cowdisk_cache: TemplateCache, tmp_path: Path):
    big = tmp_path / "cowdisk-big"
    big.mkdir()
    (big / "blob").write_bytes(os.urandom(4 * MiB))
    with pytest.raises(CowdiskError) as ei:
        cowdisk_cache.get_or_build(TreeRecipe(str(big), 1 * MiB))
    assert "mkfs.ext4" in str(ei.value) and "capacity" in str(ei.value)
    assert staging_dirs(cowdisk_cache) == [] and cowdisk_cache.list() == []


def test_interrupted_build_leaves_nothing(cowdisk_cache: TemplateCache, cowdisk_cache_tree: Path):
    def boom(done: int, total: int, stage: str = "") -> None:
        if stage.startswith("hashing the image"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cowdisk_cache.get_or_build(TreeRecipe(str(cowdisk_cache_tree), 64 * MiB), progress=boom)
    assert staging_dirs(cowdisk_cache) == [] and cowdisk_cache.list() == []


def test_source_changed_during_build_is_not_published(cowdisk_cache: TemplateCache, cowdisk_cache_tree: Path):
    def edit(done: int, total: int, stage: str = "") -> None:
        if stage.startswith("formatting"):
            (cowdisk_cache_tree / "etc" / "hostname").write_text("edited mid-build\n")

    with pytest.raises(CowdiskError, match="changed while building"):
        cowdisk_cache.get_or_build(TreeRecipe(str(cowdisk_cache_tree), 64 * MiB), progress=edit)
    assert staging_dirs(cowdisk_cache) == [] and cowdisk_cache.list() == []


@pytest.mark.skipif(not IS_ROOT, reason="chattr +i needs CAP_LINUX_IMMUTABLE")
def test_immutable_entry_can_still_be_removed(tmp_path: Path, cowdisk_cache_tree: Path):
    c = TemplateCache(tmp_path / "cowdisk-cache-i", immutable=True)
    e = c.get_or_build(TreeRecipe(str(cowdisk_cache_tree), 64 * MiB)).entry
    if not kfs.is_immutable(e.image):
        pytest.skip("filesystem of tmp_path does not support chattr +i")
    with pytest.raises(PermissionError):
        os.unlink(e.image)
    assert c.remove(e.key)
    assert not os.path.exists(e.path)


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="chattr +i needs CAP_LINUX_IMMUTABLE")
@pytest.mark.parametrize("how", ["remove", "clean_all", "sweep"])
def test_removing_entry_keeps_other_hard_link_immutable(tmp_path: Path, cowdisk_cache_tree: Path, how: str):
    """The store hard-links an entry's image as its template file and sets chattr +i on it
    (one inode): removing the cache's name must leave that file immutable."""
    c = TemplateCache(tmp_path / "cowdisk-cache-link", immutable=(how == "remove"))
    e = c.get_or_build(TreeRecipe(str(cowdisk_cache_tree), 64 * MiB)).entry
    template = tmp_path / "cowdisk-template.img"
    src = e.image
    if how == "sweep":  # debris of a dead builder whose image is linked elsewhere
        debris = fake_staging(c, "e" * 64, dead_pid())
        os.unlink(os.path.join(debris, "disk.img"))
        kfs.set_immutable(e.image, False)
        os.link(e.image, os.path.join(debris, "disk.img"))
        src = os.path.join(debris, "disk.img")
    kfs.set_immutable(src, False)  # link(2) refuses an immutable inode: the store links first
    os.link(src, template)
    if not kfs.set_immutable(template, True) or not kfs.is_immutable(template):
        pytest.skip("filesystem of tmp_path does not support chattr +i")
    before = sha256_file(template)
    if how == "remove":
        assert c.remove(e.key)
    elif how == "clean_all":
        assert c.clean_all().removed == [e.key]
    else:
        assert c.sweep() == [debris]
        assert not os.path.exists(debris)
        assert c.remove(e.key)
    assert not os.path.exists(e.path) and c.lookup(e.key) is None
    try:
        assert kfs.is_immutable(template)
        assert os.stat(template).st_nlink == 1 and sha256_file(template) == before
        with pytest.raises(PermissionError):
            os.unlink(template)
    finally:
        kfs.set_immutable(template, False)
        os.unlink(template)


# --------------------------------------------------------------------------- two processes, one build


RACE = """
import json, sys, time
from cowdisk.cache import TemplateCache, TreeRecipe
root, tree, counter = sys.argv[1:4]
def progress(done, total, stage=""):
    if stage.startswith("formatting"):
        with open(counter, "a") as f:
            f.write("build\\n")
        time.sleep(1.0)   # keep the lock long enough for the peer to queue behind it
print("ready", flush=True)
while not __import__("os").path.exists(root + ".go"):
    time.sleep(0.005)
r = TemplateCache(root).get_or_build(TreeRecipe(tree, 64 << 20), progress=progress)
print(json.dumps({"built": r.built, "key": r.entry.key, "sha": r.entry.sha256}), flush=True)
"""


def test_two_processes_race_one_builds_other_reuses(tmp_path: Path, cowdisk_cache_tree: Path,
                                                    cowdisk_children: Children):
    root = str(tmp_path / "cowdisk-cache-race")
    counter = tmp_path / "builds"
    procs = [cowdisk_children.python(RACE, root, str(cowdisk_cache_tree), str(counter)) for _ in range(3)]
    for p in procs:
        assert readline(p) == "ready"
    Path(root + ".go").touch()  # release all at once
    results = [json.loads(readline(p, 60)) for p in procs]
    for p in procs:
        assert p.wait(30) == 0, p.stderr.read() if p.stderr else ""
    assert sorted(r["built"] for r in results) == [False, False, True]
    assert len({r["key"] for r in results}) == 1 and len({r["sha"] for r in results}) == 1
    assert counter.read_text().splitlines() == ["build"]
    c = TemplateCache(root)
    assert len(c.list()) == 1 and staging_dirs(c) == []
    e2fsck_ok(c.list()[0].image)


def test_two_threads_race_one_builds(cowdisk_cache: TemplateCache, cowdisk_cache_tree: Path):
    """flock belongs to the open file description, so threads exclude each other too."""
    import threading
    results: list[bool] = []
    go = threading.Barrier(4)

    def slow(done: int, total: int, stage: str = "") -> None:
        if stage.startswith("formatting"):
            time.sleep(0.5)

    def run() -> None:
        go.wait()
        results.append(cowdisk_cache.get_or_build(TreeRecipe(str(cowdisk_cache_tree), 64 * MiB), progress=slow).built)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == [False, False, False, True]
    assert len(cowdisk_cache.list()) == 1 and staging_dirs(cowdisk_cache) == []


# --------------------------------------------------------------------------- lock timeout names the holder


HOLD_BUILDING = """
import sys, time
from cowdisk.cache import TemplateCache, TreeRecipe
root, tree = sys.argv[1:3]
def progress(done, total, stage=""):
    if stage.startswith("formatting"):
        print("building", flush=True)
        time.sleep(120)
TemplateCache(root).get_or_build(TreeRecipe(tree, 64 << 20), progress=progress)
"""


def test_lock_timeout_names_the_builder_pid(tmp_path: Path, cowdisk_cache_tree: Path, cowdisk_children: Children):
    root = str(tmp_path / "cowdisk-cache-lock")
    child = cowdisk_children.python(HOLD_BUILDING, root, str(cowdisk_cache_tree))
    assert readline(child) == "building"
    c = TemplateCache(root)
    steps: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(LockTimeout) as ei:
        c.get_or_build(TreeRecipe(str(cowdisk_cache_tree), 64 * MiB), timeout=1.5, progress=stages(steps))
    assert 1.4 <= time.monotonic() - t0 < 10
    msg = str(ei.value)
    assert f"PID {child.pid}" in msg, msg
    assert c.key_for(TreeRecipe(str(cowdisk_cache_tree), 64 * MiB)) in msg
    assert any(f"PID {child.pid}" in s for s in steps if s.startswith("waiting"))
    assert ei.value.exit_code == LockTimeout.exit_code
    # the live builder's staging directory survives a sweep from another process
    assert len(staging_dirs(c)) == 1
    assert c.sweep() == [] and len(staging_dirs(c)) == 1
    # killing the builder leaves debris that the next builder clears, then builds
    child.kill()
    child.wait(10)
    res = c.get_or_build(TreeRecipe(str(cowdisk_cache_tree), 64 * MiB), timeout=10)
    assert res.built and staging_dirs(c) == []


HOLD_INHERITED = """
import fcntl, os, subprocess, sys
lock = sys.argv[1]
os.makedirs(os.path.dirname(lock), exist_ok=True)
fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\\n".encode())
g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], pass_fds=(fd,),
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(g.pid, flush=True)
"""


def test_lock_timeout_names_real_holder_not_stale_pid(tmp_path: Path, cowdisk_cache_tree: Path,
                                                      cowdisk_children: Children):
    """The locker hands its fd to a child and exits: the lock file and /proc/locks name a dead
    PID; the error must name the process that really holds the lock."""
    c = TemplateCache(tmp_path / "cowdisk-cache-inh")
    key = c.key_for(TreeRecipe(str(cowdisk_cache_tree), 64 * MiB))
    parent = cowdisk_children.python(HOLD_INHERITED, c.lock_path(key))
    grandchild = int(readline(parent))
    cowdisk_children.extra_pids.append(grandchild)
    assert parent.wait(10) == 0
    with pytest.raises(LockTimeout) as ei:
        c.get_or_build(TreeRecipe(str(cowdisk_cache_tree), 64 * MiB), timeout=0.5)
    msg = str(ei.value)
    assert f"PID {grandchild}" in msg and f"PID {parent.pid}" not in msg, msg
    assert cc.lock_holders(c.lock_path(key)) == [(grandchild, "WRITE")]


# --------------------------------------------------------------------------- sweep


def fake_staging(c: TemplateCache, key: str, pid: int, owner: dict | None = None) -> str:
    os.makedirs(c.root, exist_ok=True)
    d = os.path.join(c.root, f".staging-{key}-{pid}-test{len(os.listdir(c.root))}")
    os.mkdir(d)
    Path(d, "disk.img").write_bytes(b"partial")
    if owner is not None:
        Path(d, ".owner").write_text(json.dumps(owner))
    return d


SLEEPER = "import time; print('up', flush=True); time.sleep(120)"


def test_sweep_removes_dead_keeps_live(cowdisk_cache: TemplateCache, cowdisk_children: Children):
    live = cowdisk_children.python(SLEEPER)
    assert readline(live) == "up"
    live_start = int(procfs.process_start(live.pid))  # an int, as every version writes .owner
    k1, k2, k3, k4, k5 = (c * 64 for c in "12345")
    dead = fake_staging(cowdisk_cache, k1, dead_pid())
    kept = fake_staging(cowdisk_cache, k2, live.pid, {"pid": live.pid, "start": live_start, "boot": procfs.boot_id()})
    kept_no_owner = fake_staging(cowdisk_cache, k3, live.pid)
    reused = fake_staging(cowdisk_cache, k4, live.pid, {"pid": live.pid, "start": live_start - 1,
                                                         "boot": procfs.boot_id()})
    ours_stale = fake_staging(cowdisk_cache, k5, os.getpid())  # our PID, but no build of ours is active
    other_boot = fake_staging(cowdisk_cache, k1, live.pid, {"pid": live.pid, "start": live_start,
                                                            "boot": "not-this-boot"})
    probe = os.path.join(cowdisk_cache.root, f".cowdisk-reflink-probe-{dead_pid()}-a")
    Path(probe).touch()
    removed = cowdisk_cache.sweep()
    assert sorted(removed) == sorted([dead, reused, ours_stale, other_boot, probe])
    assert os.path.isdir(kept) and os.path.isdir(kept_no_owner)
    assert not any(map(os.path.exists, removed))


def test_sweep_removes_dead_builders_reflink_probes(cowdisk_cache: TemplateCache, cowdisk_children: Children):
    """Probe files as kernel.fs names them today (<pid>-<tid>-<random>-a|b) are debris too."""
    live = cowdisk_children.python(SLEEPER)
    assert readline(live) == "up"
    os.makedirs(cowdisk_cache.root)
    dead = os.path.join(cowdisk_cache.root, f".cowdisk-reflink-probe-{dead_pid()}-140234-0a1b2c3d-b")
    alive = os.path.join(cowdisk_cache.root, f".cowdisk-reflink-probe-{live.pid}-140234-0a1b2c3d-a")
    Path(dead).touch()
    Path(alive).touch()
    assert cowdisk_cache.sweep() == [dead]
    assert os.path.exists(alive)


def test_sweep_reads_owner_with_start_as_text(cowdisk_cache: TemplateCache, cowdisk_children: Children):
    live = cowdisk_children.python(SLEEPER)
    assert readline(live) == "up"
    start = procfs.process_start(live.pid)
    kept = fake_staging(cowdisk_cache, "b" * 64, live.pid, {"pid": live.pid, "start": start, "boot": procfs.boot_id()})
    assert cowdisk_cache.sweep() == [] and os.path.isdir(kept)


def test_sweep_skips_debris_while_key_is_locked(cowdisk_cache: TemplateCache, cowdisk_children: Children):
    key = "a" * 64
    d = fake_staging(cowdisk_cache, key, dead_pid())
    os.makedirs(os.path.dirname(cowdisk_cache.lock_path(key)), exist_ok=True)
    fd = os.open(cowdisk_cache.lock_path(key), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert cowdisk_cache.sweep() == [] and os.path.isdir(d)
    finally:
        os.close(fd)
    assert cowdisk_cache.sweep() == [d]


# --------------------------------------------------------------------------- clean_all


HOLD_SHARED = """
import sys, time
from cowdisk.cache import TemplateCache
with TemplateCache(sys.argv[1]).hold(sys.argv[2]) as e:
    print("holding", e.key, flush=True)
    time.sleep(120)
"""


def test_clean_all_skips_entry_held_by_live_peer(cowdisk_cache: TemplateCache, tmp_path: Path,
                                                 cowdisk_cache_tree: Path, cowdisk_children: Children):
    a = cowdisk_cache.get_or_build(TreeRecipe(str(cowdisk_cache_tree), 64 * MiB)).entry
    b = cowdisk_cache.get_or_build(TreeRecipe(str(cowdisk_cache_tree), 72 * MiB)).entry
    debris = fake_staging(cowdisk_cache, "f" * 64, dead_pid())
    peer = cowdisk_children.python(HOLD_SHARED, cowdisk_cache.root, a.key)
    assert readline(peer) == f"holding {a.key}"
    res = cowdisk_cache.clean_all()
    assert res.removed == [b.key] and res.skipped == [a.key] and res.debris == [debris]
    assert cowdisk_cache.lookup(a.key) == a and cowdisk_cache.lookup(b.key) is None
    with pytest.raises(LockTimeout, match=f"PID {peer.pid}"):
        cowdisk_cache.remove(a.key, timeout=0.3)
    peer.kill()
    peer.wait(10)
    res = cowdisk_cache.clean_all()
    assert res.removed == [a.key] and res.skipped == [] and cowdisk_cache.list() == []


def test_clean_all_on_missing_cache(tmp_path: Path):
    res = TemplateCache(tmp_path / "cowdisk-never").clean_all()
    assert res.removed == res.skipped == res.debris == []


# --------------------------------------------------------------------------- same filesystem for publishing


def test_staging_on_another_filesystem_refused(tmp_path: Path):
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than tmp_path")
    other = tempfile.mkdtemp(prefix="cowdisk-test-", dir="/dev/shm")
    try:
        with pytest.raises(KernelError) as ei:
            cc.check_same_filesystem(other, tmp_path)
        msg = str(ei.value)
        assert "EXDEV" in msg  # (KernelError.errno itself is lost by errors.py today: reported)
        assert other in msg and str(tmp_path) in msg and "not atomic" in msg and "tmpfs" in msg
        cc.check_same_filesystem(tmp_path / ".", tmp_path)  # same fs: fine
    finally:
        shutil.rmtree(other, ignore_errors=True)


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="bind mount needs root")
def test_staging_on_another_mount_of_same_fs_refused(tmp_path: Path):
    """st_dev is equal across bind mounts, yet rename(2) between them fails with EXDEV."""
    src, mnt = tmp_path / "cowdisk-bind-src", tmp_path / "cowdisk-bind-mnt"
    src.mkdir()
    mnt.mkdir()
    subprocess.run(["mount", "--bind", str(src), str(mnt)], check=True)
    try:
        with pytest.raises(KernelError) as ei:
            cc.check_same_filesystem(mnt, tmp_path)
        assert "EXDEV" in str(ei.value) and "mount" in str(ei.value)
        (mnt / "f").touch()
        with pytest.raises(OSError) as real:
            os.rename(mnt / "f", tmp_path / "x")
        assert real.value.errno == errno.EXDEV  # what the check saves us from
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# --------------------------------------------------------------------------- reflink capability


def test_reflink_refused_on_ext4_names_probed_path(tmp_path: Path):
    if kfs.statfs(tmp_path).name != "ext4":
        pytest.skip("tmp_path is not ext4")
    with pytest.raises(Unsupported) as ei:
        cc.check_reflink(tmp_path)
    msg = str(ei.value)
    assert str(tmp_path) in msg and "ext4" in msg and "btrfs" in msg and "copy backend" in msg
    missing = tmp_path / "cowdisk-not" / "yet"
    with pytest.raises(Unsupported) as ei:
        cc.check_reflink(missing)
    msg = str(ei.value)
    assert str(missing) in msg and f"nearest existing ancestor {tmp_path}" in msg and "ext4" in msg
    assert not os.path.exists(tmp_path / "cowdisk-not")


def test_reflink_refused_on_tmpfs():
    if not os.path.isdir("/dev/shm") or kfs.statfs("/dev/shm").name != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    d = tempfile.mkdtemp(prefix="cowdisk-test-", dir="/dev/shm")
    try:
        with pytest.raises(Unsupported, match="tmpfs") as ei:
            cc.check_reflink(d)
        assert d in str(ei.value)
        assert os.listdir(d) == []  # the probe cleaned up
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def cowdisk_loopfs(tmp_path: Path, mkfs: list[str], size: int = 1 << 30) -> Iterator[str]:
    """A filesystem made by ``mkfs`` on a sparse file, loop-mounted; unmounted and detached after."""
    from cowdisk.kernel import loop
    img = tmp_path / f"cowdisk-test-{os.path.basename(mkfs[0])}.img"
    mnt = tmp_path / f"cowdisk-test-mnt-{os.path.basename(mkfs[0])}"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(size)
    subprocess.run(mkfs + [str(img)], check=True, capture_output=True)
    lp = loop.attach(str(img), autoclear=True, label="cowdisk-test-cache")
    try:
        subprocess.run(["mount", lp.path, str(mnt)], check=True, capture_output=True)
    finally:
        lp.close()  # the mount holds the loop; unmounting frees it (autoclear)
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
        for li in loop.find_by_backing(str(img)):  # only ours, should autoclear already
            loop.detach(li.number, missing_ok=True)


needs_root = pytest.mark.skipif(not IS_ROOT, reason="loop mounts need root")


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("fs", ["btrfs", "xfs"])
def test_reflink_capable_on_loop_mounted(fs: str, tmp_path: Path, cowdisk_cache_tree: Path):
    if shutil.which(f"mkfs.{fs}", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
        pytest.skip(f"mkfs.{fs} not installed")
    mkfs = {"btrfs": [sbin("mkfs.btrfs"), "-q", "-f"], "xfs": [sbin("mkfs.xfs"), "-q", "-f", "-m", "reflink=1"]}[fs]
    with cowdisk_loopfs(tmp_path, mkfs) as mnt:
        st = cc.check_reflink(mnt)
        assert st.name == fs and st.reflink_capable
        assert cc.check_reflink(os.path.join(mnt, "store", "cache")).name == fs  # not there yet
        assert not os.path.exists(os.path.join(mnt, "store"))
        # a cache on it: build, then a reflink clone of the entry is instant and shares extents
        c = TemplateCache(os.path.join(mnt, "store", "cache"))
        e = c.get_or_build(TreeRecipe(str(cowdisk_cache_tree), 64 * MiB)).entry
        clone = os.path.join(mnt, "store", "vol.img")
        kfs.ficlone(e.image, clone)
        assert sha256_file(clone) == e.sha256
        assert kfs.shared_usage(clone).shared > 0
        os.unlink(clone)
        assert c.clean_all().removed == [e.key]


@pytest.mark.root
@needs_root
def test_reflink_refused_on_xfs_without_reflink(tmp_path: Path):
    if shutil.which("mkfs.xfs", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
        pytest.skip("mkfs.xfs not installed")
    with cowdisk_loopfs(tmp_path, [sbin("mkfs.xfs"), "-q", "-f", "-m", "reflink=0"]) as mnt:
        with pytest.raises(Unsupported) as ei:
            cc.check_reflink(mnt)
        msg = str(ei.value)
        assert mnt in msg and "xfs" in msg and "FICLONE probe" in msg and "reflink=1" in msg
        assert os.listdir(mnt) == []
