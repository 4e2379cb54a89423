"""Concurrency: processes, each with its own Store objects on one root, and threads sharing
one Store, creating, writing, checkpointing, restoring and removing volumes of one template.

No errors, every worker sees its own data, the registry lists exactly the live volumes,
the template never changes, and a block backend attaches exactly one read-only loop for
the template however many volumes use it (witness: sysfs polled throughout, losetup at
the rendezvous); a file backend attaches none.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
import time
import traceback

from cowdisk.store import Store
from testutil import (
    BLOCK_BACKENDS,
    TEMPLATE_LOOP_BACKENDS,
    MiB,
    losetup_template_loops,
    read_at,
    sha,
    sysfs_template_loops,
    write_at,
)

CHUNK = 4096
RENDEZVOUS_S = 300  # generous: the kernel lab runs under software emulation


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
                    barrier.wait(RENDEZVOUS_S)  # everyone attached: the parent looks
                    barrier.wait(RENDEZVOUS_S)
                s.remove_volume(vid)
    except BaseException:
        errq.put(f"worker {wid}: {traceback.format_exc()}")
        errq.close()
        errq.join_thread()  # flush before _exit
        with contextlib.suppress(Exception):
            barrier.abort()
        os._exit(1)


def _wait_quietly(barrier) -> None:
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait(RENDEZVOUS_S)


def test_concurrent_processes(store, base, backend) -> None:
    block = backend in BLOCK_BACKENDS
    nproc, rounds = (4, 3) if block else (6, 4)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(nproc + 1)
    errq = ctx.Queue()
    procs = [ctx.Process(target=_proc_worker, args=(store.root, i, rounds, barrier, errq)) for i in range(nproc)]
    for p in procs:
        p.start()
    most = 0
    parent_err = None
    try:
        # poll the template's loop count from sysfs until everyone is attached
        waiter = threading.Thread(target=_wait_quietly, args=(barrier,), daemon=True)
        waiter.start()
        while waiter.is_alive():
            most = max(most, sysfs_template_loops(base.path))
            time.sleep(0.01)
        assert not barrier.broken, "a worker failed before the rendezvous"
        expect = sorted(f"p{i}-0" for i in range(nproc))
        vols = store.volumes()
        assert sorted(v.id for v in vols) == expect
        assert all(v.state == "attached" for v in vols), vols
        assert store.template("base").users == tuple(expect)
        tl = losetup_template_loops(base.path)
        assert len(tl) == (1 if backend in TEMPLATE_LOOP_BACKENDS else 0), tl
        barrier.wait(RENDEZVOUS_S)
        while any(p.is_alive() for p in procs):
            most = max(most, sysfs_template_loops(base.path))
            time.sleep(0.01)
    except BaseException as e:  # the workers' errors (below) say more; this one is re-raised after
        parent_err = e
        with contextlib.suppress(Exception):
            barrier.abort()  # only on failure: aborting a passed barrier breaks late wakers
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
    assert most <= 1, f"saw {most} loops on the template at once"
    assert store.volumes() == []
    assert losetup_template_loops(base.path) == []
    assert sha(base.path) == base.digest


def test_threads_share_one_store(store, base, backend) -> None:
    block = backend in BLOCK_BACKENDS
    nthreads, rounds = 4, (3 if block else 4)
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
                assert read_at(v.link, (wid + 1) * MiB, CHUNK) == mark
                if r == 0:
                    barrier.wait(RENDEZVOUS_S)
                    barrier.wait(RENDEZVOUS_S)
                store.checkpoint(vid)
                w = store.restore(vid, f"{vid}-r")
                assert read_at(w.link, (wid + 1) * MiB, CHUNK) == mark
                store.remove_volume(f"{vid}-r")
                store.remove_volume(vid)
        except BaseException:
            errs.append(f"thread {wid}: {traceback.format_exc()}")
            barrier.abort()

    ts = [threading.Thread(target=work, args=(i,)) for i in range(nthreads)]
    for t in ts:
        t.start()
    try:
        barrier.wait(RENDEZVOUS_S)
        tl = losetup_template_loops(base.path)
        assert len(tl) == (1 if backend in TEMPLATE_LOOP_BACKENDS else 0), tl
        assert len(store.volumes()) == nthreads
        barrier.wait(RENDEZVOUS_S)
    except threading.BrokenBarrierError:
        pass  # a thread failed: errs says why
    except BaseException:
        barrier.abort()  # release the threads, then report
        raise
    finally:
        for t in ts:
            t.join(300)
    assert errs == [], "\n".join(errs)
    assert store.volumes() == []
    assert losetup_template_loops(base.path) == []
