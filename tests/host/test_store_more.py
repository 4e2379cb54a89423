"""Issue 3, item 5, on the file backends (reflink on xfs and btrfs, pool, copy), this host's kernel.

The dm-snapshot side of the same tests is tests/lab/test_store_dm_issue3.py. Here:
concurrency (processes with their own Store objects, threads sharing one), data through a
mounted ext4 volume across checkpoint + restore under a new id, bad input (ids, missing
template, template changed on disk, ENOSPC on the store's filesystem) leaving the host
exactly as before, and jail staging by hard link.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import threading
import time
import traceback
from typing import Iterator

import pytest

import conformance
from conformance import MiB, read_at, sha, write_at
from cowdisk.errors import CowdiskError, InUse, InvalidArgument, NotFound, StateError, TemplateChanged, Unsupported
from cowdisk.kernel import loop
from cowdisk.store import Store
from testutil import HostState, assert_same_host, host_state, scratch_fs

pytestmark = pytest.mark.root

BACKENDS = ["reflink-xfs", "reflink-btrfs", "pool", "copy"]
CHUNK = 4096
BAD_IDS = ["", "a/b", "/abs", "..", "a..b", ".hidden", "-dash", "a b", "a\tb", "a\0b", "a\nb", "x" * 65,
           "é", "vm*", "vm;rm", "$(x)"]


def mine(state: HostState, root: str) -> HostState:
    """The part of the host state under ``root``: this is a shared machine, and other
    sessions' tests attach and detach their own loops and mounts meanwhile."""
    pre = root.rstrip("/") + "/"
    return HostState(frozenset(x for x in state.loops if x[1].startswith(pre)), state.dm,
                     frozenset(m for m in state.mounts if m.startswith(pre)))


def assert_back(before: HostState, root: str, wait_s: float = 10.0) -> None:
    """assert_same_host on the objects under ``root``; an autoclear loop detaches at the
    last close, which may come a moment after umount returns, so allow a short wait."""
    end = time.monotonic() + wait_s
    while True:
        now = mine(host_state(), root)
        try:
            assert_same_host(mine(before, root), now)
            return
        except AssertionError:
            if time.monotonic() > end:
                raise
        time.sleep(0.05)


def store_files(s: Store) -> list[str]:
    out = []
    for base in (os.path.join(s.data_root, "volumes"), os.path.join(s.root, "links")):
        for d, dirs, files in os.walk(base):
            out += [os.path.join(d, n) for n in dirs + files]
    return sorted(out)


@contextlib.contextmanager
def store_root(kind: str, tmp_path, size: int = 2 << 30) -> Iterator[tuple[str, str]]:
    """(root, backend) for a backend kind; reflink roots live on a scratch xfs or btrfs."""
    if kind.startswith("reflink-"):
        with scratch_fs(kind.split("-", 1)[1], size, base=str(tmp_path)) as mnt:
            yield os.path.join(mnt, "store"), "reflink"
    else:
        yield str(tmp_path / "store"), kind


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path) -> Iterator[Store]:
    before = host_state()
    with store_root(request.param, tmp_path) as (root, backend):
        s = Store(root, backend=backend)
        try:
            yield s
            left = store_files(s)
        finally:
            s.destroy()
            s.close()
    assert_back(before, str(tmp_path))
    assert left == [], left


@pytest.fixture
def base(store: Store, tmp_path):
    return store.build_template(conformance.make_tree(str(tmp_path / "tree")), "base")


@contextlib.contextmanager
def mounted_file(image: str, mnt: str) -> Iterator[str]:
    """Mount an ext4 image file through an autoclear loop (the mount holds it; umount frees it)."""
    os.makedirs(mnt, exist_ok=True)
    lp = loop.attach(image, autoclear=True, label="cowdisk-test-mount")
    try:
        subprocess.run(["mount", "-t", "ext4", lp.path, mnt], check=True, capture_output=True)
    finally:
        lp.close()
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=False, capture_output=True)


# -- concurrency -------------------------------------------------------------------------------


