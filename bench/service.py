#!/usr/bin/env python3
"""cowdiskd against the other ways of making a volume, in the same run.

    python3 bench/service.py                        # host: pool and reflink-xfs
    python3 lab/kernel_lab.py run --timeout 1500 -- python3 bench/service.py   # lab: dm-snapshot

For each backend a store, a template built from a small tree, and a daemon process
(``python -m cowdisk serve``, default settings: JSON log lines at info) on a socket in
the bench's work dir. Then, alternating iteration by iteration, create + remove of one
volume:

(a) ``lib``   in-process ``Store.create_volume`` + ``remove_volume`` (the same store);
(b) ``client`` ``cowdisk.client.Client`` over the socket (one keep-alive connection);
(c) ``curl``  ``curl --unix-socket`` as processes (one POST, one DELETE);
(d) ``cp``    the seed way as processes: ``cp --reflink=always`` + ``rm`` (file backends,
              in the same filesystem), or losetup/dmsetup (dm-snapshot, bench/benchutil.SeedDm);
(e) ``cli``   ``python3 -m cowdisk volume create`` + ``volume rm`` as processes
              (every ``--cli-every``-th iteration: each is about a second);
and, for the file backends, the floor: ``kernel`` (FICLONE + unlink in this process, the
kernel's own work with no bookkeeping) and ``kernel+3 fdatasync`` (plus the three
fdatasyncs a durable create+remove needs at least: docs/architecture.md).

Then: the create alone of (a) and (b) (what the API adds), and of a Go caller
(``bench/go``: net/http over the socket, its own timing; the platforms the daemon is
for are written in Go and Rust), create+remove operations per second of 1 client process
against 8 client processes on 8 different volumes (each a fixed number of cycles;
``--rounds`` alternating rounds, the median of each round's ratio: the host's speed drifts
between minutes), and the daemon's RSS with ``--volumes`` volumes attached (listing them
and scraping /metrics timed too). Goals (issue 12): the API adds at most
0.5 ms median to a library create; (b) at least 3x faster than (d); 8 clients at least
1.5x the operations per second of one, no errors; RSS under 100 MiB at 1000 volumes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

from benchutil import (GiB, MiB, SeedDm, fmt_ms, in_lab, new_tag, scratch_fs, sigterm_as_interrupt, summary,
                       table, workdir)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src")

from cowdisk.client import Client  # noqa: E402
from cowdisk.store import Store  # noqa: E402


def env() -> dict[str, str]:
    e = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "NO_COLOR": "1"}
    for k in ("COWDISK_ROOT", "COWDISK_SOCKET", "COWDISK_CONFIG", "NOTIFY_SOCKET"):
        e.pop(k, None)
    return e


def make_tree(d: str) -> str:
    os.makedirs(os.path.join(d, "etc"), exist_ok=True)
    with open(os.path.join(d, "etc", "hostname"), "w") as f:
        f.write("bench\n")
    with open(os.path.join(d, "payload.bin"), "wb") as f:
        f.write(os.urandom(4 * MiB))
    return d


@contextlib.contextmanager
def daemon(root: str, sock: str, backend: str, log: str, processes: int | None,
           workers: int | None = None, start_s: float = 60.0) -> Iterator[subprocess.Popen[bytes]]:
    extra = [] if processes is None else ["--processes", str(processes)]
    extra += [] if workers is None else ["--workers", str(workers)]
    with open(log, "ab") as lf:
        p = subprocess.Popen([sys.executable, "-m", "cowdisk", "--root", root, "--backend", backend, "serve",
                              "--socket", sock, "--config", os.devnull, *extra], stdout=lf, stderr=lf,
                             stdin=subprocess.DEVNULL, env=env())
    try:
        c = Client(sock)
        end = time.monotonic() + start_s
        while not (os.path.exists(sock) and c.answers()):
            if p.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"daemon did not start: {open(log).read()[-2000:]}")
            time.sleep(0.05)
        yield p
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class GoClient:
    """bench/go (net/http over the socket, one keep-alive connection) as a process that
    takes one request per line and answers with its status and the microseconds it took."""

    def __init__(self, binary: str, sock: str) -> None:
        self.p = subprocess.Popen([binary, sock], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  bufsize=1)
        self.call("health", 200)  # the connection, made once

    def call(self, line: str, status: int) -> float:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        got = self.p.stdout.readline().split()
        if len(got) != 2 or got[0] != str(status):
            raise RuntimeError(f"bench/go: {line}: {' '.join(got) or 'no answer'}")
        return int(got[1]) / 1e6

    def close(self) -> None:
        assert self.p.stdin is not None
        self.p.stdin.close()
        self.p.wait(30)


@contextlib.contextmanager
def go_client(base: str, sock: str) -> Iterator[GoClient | None]:
    """bench/go built in the work dir (standard library only, nothing fetched); None
    without a Go toolchain (install.sh installs golang-go)."""
    go = shutil.which("go")
    if go is None:
        print("go missing: no Go caller figures (install.sh installs golang-go)", file=sys.stderr)
        yield None
        return
    home = os.path.join(base, "gohome")
    binary = os.path.join(base, "cowdisk-bench-go")
    if not os.path.exists(binary):
        subprocess.run([go, "build", "-o", binary, "."], cwd=os.path.join(ROOT, "bench", "go"), check=True,
                       env={**env(), "HOME": home, "GOCACHE": os.path.join(home, "cache"),
                            "GOPATH": os.path.join(home, "gopath"), "GOFLAGS": "-mod=mod", "GO111MODULE": "on",
                            "GOTOOLCHAIN": "local", "GOPROXY": "off"})
    g = GoClient(binary, sock)
    try:
        yield g
    finally:
        g.close()


def curl(sock: str, method: str, path: str, body: str | None = None) -> None:
    argv = ["curl", "-sS", "--fail", "-o", "/dev/null", "--unix-socket", sock, "-X", method, f"http://cowdisk{path}"]
    if body is not None:
        argv += ["-H", "Content-Type: application/json", "-d", body]
    subprocess.run(argv, check=True)


def rss_kib(pid: int) -> tuple[int, int]:
    vals = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                vals[k] = int(v.split()[0])
    return vals["VmRSS"], vals["VmHWM"]


def pss_kib(pid: int) -> int:
    """Proportional set size: shared pages (a forked worker's, inherited from the daemon)
    counted once across the processes sharing them."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def workers_of(pid: int) -> list[int]:
    """The daemon's store worker processes (its children)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def memory(pid: int) -> dict[str, int]:
    kids = workers_of(pid)
    return {"front_rss_kib": rss_kib(pid)[0], "workers": len(kids),
            "workers_rss_kib": sum(rss_kib(k)[0] for k in kids),
            "pss_kib": pss_kib(pid) + sum(pss_kib(k) for k in kids)}


def _cycles(sock: str, prefix: str, n: int, q: Any) -> None:
    c = Client(sock)
    errors = 0
    t0 = time.perf_counter()
    for i in range(n):
        try:
            c.create_volume(f"{prefix}", "base")
            c.remove_volume(f"{prefix}")
        except Exception:  # noqa: BLE001 - counted, reported
            errors += 1
    q.put((time.perf_counter() - t0, errors))


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (every thread), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput(sock: str, clients: int, cycles: int, daemon_pid: int) -> tuple[float, int, float, float]:
    """Create+remove operations per second of ``clients`` processes, each ``cycles`` times on
    its own id, and the CPU use meanwhile (1.0 = one core busy all the time) of the daemon's
    own process and of its store workers together."""
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_cycles, args=(sock, f"tp{clients}-{n}", cycles, q)) for n in range(clients)]
    kids = workers_of(daemon_pid)
    t0 = time.perf_counter()
    c0, w0 = cpu_s(daemon_pid), sum(cpu_s(k) for k in kids)
    for p in procs:
        p.start()
    results = [q.get(timeout=600) for _ in procs]
    wall = time.perf_counter() - t0
    front = (cpu_s(daemon_pid) - c0) / wall
    workers = (sum(cpu_s(k) for k in kids) - w0) / wall
    for p in procs:
        p.join()
    return clients * cycles / wall, sum(e for _, e in results), front, workers


def log_ms(log: str, op: str, prefix: str) -> tuple[list[float], list[float]]:
    """From the daemon's JSON log: ``duration_ms`` and ``store_ms`` of the ``op`` lines whose
    object starts with ``prefix``."""
    whole, inside = [], []
    with open(log) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("op") == op and str(r.get("object", "")).startswith(prefix) and r.get("result") == "ok":
                whole.append(r["duration_ms"] / 1e3)
                inside.append(r.get("store_ms", r["duration_ms"]) / 1e3)
    return whole, inside


def bench_backend(name: str, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(workdir(tag))
        if name == "reflink-xfs":
            root = os.path.join(stack.enter_context(scratch_fs("xfs", 8 * GiB, tag, base=base)), "store")
            backend = "reflink"
        else:
            root = os.path.join(base, "store")
            backend = name
        sock = os.path.join(base, "d.sock")
        store = Store(root, backend=backend)
        stack.callback(store.close)
        stack.callback(lambda: Store(root).destroy())
        tree = make_tree(os.path.join(root, "incoming", "tree"))
        t = store.build_template(tree, "base")
        log = os.path.join(base, "daemon.log")
        p = stack.enter_context(daemon(root, sock, backend, log, args.processes, args.workers))
        c = Client(sock)
        seed: Callable[[int], None]
        if name == "dm-snapshot":
            sd = SeedDm(t.path, base, tag)
            sd.open()
            stack.callback(sd.close)

            def seed(i: int) -> None:
                sd.create(f"{tag}-d{i}")
                sd.remove(f"{tag}-d{i}")
        else:
            dst_dir = os.path.join(store.data_root, "volumes")

            def seed(i: int) -> None:
                dst = os.path.join(dst_dir, f"seed-{i}.img")
                subprocess.run(["cp", "--reflink=always", t.path, dst], check=True)
                subprocess.run(["rm", "-f", dst], check=True)

        floor: dict[str, Callable[[int], None]] = {}
        if name != "dm-snapshot":
            from cowdisk.kernel import fs as kfs
            sync_path = os.path.join(store.data_root, "bench-sync")
            sync_fd = os.open(sync_path, os.O_WRONLY | os.O_CREAT, 0o600)
            stack.callback(os.unlink, sync_path)
            stack.callback(os.close, sync_fd)

            def kernel(i: int) -> None:
                dst = os.path.join(dst_dir, f"floor-{i}.img")
                kfs.ficlone(t.path, dst)
                os.unlink(dst)

            def kernel_sync(i: int) -> None:
                kernel(i)
                for _ in range(3):  # what a durable create+remove needs at least (see docs/architecture.md)
                    os.pwrite(sync_fd, b"x", 0)
                    os.fdatasync(sync_fd)

            floor = {"kernel": kernel, "kernel+3 fdatasync": kernel_sync}

        ways: dict[str, Callable[[int], None]] = {
            **floor,
            "lib": lambda i: (store.create_volume(f"a{i}", "base"), store.remove_volume(f"a{i}")),
            "client": lambda i: (c.create_volume(f"b{i}", "base"), c.remove_volume(f"b{i}")),
            "curl": lambda i: (curl(sock, "POST", "/v1/volumes", json.dumps({"id": f"c{i}", "template": "base"})),
                               curl(sock, "DELETE", f"/v1/volumes/c{i}")),
            "cp" if name != "dm-snapshot" else "losetup+dmsetup": seed,
            "cli": lambda i: (subprocess.run([sys.executable, "-m", "cowdisk", "--root", root, "volume", "create",
                                              f"e{i}", "--template", "base"], check=True, env=env(),
                                             capture_output=True),
                              subprocess.run([sys.executable, "-m", "cowdisk", "--root", root, "volume", "rm",
                                              f"e{i}"], check=True, env=env(), capture_output=True)),
        }
        samples: dict[str, list[float]] = {k: [] for k in ways}
        creates: dict[str, list[float]] = {"lib": [], "client": [], "health": [], "go": [], "go health": []}
        goc = stack.enter_context(go_client(base, sock))
        for i in range(args.iterations):
            for k, fn in ways.items():
                if k == "cli" and i % args.cli_every:
                    continue
                t0 = time.perf_counter()
                fn(i)
                samples[k].append(time.perf_counter() - t0)
            # the create alone, alternating
            for k, mk, rm in (("lib", store.create_volume, store.remove_volume),
                              ("client", c.create_volume, c.remove_volume)):
                t0 = time.perf_counter()
                mk(f"x{k}{i}", "base")
                creates[k].append(time.perf_counter() - t0)
                rm(f"x{k}{i}")
            t0 = time.perf_counter()
            c.health()  # the stack's own round trip: socket, HTTP, routing, JSON
            creates["health"].append(time.perf_counter() - t0)
            if goc is not None:  # a Go caller (net/http), its own timing
                creates["go"].append(goc.call(f"create xgo{i} base", 201))
                goc.call(f"remove xgo{i}", 200)
                creates["go health"].append(goc.call("health", 200))
        whole, inside = log_ms(log, "create", "xclient")
        creates["daemon"], creates["store"] = whole, inside
        out: dict[str, Any] = {"backend": name, "ways": {k: summary(v) for k, v in samples.items()},
                               "create": {k: summary(v) for k, v in creates.items() if v}}
        # 1 client and N clients in alternating rounds: the ratio of each round, side by side
        rounds = [(throughput(sock, 1, args.cycles, p.pid), throughput(sock, args.clients, args.cycles, p.pid))
                  for _ in range(args.rounds)]
        ones, manys = [o for o, _ in rounds], [m for _, m in rounds]
        med = statistics.median
        out["throughput"] = {"one_ops_s": med(o[0] for o in ones), "many_ops_s": med(m[0] for m in manys),
                             "ratios": [m[0] / o[0] for o, m in rounds], "clients": args.clients,
                             "errors": sum(o[1] + m[1] for o, m in rounds),
                             "daemon_cpu_one": med(o[2] for o in ones), "daemon_cpu_many": med(m[2] for m in manys),
                             "workers_cpu_one": med(o[3] for o in ones), "workers_cpu_many": med(m[3] for m in manys)}
        rss0 = rss_kib(p.pid)
        mem0 = memory(p.pid)
        for i in range(args.volumes):
            c.create_volume(f"r{i}", "base")
        t0 = time.perf_counter()
        n = len(c.volumes())
        list_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        c.metrics()
        metrics_s = time.perf_counter() - t0
        rss1 = rss_kib(p.pid)
        mem1 = memory(p.pid)
        for i in range(args.volumes):
            c.remove_volume(f"r{i}")
        out["rss"] = {"volumes": n, "idle_kib": rss0[0], "at_volumes_kib": rss1[0], "peak_kib": rss1[1],
                      "list_ms": list_s * 1e3, "metrics_ms": metrics_s * 1e3, "idle": mem0, "at_volumes": mem1}
        return out


def report(r: dict[str, Any]) -> None:
    print(f"\n### {r['backend']}: create + remove of one volume")
    lib = r["ways"]["lib"]["median_ms"]
    rows = []
    for k, s in r["ways"].items():
        rows.append([k, str(s["n"]), fmt_ms(s["median_ms"]), fmt_ms(s["p99_ms"]), f"{s['median_ms'] / lib:.1f}x"])
    table(["way", "n", "median", "p99", "vs lib"], rows)
    cl, cc = r["create"]["lib"], r["create"]["client"]
    added = cc["median_ms"] - cl["median_ms"]
    seed = next(v for k, v in r["ways"].items() if k in ("cp", "losetup+dmsetup"))
    tp = r["throughput"]
    rss = r["rss"]
    print(f"create alone: lib {fmt_ms(cl['median_ms'])}, client {fmt_ms(cc['median_ms'])}: "
          f"the API adds {fmt_ms(added)} median (goal <= 0.5 ms: {'ok' if added <= 0.5 else 'MISSED'}); "
          f"a health request (the stack alone) {fmt_ms(r['create']['health']['median_ms'])}")
    if "go" in r["create"]:
        go, gh = r["create"]["go"]["median_ms"], r["create"]["go health"]["median_ms"]
        print(f"  a Go caller (net/http, bench/go): create {fmt_ms(go)}: the API adds {fmt_ms(go - cl['median_ms'])} "
              f"(goal <= 0.5 ms: {'ok' if go - cl['median_ms'] <= 0.5 else 'MISSED'}); a health request "
              f"{fmt_ms(gh)}")
    if "store" in r["create"]:
        st, dm = r["create"]["store"]["median_ms"], r["create"]["daemon"]["median_ms"]
        print(f"  of the client's create: in the store {fmt_ms(st)} ({fmt_ms(st - cl['median_ms'])} vs the library "
              f"in this process), passing it to a store worker {fmt_ms(dm - st)}, HTTP and the client "
              f"{fmt_ms(cc['median_ms'] - dm)}")
    speed = seed["median_ms"] / r["ways"]["client"]["median_ms"]
    print(f"client vs the seed processes: {speed:.1f}x faster (goal >= 3x: {'ok' if speed >= 3 else 'MISSED'})")
    ratio = statistics.median(tp["ratios"])
    print(f"throughput, {len(tp['ratios'])} rounds of 1 client then {tp['clients']}: 1 client "
          f"{tp['one_ops_s']:.0f} create+remove/s, {tp['clients']} clients {tp['many_ops_s']:.0f}/s (medians); "
          f"ratio per round {', '.join(f'{x:.2f}' for x in tp['ratios'])}: median {ratio:.2f}x, "
          f"{tp['errors']} errors (goal >= 1.5x, none: {'ok' if ratio >= 1.5 and not tp['errors'] else 'MISSED'})")
    for n, k in ((1, "one"), (tp["clients"], "many")):
        front, workers = tp[f"daemon_cpu_{k}"], tp[f"workers_cpu_{k}"]
        ops = tp[f"{k}_ops_s"]
        print(f"  {n} client(s): the daemon's own process used {front:.2f} cores, its store workers {workers:.2f} "
              f"({1000 * front / ops:.2f} + {1000 * workers / ops:.2f} ms of CPU per create+remove)")
    m0, m1 = rss["idle"], rss["at_volumes"]
    total = m1["pss_kib"] / 1024
    print(f"daemon memory with {rss['volumes']} volumes: its own process {m1['front_rss_kib'] / 1024:.1f} MiB RSS "
          f"(idle {m0['front_rss_kib'] / 1024:.1f}), {m1['workers']} store workers {m1['workers_rss_kib'] / 1024:.1f} "
          f"MiB RSS together; all of it {total:.1f} MiB PSS (shared pages counted once; idle "
          f"{m0['pss_kib'] / 1024:.1f}) (goal < 100 MiB: {'ok' if total < 100 else 'MISSED'}); listing them "
          f"{fmt_ms(rss['list_ms'])}, /metrics {fmt_ms(rss['metrics_ms'])}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="dm-snapshot" if in_lab() else "pool,reflink-xfs")
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--cli-every", type=int, default=5, help="run the CLI way every N-th iteration")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--cycles", type=int, default=100, help="create+remove cycles per client in the throughput run")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of 1 client and --clients clients")
    ap.add_argument("--volumes", type=int, default=1000, help="volumes attached for the RSS figure")
    ap.add_argument("--processes", type=int, help="the daemon's store workers (default: the daemon's default)")
    ap.add_argument("--workers", type=int, help="store calls at once, over the processes (default: the daemon's)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/service.py needs root (loop devices, mounts)", file=sys.stderr)
        return 2
    if not shutil.which("curl"):
        print("curl missing: run install.sh", file=sys.stderr)
        return 2
    sigterm_as_interrupt()
    tag = new_tag()
    print(f"bench/service.py: {os.cpu_count()} cores, iterations {args.iterations}, CLI every {args.cli_every}, "
          f"{args.clients} clients x {args.cycles} cycles, {args.volumes} volumes for RSS, store workers "
          f"{'default' if args.processes is None else args.processes}, calls at once "
          f"{'default' if args.workers is None else args.workers}")
    results = []
    for b in args.backends.split(","):
        r = bench_backend(b, args, tag)
        results.append(r)
        report(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
