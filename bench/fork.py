#!/usr/bin/env python3
"""Fork into N and many creates at once (issue 24), against the kernel's own steps, in one run.

    python3 bench/fork.py                                                  # host: pool, reflink-xfs
    python3 lab/kernel_lab.py run --timeout 1500 -- python3 bench/fork.py  # lab: dm-thin

For each backend a store, a template built from a small tree, a source volume attached
(its first 32 MiB written, so a clone has extents to share):

1. **Hold.** Fork the source into 1, 10 and 100 children (``--rounds`` times each, the
   children removed between): how long the source is held, from the outside of the
   store's code: a dm source from its suspend to its resume (the device-mapper ioctls,
   timed where this process makes them), a file source for the one clone or copy that
   reads it (files: FICLONE holds the source inode's I/O lock for its duration). Goal: for
   100 children at most 2x the hold for 1.
2. **Whole fork of 100** against the kernel floor: 100 FICLONEs of the source file into
   the same filesystem (files), or one suspend, 100 ``create_snap`` messages and one
   resume (dm-thin), in this process with no bookkeeping. Goal: within 1.5x.
3. **100 creates at once through the daemon**: 100 client threads, each its own
   connection, released together; time until the last volume is attached; against the
   same 100 one after another through one client, the kernel floor of 100 creates
   (FICLONE of the template; dm-thin: create_snap + activate), and containerd's devmapper
   snapshotter at 116 ms per device (containerd/containerd#12335: 11.6 s for 100). Goal:
   host (pool) under 1 s for all 100; lab (dm-thin) within 1.5x of the kernel's floor.

Medians over ``--rounds``; every figure of a row comes from the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
from typing import Any, Callable, Iterator

from benchutil import GiB, MiB, in_lab, new_tag, scratch_fs, sigterm_as_interrupt, table, workdir
from service import daemon, make_tree

from cowdisk.client import Client
from cowdisk.kernel import dm
from cowdisk.kernel import fs as kfs
from cowdisk.store import Store

CONTAINERD_MS = 116.0


@contextlib.contextmanager
def holds(store: Store, source: str) -> Iterator[list[float]]:
    """Durations the source is held during the block (seconds), measured at the kernel
    calls: dm suspend -> resume of the source's device, or a clone/copy reading its file."""
    out: list[float] = []
    with contextlib.ExitStack() as undo:
        if store.backend.block_device:
            ctl = dm.control()
            name = store.dm_prefix + source
            t0: list[float] = []
            orig_s, orig_r = ctl.suspend, ctl.resume

            def suspend(n: str, *a: Any, **k: Any) -> Any:
                if n == name:
                    t0.append(time.perf_counter())
                return orig_s(n, *a, **k)

            def resume(n: str, *a: Any, **k: Any) -> Any:
                r = orig_r(n, *a, **k)
                if n == name and t0:
                    out.append(time.perf_counter() - t0.pop())
                return r

            ctl.suspend, ctl.resume = suspend, resume  # type: ignore[method-assign]
            undo.callback(lambda: (setattr(ctl, "suspend", orig_s), setattr(ctl, "resume", orig_r)))
        else:
            src_file = os.path.realpath(store.volume(source).device or "")
            for fn in ("ficlone", "sparse_copy"):
                orig = getattr(kfs, fn)

                def timed(src: str, *a: Any, _orig: Callable[..., Any] = orig, **k: Any) -> Any:
                    t = time.perf_counter()
                    try:
                        return _orig(src, *a, **k)
                    finally:
                        if os.path.realpath(src) == src_file:
                            out.append(time.perf_counter() - t)

                setattr(kfs, fn, timed)
                undo.callback(setattr, kfs, fn, orig)
        yield out


def kernel_fork_floor(store: Store, source: str, n: int, scratch: str) -> float:
    """n of the kernel's own snapshot steps of the source, no bookkeeping (seconds)."""
    v = store.volume(source)
    if store.backend_name == "dm-thin":
        b: Any = store.backend
        with open(b._id_path(store.ctx(store.registry.get_volume(source)))) as f:
            origin = int(f.read().split()[0])
        last = b._alloc_id(n)
        ids = range(last - n + 1, last + 1)  # allocated before the clock starts
        ctl = dm.control()
        t = time.perf_counter()
        ctl.suspend(store.dm_prefix + source)
        try:
            for tid in ids:
                b._message(f"create_snap {tid} {origin}")
        finally:
            ctl.resume(store.dm_prefix + source)
        took = time.perf_counter() - t
        for tid in ids:
            b._message(f"delete {tid}")
        return took
    os.makedirs(scratch, exist_ok=True)
    src = os.path.realpath(v.device or "")
    t = time.perf_counter()
    for i in range(n):
        kfs.ficlone(src, os.path.join(scratch, f"k{i}"))
    took = time.perf_counter() - t
    for i in range(n):
        os.unlink(os.path.join(scratch, f"k{i}"))
    return took