def _proc_worker(root: str, wid: int, rounds: int, barrier, errq) -> None:
    try:
        for r in range(rounds):
            with Store(root) as s:  # a separate Store object (and a recovery pass) each round
                vid = f"p{wid}-{r}"
                v = s.create_volume(vid, "base")
                mark = f"{wid}:{r}".encode().ljust(CHUNK, b".")
                write_at(v.device, (wid * 7 + r) * MiB, mark)
                assert read_at(v.link, (wid * 7 + r) * MiB, CHUNK) == mark
                if r == 0:
                    barrier.wait(120)
                    barrier.wait(120)
                s.remove_volume(vid)
    except BaseException:
        errq.put(f"worker {wid}: {traceback.format_exc()}")
        errq.close()
        errq.join_thread()  # flush before _exit
        with contextlib.suppress(Exception):
            barrier.abort()
        os._exit(1)


def test_concurrent_processes(store: Store, base) -> None:
    nproc, rounds = 6, 4
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(nproc + 1)
    errq = ctx.Queue()
    procs = [ctx.Process(target=_proc_worker, args=(store.root, i, rounds, barrier, errq)) for i in range(nproc)]
    for p in procs:
        p.start()
    try:
        barrier.wait(120)
        vols = store.volumes()
        assert sorted(v.id for v in vols) == sorted(f"p{i}-0" for i in range(nproc))
        assert all(v.state == "attached" for v in vols), vols
        assert store.template("base").users == tuple(sorted(f"p{i}-0" for i in range(nproc)))
        barrier.wait(120)
    except BaseException as e:  # the workers' errors (below) say more; this one is re-raised after
        parent_err = e
        with contextlib.suppress(Exception):
            barrier.abort()  # only on failure: aborting a passed barrier breaks late wakers
    else:
        parent_err = None
    finally:
        for p in procs:
            p.join(120)
            if p.is_alive():
                p.kill()
                p.join()
    errs = []
    while not errq.empty():
        errs.append(errq.get())
    assert errs == [], "\n".join(errs) + f"\nparent: {parent_err!r}"
    assert [p.exitcode for p in procs] == [0] * nproc
    if parent_err is not None:
        raise parent_err
    assert store.volumes() == []
    assert sha(base.path) == base.digest


