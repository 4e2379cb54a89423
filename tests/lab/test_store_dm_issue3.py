"""Issue 3, item 5 (all but the crash-point matrix) on dm-snapshot, against a real device-mapper.

* concurrency: processes (each with its own Store objects on one root) and threads (one
  shared Store) creating and removing volumes on one template: no errors, exactly one
  template loop while any volume is attached (witness: losetup), no leaks;
* data: ext4 written through a mounted volume survives checkpoint + restore under a new id,
  e2fsck -fn passes, the template's digest never changes;
* bad input: invalid ids, a missing template, a template changed on disk, COW overflow
  (a full rewrite fits; an undersized COW turns Invalid and is reported and removable),
  ENOSPC on the store's filesystem, removing a volume whose device is held open;
* jail: a block device node with the device's major:minor, replacing a stale node.

Every failure path checks the host is left exactly as before (assert_same_host) and that
no file is left under the store's volumes/ and links/ directories.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import multiprocessing
import os
import shutil
import stat
import subprocess
import threading
import time
import traceback
from typing import Iterator

import pytest

import conformance
from conformance import MiB, read_at, sha, write_at
from cowdisk.errors import (
    CowdiskError,
    InUse,
    InvalidArgument,
    NotFound,
    StateError,
    TemplateChanged,
)
from cowdisk.kernel import loop
from cowdisk.store import Store
from testutil import assert_same_host, host_state, scratch_fs

pytestmark = pytest.mark.lab

CHUNK = 4096
BAD_IDS = ["", "a/b", "/abs", "..", "a..b", ".hidden", "-dash", "a b", "a\tb", "a\0b", "a\nb", "x" * 65,
           "é", "vm*", "vm;rm", "$(x)"]


# -- helpers -------------------------------------------------------------------------------


def store_files(s: Store) -> list[str]:
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
    """The same count from sysfs (fast: no process start), for polling."""
    return sum(1 for li in loop.list_loops() if li.backing_file == path)


def dmsetup_status(name: str) -> str:
    return subprocess.run(["dmsetup", "status", name], capture_output=True, text=True, check=True).stdout


@contextlib.contextmanager
def mounted(dev: str, mnt: str) -> Iterator[str]:
    os.makedirs(mnt, exist_ok=True)
    subprocess.run(["mount", "-t", "ext4", dev, mnt], check=True, capture_output=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=False, capture_output=True)


@pytest.fixture
def store(tmp_path) -> Iterator[Store]:
    before = host_state()
    s = Store(str(tmp_path / "store"), backend="dm-snapshot")
    try:
        yield s
        left = store_files(s)
    finally:
        s.destroy()
        s.close()
    assert_same_host(before)
    assert left == [], left


@pytest.fixture
def base(store: Store, tmp_path):
    return store.build_template(conformance.make_tree(str(tmp_path / "tree")), "base")


# -- concurrency ---------------------------------------------------------------------------


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
                    barrier.wait(300)  # everyone attached: the parent looks at losetup
                    barrier.wait(300)
                s.remove_volume(vid)
    except BaseException:
        errq.put(f"worker {wid}: {traceback.format_exc()}")
        errq.close()
        errq.join_thread()  # flush before _exit
        with contextlib.suppress(Exception):
            barrier.abort()
        os._exit(1)


def test_concurrent_processes_one_template_loop(store: Store, base) -> None:
    nproc, rounds = 4, 3
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(nproc + 1)
    errq = ctx.Queue()
    procs = [ctx.Process(target=_proc_worker, args=(store.root, i, rounds, barrier, errq)) for i in range(nproc)]
    for p in procs:
        p.start()
    most = 0
    try:
        # poll the loop count from sysfs until everyone is attached
        waiter = threading.Thread(target=barrier.wait, args=(300,), daemon=True)
        waiter.start()
        while waiter.is_alive():
            most = max(most, sysfs_template_loops(base.path))
            time.sleep(0.01)
        assert not barrier.broken, [errq.get() for _ in range(errq.qsize())] if not errq.empty() else "barrier"
        attached = [v.id for v in store.volumes() if v.state == "attached"]
        assert len(attached) == nproc, attached
        tl = losetup_template_loops(base.path)
        assert len(tl) == 1, tl
        barrier.wait(300)
        while any(p.is_alive() for p in procs):
            most = max(most, sysfs_template_loops(base.path))
            time.sleep(0.01)
    except BaseException:
        with contextlib.suppress(Exception):
            barrier.abort()  # only on failure: aborting a passed barrier breaks late wakers
        raise
    finally:
        for p in procs:
            p.join(120)
            if p.is_alive():
                p.kill()
                p.join()
    errs = []
    while not errq.empty():
        errs.append(errq.get())
    assert errs == [], "\n".join(errs)
    assert [p.exitcode for p in procs] == [0] * nproc
    assert most <= 1, f"saw {most} loops on the template at once"
    assert store.volumes() == []
    assert losetup_template_loops(base.path) == []
    assert sha(base.path) == base.digest


def test_threads_share_one_store(store: Store, base) -> None:
    nthreads, rounds = 4, 3
    errs: list[str] = []
    barrier = threading.Barrier(nthreads + 1)

    def work(wid: int) -> None:
        try:
            for r in range(rounds):
                vid = f"t{wid}-{r}"
                v = store.create_volume(vid, "base")
                mark = f"{wid}:{r}".encode().ljust(CHUNK, b"#")
                write_at(v.device, (wid + 1) * MiB, mark)
                assert read_at(v.device, (wid + 1) * MiB, CHUNK) == mark
                if r == 0:
                    barrier.wait(300)
                    barrier.wait(300)
                store.remove_volume(vid)
        except BaseException:
            errs.append(f"thread {wid}: {traceback.format_exc()}")
            barrier.abort()

    ts = [threading.Thread(target=work, args=(i,)) for i in range(nthreads)]
    for t in ts:
        t.start()
    try:
        barrier.wait(300)
        assert len(losetup_template_loops(base.path)) == 1
        assert len(store.volumes()) == nthreads
        barrier.wait(300)
    except threading.BrokenBarrierError:
        pass
    finally:
        for t in ts:
            t.join(300)
    assert errs == [], "\n".join(errs)
    assert store.volumes() == []
    assert losetup_template_loops(base.path) == []


# -- data ------------------------------------------------------------------------------------


def test_ext4_data_survives_checkpoint_and_restore_under_new_id(store: Store, base, tmp_path) -> None:
    digest = sha(base.path)
    v = store.create_volume("d1", "base")
    payload = os.urandom(3 * MiB + 123)
    with mounted(v.device, str(tmp_path / "m1")) as m:
        os.makedirs(os.path.join(m, "srv"))
        with open(os.path.join(m, "srv", "data.bin"), "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        assert open(os.path.join(m, "etc", "hostname")).read() == "template\n"
    store.checkpoint("d1")
    r = store.restore("d1", "d2")
    fsck = subprocess.run(["e2fsck", "-fn", r.device], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    with mounted(r.link, str(tmp_path / "m2")) as m:
        with open(os.path.join(m, "srv", "data.bin"), "rb") as f:
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(payload).digest()
    assert sha(base.path) == digest == base.digest
    store.verify_template("base")  # full digest check
    store.remove_volume("d2")
    store.remove_volume("d1")


# -- bad input ---------------------------------------------------------------------------------


def test_invalid_ids(store: Store, base) -> None:
    v = store.create_volume("ok", "base")
    store.checkpoint("ok")
    before, files = host_state(), store_files(store)
    for bad in BAD_IDS:
        with pytest.raises(InvalidArgument, match="invalid volume id"):
            store.create_volume(bad, "base")
        with pytest.raises(InvalidArgument, match="invalid volume id"):
            store.restore("ok", bad)
        with pytest.raises(InvalidArgument, match="invalid volume id"):
            store.fork("ok", [bad])
        assert_same_host(before)
        assert store_files(store) == files, bad
    assert [x.id for x in store.volumes()] == ["ok"]
    # the longest valid id fits the dm name limit with the store's prefix
    longest = "x" * 64
    w = store.create_volume(longest, "base")
    assert os.path.basename(os.path.realpath(w.link)) == os.path.basename(w.device)
    store.remove_volume(longest)
    store.remove_volume(v.id)


def test_missing_template(store: Store, base) -> None:
    before, files = host_state(), store_files(store)
    with pytest.raises(NotFound, match="no-such-template"):
        store.create_volume("vm", "no-such-template")
    assert_same_host(before)
    assert store_files(store) == files == []
    assert store.volumes() == []


@pytest.mark.parametrize("how", ["write", "truncate", "mtime"])
def test_template_changed_on_disk(store: Store, tmp_path, how: str) -> None:
    src = str(tmp_path / "adopted.img")
    with open(src, "wb") as f:
        f.truncate(16 * MiB)
    t = store.import_template(src, "adopted", adopt=True)
    # a volume made before the change, checkpointed: restore must refuse too
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
    assert_same_host(before)
    assert store_files(store) == files
    assert store.template("adopted").state == "changed"
    assert {v.id: v.state for v in store.volumes()} == {"before": "checkpointed"}
    store.remove_volume("before")
    store.remove_template("adopted")


def test_full_rewrite_fits_the_cow(store: Store, base) -> None:
    v = store.create_volume("full", "base")
    size = base.size
    fd = os.open(v.device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        block = bytearray(os.urandom(MiB))
        for off in range(0, size, MiB):
            block[:8] = off.to_bytes(8, "little")
            os.pwrite(fd, block, off)
        os.fsync(fd)
    finally:
        os.close(fd)
    st = dmsetup_status(store.dm_prefix + "full")
    assert "Invalid" not in st and "Overflow" not in st, st
    u = store.usage("full")
    assert u.health == "ok", u
    assert u.cow_used_bytes is not None and u.cow_total_bytes is not None
    assert u.cow_used_bytes <= u.cow_total_bytes, u
    # every data chunk was written: the COW holds the whole device plus its metadata
    assert u.cow_used_bytes >= size, u
    assert read_at(v.device, size - MiB, 8) == (size - MiB).to_bytes(8, "little")
    store.checkpoint("full")
    store.restore("full")
    assert store.usage("full").health == "ok"
    assert read_at(v.link, 5 * MiB, 8) == (5 * MiB).to_bytes(8, "little")
    store.remove_volume("full")


def test_undersized_cow_turns_invalid_and_is_reported(store: Store, base) -> None:
    store.create_volume("small", "base")
    store.checkpoint("small")
    cow = os.path.join(store.data_root, "volumes", "small", "cow.img")
    os.truncate(cow, 16 * CHUNK)  # header, one metadata area, 14 data chunks
    v = store.restore("small")
    assert store.usage("small").health == "ok"
    fd = os.open(v.device, os.O_WRONLY | os.O_CLOEXEC)
    failed_at = None
    try:
        for i in range(256):
            try:
                os.pwrite(fd, os.urandom(CHUNK), (i * 16) * CHUNK)
                os.fsync(fd)
            except OSError as e:
                assert e.errno == errno.EIO, e
                failed_at = i
                break
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    assert failed_at is not None and failed_at <= 16, failed_at
    assert "Invalid" in dmsetup_status(store.dm_prefix + "small")
    u = store.usage("small")
    assert u.health == "invalid", u
    store.remove_volume("small")
    assert store.volumes() == []


def test_enospc_on_store_filesystem_during_create(tmp_path) -> None:
    before = host_state()
    with scratch_fs("ext4", 64 * MiB, base=str(tmp_path)) as mnt:
        s = Store(os.path.join(mnt, "store"), backend="dm-snapshot")
        try:
            t = s.build_template(conformance.make_tree(str(tmp_path / "tree")), "base")
            pre = s.create_volume("pre", "base")
            write_at(pre.device, 3 * MiB, b"P" * CHUNK)
            # fill the filesystem
            filler = os.path.join(mnt, "filler")
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
            assert_same_host(mid_state)
            assert store_files(s) == mid_files
            assert vid not in [v.id for v in s.volumes()]
            # earlier volumes are intact
            assert read_at(pre.link, 3 * MiB, CHUNK) == b"P" * CHUNK
            assert s.usage("pre").health == "ok"
            os.unlink(filler)
            again = s.create_volume(vid, "base")
            assert read_at(again.device, 3 * MiB, CHUNK) == read_at(t.path, 3 * MiB, CHUNK)
        finally:
            s.destroy()
            s.close()
    assert_same_host(before)


def _hold_open(dev: str, ready, release) -> None:
    fd = os.open(dev, os.O_RDONLY)
    ready.set()
    release.wait(120)
    os.close(fd)
    os._exit(0)


def test_remove_while_device_held_open_by_another_process(store: Store, base) -> None:
    v = store.create_volume("busy", "base")
    write_at(v.device, 2 * MiB, b"B" * CHUNK)
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_open, args=(v.device, ready, release))
    p.start()
    try:
        assert ready.wait(120)
        t0 = time.monotonic()
        with pytest.raises(InUse) as ei:
            store.remove_volume("busy", deadline_s=0.5)
        assert time.monotonic() - t0 < 30
        assert str(p.pid) in str(ei.value), str(ei.value)
        w = store.volume("busy")
        assert w.state == "attached" and w.device == v.device
        assert os.path.realpath(w.link) == os.path.realpath(v.device)
        assert read_at(w.link, 2 * MiB, CHUNK) == b"B" * CHUNK
        write_at(w.link, 2 * MiB, b"C" * CHUNK)
    finally:
        release.set()
        p.join(120)
    store.remove_volume("busy")
    assert store.volumes() == []


def test_remove_while_device_held_open_by_this_process(store: Store, base) -> None:
    v = store.create_volume("busy", "base")
    fd = os.open(v.device, os.O_RDONLY)
    try:
        with pytest.raises(InUse) as ei:
            store.remove_volume("busy", deadline_s=0.5)
        assert str(os.getpid()) in str(ei.value), str(ei.value)
        w = store.volume("busy")
        assert w.state == "attached", w
        assert os.path.realpath(w.link) == os.path.realpath(v.device)
        write_at(w.link, 0, os.pread(fd, CHUNK, 0))
    finally:
        os.close(fd)
    store.remove_volume("busy")


# -- jail -------------------------------------------------------------------------------------


def test_jail_device_node(store: Store, base, tmp_path) -> None:
    v = store.create_volume("j", "base")
    jail = tmp_path / "jail" / "dev"
    jail.mkdir(parents=True)
    try:
        with open(jail / "rootfs", "wb") as f:  # a stale file from an earlier run
            f.write(b"stale")
        node = store.jail("j", str(jail))
        assert node == str(jail / "rootfs")
        st, dst = os.stat(node), os.stat(v.device)
        assert stat.S_ISBLK(st.st_mode) and st.st_rdev == dst.st_rdev
        write_at(v.device, 4 * MiB, b"J" * CHUNK)
        assert read_at(node, 4 * MiB, CHUNK) == b"J" * CHUNK
        assert read_at(node, 0, MiB) == read_at(v.link, 0, MiB)
        # a stale block node with another major:minor is replaced
        os.unlink(node)
        os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(7, 255))
        store.jail("j", str(jail), uid=1234, gid=5678)
        st = os.stat(node)
        assert st.st_rdev == dst.st_rdev and (st.st_uid, st.st_gid) == (1234, 5678)
        assert sorted(os.listdir(jail)) == ["rootfs"]
        with pytest.raises(NotFound):
            store.jail("j", str(tmp_path / "no-such-jail"))
        store.checkpoint("j")
        with pytest.raises(StateError):
            store.jail("j", str(jail))
        store.remove_volume("j")
    finally:
        shutil.rmtree(tmp_path / "jail", ignore_errors=True)