def kernel_create_floor(store: Store, n: int, scratch: str) -> float:
    """n creates as the kernel's own steps (seconds): FICLONE of the template, or on dm-thin
    create_snap of the template's thin + activate a device on it."""
    t = store.template("base")
    if store.backend_name == "dm-thin":
        b: Any = store.backend
        origin = b._template_thin(store.ctx(store.registry.get_volume("src")))  # filled by src's create
        last = b._alloc_id(n)
        ids = range(last - n + 1, last + 1)
        ctl = dm.control()
        names = [f"{store.dm_prefix}floor{i}" for i in range(n)]
        t0 = time.perf_counter()
        for tid, name in zip(ids, names):
            b._message(f"create_snap {tid} {origin}")
            ctl.create_device(name, b._thin_table(tid, t.size // 512 * 512))
        took = time.perf_counter() - t0
        for tid, name in zip(ids, names):
            ctl.remove(name, deadline_s=10.0, missing_ok=True)
            b._message(f"delete {tid}")
        return took
    os.makedirs(scratch, exist_ok=True)
    t0 = time.perf_counter()
    for i in range(n):
        kfs.ficlone(t.path, os.path.join(scratch, f"c{i}"))
    took = time.perf_counter() - t0
    for i in range(n):
        os.unlink(os.path.join(scratch, f"c{i}"))
    return took


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` and its children (the store workers)."""
    tck = os.sysconf("SC_CLK_TCK")
    total = 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tck
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except FileNotFoundError:
        return total
    return total + sum(cpu_s(k) for k in kids)


def creates_at_once(sock: str, n: int) -> tuple[float, list[str]]:
    """n create_volume calls from n threads, each its own Client, released together."""
    clients = [Client(sock) for _ in range(n)]
    for c in clients:
        c.answers()  # the connection made before the clock starts
    go = threading.Barrier(n + 1)
    errors: list[str] = []
    done: list[float] = []

    def one(i: int) -> None:
        go.wait()
        try:
            clients[i].create_volume(f"at{i}", "base")
            done.append(time.perf_counter())
        except Exception as e:  # reported, not hidden
            errors.append(f"at{i}: {e}")

    ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for th in ts:
        th.start()
    go.wait()
    t0 = time.perf_counter()
    for th in ts:
        th.join()
    return (max(done) - t0 if done else float("nan")), errors


def bench_backend(name: str, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    res: dict[str, Any] = {"backend": name}
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(workdir(tag))
        if name == "reflink-xfs":
            root = os.path.join(stack.enter_context(scratch_fs("xfs", 8 * GiB, tag, base=base)), "store")
            backend = "reflink"
        else:
            root = os.path.join(base, "store")
            backend = name
        store = Store(root, backend=backend)
        stack.callback(store.close)
        stack.callback(lambda: Store(root).destroy())
        store.build_template(make_tree(os.path.join(base, "tree")), "base")
        src = store.create_volume("src", "base")
        fd = os.open(src.link, os.O_WRONLY)
        try:
            for i in range(32):
                os.pwrite(fd, os.urandom(MiB), i * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
        scratch = os.path.join(store.data_root, f"{tag}-floor")
        for n in args.counts:
            hold, whole = [], []
            for r in range(args.rounds):
                with holds(store, "src") as h:
                    t = time.perf_counter()
                    kids = store.fork("src", count=n, prefix=f"r{r}k")
                    whole.append(time.perf_counter() - t)
                assert len(h) == 1, f"the source was held {len(h)} times for one fork"
                hold.append(h[0])
                for k in kids:
                    store.remove_volume(k.id)
            res[f"hold_{n}"] = statistics.median(hold)
            res[f"fork_{n}"] = statistics.median(whole)
            print(f"{name}: fork into {n}: hold {ms(res[f'hold_{n}'])}, whole {ms(res[f'fork_{n}'])}", flush=True)
        n = max(args.counts)
        res["floor_fork"] = statistics.median(kernel_fork_floor(store, "src", n, scratch)
                                              for _ in range(args.rounds))
        res["floor_create"] = statistics.median(kernel_create_floor(store, args.creates, scratch)
                                                for _ in range(args.rounds))
        print(f"{name}: floors: fork {ms(res['floor_fork'])}, create {ms(res['floor_create'])}", flush=True)
        sock = os.path.join(base, "d.sock")
        d = stack.enter_context(daemon(root, sock, backend, os.path.join(base, "daemon.log"), args.processes,
                                       args.workers, start_s=600.0 if in_lab() else 60.0))
        c = Client(sock)
        at_once, seq, busy = [], [], []
        for _ in range(args.rounds):
            cpu0 = cpu_s(d.pid)
            took, errors = creates_at_once(sock, args.creates)
            if errors:
                raise RuntimeError(f"{len(errors)} creates failed: {errors[:3]}")
            at_once.append(took)
            busy.append((cpu_s(d.pid) - cpu0) / took)
            for i in range(args.creates):
                c.remove_volume(f"at{i}")
            t0 = time.perf_counter()
            for i in range(args.creates):
                c.create_volume(f"sq{i}", "base")
            seq.append(time.perf_counter() - t0)
            for i in range(args.creates):
                c.remove_volume(f"sq{i}")
        res["creates_at_once"] = statistics.median(at_once)
        res["daemon_cores_busy"] = statistics.median(busy)
        res["creates_one_by_one"] = statistics.median(seq)
        for k in list(store.volumes()):
            store.remove_volume(k.id)
    return res


def ms(s: float) -> str:
    return f"{s * 1000:.1f} ms"


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    counts, n, c = args.counts, max(args.counts), args.creates
    print(f"\n== {r['backend']}")
    table(["children", "source held", "whole fork", "per child"],
          [[str(k), ms(r[f"hold_{k}"]), ms(r[f"fork_{k}"]), ms(r[f"fork_{k}"] / k)] for k in counts])
    lo = min(counts)
    ratio_hold = r[f"hold_{n}"] / r[f"hold_{lo}"]
    ratio_fork = r[f"fork_{n}"] / r["floor_fork"]
    lab = r["backend"].startswith("dm-")
    print(f"hold {n} / hold {lo}: {ratio_hold:.2f}x (goal <= 2x: {'met' if ratio_hold <= 2 else 'NOT met'})")
    print(f"fork of {n}: {ms(r[f'fork_{n}'])} vs kernel floor {ms(r['floor_fork'])} "
          f"({'suspend + ' if lab else ''}{n} x {'create_snap' if lab else 'FICLONE'}"
          f"{' + resume' if lab else ''}): {ratio_fork:.2f}x (goal <= 1.5x: {'met' if ratio_fork <= 1.5 else 'NOT met'})")
    table([f"{c} creates", "time", "per volume"],
          [["at once, daemon, 100 clients" if c == 100 else f"at once, daemon, {c} clients",
            ms(r["creates_at_once"]), ms(r["creates_at_once"] / c)],
           ["one after another, daemon, 1 client", ms(r["creates_one_by_one"]), ms(r["creates_one_by_one"] / c)],
           ["kernel floor, 1 thread" + (" (create_snap + activate)" if lab else " (FICLONE)"),
            ms(r["floor_create"]), ms(r["floor_create"] / c)],
           ["containerd devmapper (published)", ms(CONTAINERD_MS * c / 1000), ms(CONTAINERD_MS / 1000)]])
    print(f"the daemon and its store workers used {r['daemon_cores_busy']:.2f} cores on average during the "
          f"{c} creates at once ({os.cpu_count()} on this machine): below that, something serializes them")
    if lab:
        q2 = r[f"fork_{n}"] / r["floor_create"] * c / n
        print(f"fork of {n} vs {n} x (create_snap + activate), the children being attached too: {q2:.2f}x")
        q = r["creates_at_once"] / r["floor_create"]
        print(f"at once vs kernel floor: {q:.2f}x (goal <= 1.5x: {'met' if q <= 1.5 else 'NOT met'})")
    else:
        print(f"all {c} at once: {ms(r['creates_at_once'])} "
              f"(goal < 1 s on pool: {'met' if r['creates_at_once'] < 1 else 'NOT met'})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="dm-thin" if in_lab() else "pool,reflink-xfs")
    ap.add_argument("--counts", default="1,10,100", help="children per fork")
    ap.add_argument("--creates", type=int, default=100, help="volumes created at once")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--processes", type=int, help="the daemon's store workers (default: the daemon's default)")
    ap.add_argument("--workers", type=int, help="store calls at once (default: the daemon's)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    args.counts = [int(x) for x in args.counts.split(",")]
    if os.geteuid() != 0:
        print("bench/fork.py needs root (loop devices, mounts)", file=sys.stderr)
        return 2
    sigterm_as_interrupt()
    tag = new_tag()
    print(f"bench/fork.py: {os.cpu_count()} cores, forks into {args.counts}, {args.creates} creates at once, "
          f"{args.rounds} rounds (medians)")
    results = []
    for b in args.backends.split(","):
        r = bench_backend(b, args, tag)
        results.append(r)
        report(r, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