def test_threads_share_one_store(store: Store, base) -> None:
    nthreads, rounds = 4, 4
    errs: list[str] = []

    def work(wid: int) -> None:
        try:
            for r in range(rounds):
                vid = f"t{wid}-{r}"
                v = store.create_volume(vid, "base")
                mark = f"{wid}:{r}".encode().ljust(CHUNK, b"#")
                write_at(v.device, (wid + 1) * MiB, mark)
                assert read_at(v.link, (wid + 1) * MiB, CHUNK) == mark
                store.checkpoint(vid)
                w = store.restore(vid, f"{vid}-r")
                assert read_at(w.link, (wid + 1) * MiB, CHUNK) == mark
                store.remove_volume(f"{vid}-r")
                store.remove_volume(vid)
        except BaseException:
            errs.append(f"thread {wid}: {traceback.format_exc()}")

    ts = [threading.Thread(target=work, args=(i,)) for i in range(nthreads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(300)
    assert errs == [], "\n".join(errs)
    assert store.volumes() == []


# -- data ----------------------------------------------------------------------------------------


def test_ext4_data_survives_checkpoint_and_restore_under_new_id(store: Store, base, tmp_path) -> None:
    before = host_state()
    digest = sha(base.path)
    v = store.create_volume("d1", "base")
    payload = os.urandom(3 * MiB + 123)
    with mounted_file(v.device, str(tmp_path / "m1")) as m:
        os.makedirs(os.path.join(m, "srv"))
        with open(os.path.join(m, "srv", "data.bin"), "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        assert open(os.path.join(m, "etc", "hostname")).read() == "template\n"
    assert_back(before, str(tmp_path))
    store.checkpoint("d1")
    r = store.restore("d1", "d2")
    fsck = subprocess.run(["e2fsck", "-fn", r.device], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    with mounted_file(r.link, str(tmp_path / "m2")) as m:
        with open(os.path.join(m, "srv", "data.bin"), "rb") as f:
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(payload).digest()
    assert_back(before, str(tmp_path))
    assert sha(base.path) == digest == base.digest
    store.verify_template("base")
    store.remove_volume("d2")
    store.remove_volume("d1")


# -- bad input ---------------------------------------------------------------------------------


def test_invalid_ids(store: Store, base, tmp_path) -> None:
    store.create_volume("ok", "base")
    store.checkpoint("ok")
    before, files = host_state(), store_files(store)
    for bad in BAD_IDS:
        with pytest.raises(InvalidArgument, match="invalid volume id"):
            store.create_volume(bad, "base")
        with pytest.raises(InvalidArgument, match="invalid volume id"):
            store.restore("ok", bad)
        with pytest.raises(InvalidArgument, match="invalid volume id"):
            store.fork("ok", [bad])
        assert_back(before, str(tmp_path))
        assert store_files(store) == files, bad
    assert [x.id for x in store.volumes()] == ["ok"]
    store.create_volume("x" * 64, "base")
    store.remove_volume("x" * 64)
    store.remove_volume("ok")


def test_missing_template(store: Store, tmp_path) -> None:
    before = host_state()
    with pytest.raises(NotFound, match="no-such-template"):
        store.create_volume("vm", "no-such-template")
    assert_back(before, str(tmp_path))
    assert store_files(store) == []
    assert store.volumes() == []


@pytest.mark.parametrize("how", ["write", "truncate", "mtime"])
def test_template_changed_on_disk(store: Store, how: str, tmp_path) -> None:
    inbox = os.path.join(store.data_root, "inbox")  # same filesystem as the volumes (reflink needs it)
    os.makedirs(inbox)
    try:
        src = os.path.join(inbox, "adopted.img")
        with open(src, "wb") as f:
            f.truncate(16 * MiB)
            f.seek(MiB)
            f.write(b"original")
        t = store.import_template(src, "adopted", adopt=True)
        store.create_volume("before", "adopted")
        store.checkpoint("before")
        if how == "write":
            with open(src, "r+b") as f:
                f.seek(8 * MiB)
                f.write(b"changed")
        elif how == "truncate":
            os.truncate(src, 16 * MiB + 4096)
        else:
            st = os.stat(src)
            os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        before, files = host_state(), store_files(store)
        with pytest.raises(TemplateChanged, match=t.id):
            store.create_volume("after", "adopted")
        with pytest.raises(TemplateChanged, match=t.id):
            store.restore("before")
        with pytest.raises(TemplateChanged, match=t.id):
            store.restore("before", "before2")
        assert_back(before, str(tmp_path))
        assert store_files(store) == files
        assert store.template("adopted").state == "changed"
        assert {v.id: v.state for v in store.volumes()} == {"before": "checkpointed"}
        store.remove_volume("before")
        store.remove_template("adopted")
    finally:
        shutil.rmtree(inbox, ignore_errors=True)


FS_OF = {"copy": "ext4", "reflink-xfs": "xfs", "reflink-btrfs": "btrfs"}
FS_SIZE = {"ext4": 64 * MiB, "xfs": 320 * MiB, "btrfs": 256 * MiB}


@pytest.mark.parametrize("kind", sorted(FS_OF))
def test_enospc_on_store_filesystem_during_create(kind: str, tmp_path) -> None:
    before = host_state()
    fstype = FS_OF[kind]
    with scratch_fs(fstype, FS_SIZE[fstype], base=str(tmp_path)) as mnt:
        s = Store(os.path.join(mnt, "store"), backend="copy" if kind == "copy" else "reflink")
        try:
            t = s.build_template(conformance.make_tree(str(tmp_path / "tree")), "base")
            filler = os.path.join(mnt, "filler")
            pre = s.create_volume("pre", "base")
            write_at(pre.device, 3 * MiB, b"P" * CHUNK)
            with open(filler, "wb", buffering=0) as f:
                for bs in (MiB, CHUNK):
                    with contextlib.suppress(OSError):
                        while True:
                            f.write(b"\xff" * bs)
                    with contextlib.suppress(OSError):
                        os.fsync(f.fileno())
            made, err = [], None
            for i in range(32):
                mid_state, mid_files = host_state(), store_files(s)
                try:
                    s.create_volume(f"e{i}", "base")
                    made.append(f"e{i}")
                except Exception as e:  # noqa: BLE001 - examined below
                    err = (f"e{i}", e)
                    break
            assert err is not None, f"32 creates succeeded on a full filesystem: {made}"
            vid, e = err
            assert isinstance(e, CowdiskError), repr(e)
            text = str(e)
            assert vid in text, text
            assert "ENOSPC" in text or "No space" in text or "full" in text, text
            assert_back(mid_state, str(tmp_path))
            assert store_files(s) == mid_files
            assert vid not in [v.id for v in s.volumes()]
            assert read_at(pre.link, 3 * MiB, CHUNK) == b"P" * CHUNK
            os.unlink(filler)
            again = s.create_volume(vid, "base")
            assert read_at(again.device, 3 * MiB, CHUNK) == read_at(t.path, 3 * MiB, CHUNK)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(filler)  # a full disk would fail the cleanup too
            s.destroy()
            s.close()
    assert_back(before, str(tmp_path))


def _hold_open(path: str, ready, release) -> None:
    fd = os.open(path, os.O_RDONLY)
    ready.set()
    release.wait(120)
    os.close(fd)
    os._exit(0)


def test_remove_while_volume_file_held_open(store: Store, base, tmp_path) -> None:
    v = store.create_volume("busy", "base")
    write_at(v.device, 2 * MiB, b"B" * CHUNK)
    before, files = host_state(), store_files(store)
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_open, args=(v.link, ready, release))
    p.start()
    try:
        assert ready.wait(60)
        with pytest.raises(InUse) as ei:
            store.remove_volume("busy", deadline_s=0.3)
        assert str(p.pid) in str(ei.value) and "busy" in str(ei.value), str(ei.value)
        w = store.volume("busy")
        assert w.state == "attached" and w.device == v.device
        assert os.path.realpath(w.link) == os.path.realpath(v.device)
        assert read_at(w.link, 2 * MiB, CHUNK) == b"B" * CHUNK
        assert store_files(store) == files
        assert_back(before, str(tmp_path))
    finally:
        release.set()
        p.join(60)
    store.remove_volume("busy")
    assert store.volumes() == []


# -- jail -------------------------------------------------------------------------------------------


def test_jail_hard_link(store: Store, base, tmp_path) -> None:
    v = store.create_volume("j", "base")
    jail = os.path.join(store.data_root, "jail-test", "dev")  # the volume's filesystem
    os.makedirs(jail)
    other = None
    try:
        with open(os.path.join(jail, "rootfs"), "wb") as f:  # stale, from an earlier run
            f.write(b"stale")
        node = store.jail("j", jail)
        assert node == os.path.join(jail, "rootfs")
        st, vst = os.stat(node), os.stat(v.device)
        assert (st.st_dev, st.st_ino) == (vst.st_dev, vst.st_ino)
        write_at(v.device, 4 * MiB, b"J" * CHUNK)
        assert read_at(node, 4 * MiB, CHUNK) == b"J" * CHUNK
        assert read_at(node, 0, MiB) == read_at(v.link, 0, MiB)
        store.jail("j", jail)  # again: the old link is replaced, no temporary left behind
        assert sorted(os.listdir(jail)) == ["rootfs"]
        # another filesystem cannot hold a hard link: a clear error, nothing made there
        dev = os.stat(store.data_root).st_dev
        for cand in (str(tmp_path), "/dev/shm", "/run"):
            if os.path.isdir(cand) and os.stat(cand).st_dev != dev:
                other = tempfile.mkdtemp(prefix="cowdisk-jail-", dir=cand)
                break
        assert other is not None
        with pytest.raises(Unsupported, match="another filesystem"):
            store.jail("j", other)
        assert os.listdir(other) == []
        with pytest.raises(NotFound):
            store.jail("j", os.path.join(jail, "missing"))
        store.checkpoint("j")
        with pytest.raises(StateError):
            store.jail("j", jail)
        store.remove_volume("j")
    finally:
        shutil.rmtree(os.path.join(store.data_root, "jail-test"), ignore_errors=True)
        if other:
            shutil.rmtree(other, ignore_errors=True)
