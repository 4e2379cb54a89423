#!/usr/bin/env python3
"""Create+remove throughput of several processes on one store (pool backend), each with
its own ``Store`` on the same root, as the daemon's worker processes run.

    python3 bench/registry.py [--procs 1,4] [--seconds 4] [--rounds 2] [--profile]

Modes, alternated round by round in one run (A/B/A/B):

``flock``     the registry as it is: writers of all processes wait on the registry's
              blocking flock (``<registry>.lock``), woken by the kernel at release;
``sqlite``    the flock replaced (in the worker only, by a monkeypatch) with a private
              uncontended lock file: writers of different processes meet inside SQLite,
              whose busy handler sleeps 1, 2, 5, 10 ... 100 ms between tries (the
              registry before the flock);
``floor``     the kernel's floor for the same work: FICLONE of the template + unlink,
              plus 3 fdatasyncs of a small file (what a durable create+remove waits for,
              docs/architecture.md "What waits for the disk").

Each process opens its store, waits for the start, then runs create+remove pairs for
``--seconds``; the figures are the pairs of all processes per second of wall time, the
latency of each pair, and the CPU time (user + system, of the workers) per pair: the
least noisy figure on a shared machine.
``--profile`` instead runs 300 create+remove in this process under cProfile and prints
the SQL statements and write transactions per create+remove (a trace callback) and the
top of the profile.

Only the bench's own store (under ``cdbench-*``) is touched; it is destroyed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchutil as bu  # noqa: E402
from benchutil import MiB  # noqa: E402

from cowdisk.registry import Registry  # noqa: E402
from cowdisk.store import Store  # noqa: E402

FICLONE = 0x40049409
MODES = ["flock", "sqlite", "floor"]


def worker(root: str, tid: str, mode: str, seconds: float, who: str) -> None:
    if mode == "sqlite":  # no cross-process lock: a private file, so the syscalls stay the same
        own = os.open(os.path.join(root, f"bench-private-{os.getpid()}.lock"),
                      os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        Registry._lock_across_processes = lambda self: (fcntl.flock(own, fcntl.LOCK_EX), own)[1]  # type: ignore
    st = Store(root) if mode != "floor" else None
    tpath = scratch = ""
    if st is None:
        ro = Store(root, recover=False)
        tpath, scratch = ro.registry.get_template(tid).path, os.path.join(ro.data_root, f"floor-{who}")
        ro.close()
    print("ready", flush=True)
    sys.stdin.readline()
    n = 0
    lat: list[float] = []
    cpu0 = time.process_time()
    start = time.monotonic()
    end = start + seconds
    while (t0 := time.monotonic()) < end:
        name = f"{who}-{n}"
        if st is not None:
            st.create_volume(name, tid)
            st.remove_volume(name)
        else:
            with open(tpath, "rb") as src, open(f"{scratch}-{n}", "wb") as dst:
                fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
                os.fdatasync(dst.fileno())
            fd = os.open(f"{scratch}-sync", os.O_WRONLY | os.O_CREAT, 0o600)
            os.pwrite(fd, b"x", 0)
            os.fdatasync(fd)
            os.pwrite(fd, b"y", 0)
            os.fdatasync(fd)
            os.close(fd)
            os.unlink(f"{scratch}-{n}")
            os.unlink(f"{scratch}-sync")
        n += 1
        lat.append(time.monotonic() - t0)
    print(n, time.monotonic() - start, time.process_time() - cpu0, " ".join(f"{x:.6f}" for x in lat), flush=True)
    if st is not None:
        st.close()


def run_mode(root: str, tid: str, mode: str, procs: int, seconds: float) -> tuple[float, float, list[float]]:
    """(pairs per second of wall time, CPU seconds per pair, each pair's latency)."""
    env = dict(os.environ, PYTHONPATH=str(bu.ROOT / "src"))
    ps = [subprocess.Popen([sys.executable, __file__, "--worker", root, tid, mode, str(seconds), f"w{mode}{procs}x{k}"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
          for k in range(procs)]
    try:
        for p in ps:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in ps:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        total, wall, cpu, lat = 0, 0.0, 0.0, []
        for p in ps:
            out, _ = p.communicate(timeout=seconds + 300)
            if p.returncode:
                raise SystemExit(f"worker {mode} failed with {p.returncode}")
            n, el, c, *ls = out.split()
            total += int(n)
            wall = max(wall, float(el))
            cpu += float(c)
            lat += [float(x) for x in ls]
        return total / wall, cpu / max(1, total), lat
    finally:
        for p in ps:
            if p.poll() is None:
                p.kill()
                p.wait()


def profile(root: str, tid: str, n: int) -> None:
    import cProfile
    import pstats
    st = Store(root)
    for i in range(30):
        st.create_volume(f"warm{i}", tid)
        st.remove_volume(f"warm{i}")
    stmts: list[str] = []
    st.registry._conn().set_trace_callback(stmts.append)
    st.create_volume("trace", tid)
    st.remove_volume("trace")
    st.registry._conn().set_trace_callback(None)
    writes = sum(1 for s in stmts if s.startswith("BEGIN"))
    print(f"per create+remove: {len(stmts)} SQL statements, {writes} write transactions")
    for s in stmts:
        print("   ", " ".join(s.split())[:110])
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    for i in range(n):
        st.create_volume(f"p{i}", tid)
        st.remove_volume(f"p{i}")
    pr.disable()
    el = time.perf_counter() - t0
    print(f"{n} create+remove under cProfile: {el / n * 1000:.2f} ms each")
    pstats.Stats(pr).sort_stats("tottime").print_stats(18)
    st.close()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, root, tid, mode, seconds, who = sys.argv
        worker(root, tid, mode, float(seconds), who)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", default="1,4", help="process counts (comma-separated)")
    ap.add_argument("--seconds", type=float, default=4.0, help="run time of each measurement")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of all modes, alternating order")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--profile", action="store_true", help="statements per op and a cProfile of 300 ops")
    ap.add_argument("--dir", default=None, help="where the scratch store goes (default: the temp dir)")
    args = ap.parse_args()
    procs = [int(x) for x in args.procs.split(",")]
    modes = args.modes.split(",")
    bu.sigterm_as_interrupt()
    tag = bu.new_tag()
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(bu.workdir(f"{tag}-pool", args.dir))
        st = Store(root, backend="pool")

        def cleanup() -> None:
            with contextlib.suppress(Exception):
                st.destroy()
            st.close()
        stack.callback(cleanup)
        src = os.path.join(st.data_root, "bench-src.img")
        bu.make_template(src, 16 * MiB)
        tid = st.import_template(src, "bench-registry").id
        bu.drop_file(src)
        if args.profile:
            profile(root, tid, 300)
            return
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; cpus: {os.cpu_count()}")
        res: dict[tuple[str, int], list[float]] = {}
        lats: dict[tuple[str, int], list[float]] = {}
        cpus: dict[tuple[str, int], list[float]] = {}
        for r in range(args.rounds):
            order = [(m, p) for p in procs for m in modes]
            for m, p in (order if r % 2 == 0 else list(reversed(order))):
                rate, cpu, lat = run_mode(root, tid, m, p, args.seconds)
                res.setdefault((m, p), []).append(rate)
                cpus.setdefault((m, p), []).append(cpu)
                lats.setdefault((m, p), []).extend(lat)
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"\n== create+remove per second, pool backend, 16 MiB template, {args.seconds:g} s each, "
              f"{args.rounds} rounds alternating (each round's figure, then the best) ==")
        rows = []
        for p in procs:
            for m in modes:
                v = res[(m, p)]
                sm = bu.summary(lats[(m, p)])
                rows.append([f"{p}", m, " / ".join(f"{x:.0f}" for x in v), f"{max(v):.0f}",
                             bu.fmt_ms(sm["median_ms"]), bu.fmt_ms(sm["p99_ms"]), bu.fmt_ms(max(lats[(m, p)]) * 1000),
                             bu.fmt_ms(min(cpus[(m, p)]) * 1000)])
        bu.table(["procs", "mode", "rounds (pairs/s)", "best", "pair med", "p99", "max", "cpu/pair"], rows)


if __name__ == "__main__":
    main()
