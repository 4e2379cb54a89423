"""What a command line call costs before it does any work (issue 22, item 4): whole-process
wall and CPU time of ``cowdisk --version`` and ``cowdisk volume ls`` (on a store opened
directly, and through a cowdiskd serving it, as the systemd unit sets it up) side by side
with a bare ``python3 -c pass`` and an ``import cowdisk.client`` (the part of ``volume ls``
through a daemon that is the client's) on the same machine, in alternating rounds so load hits every side
alike; then the ``-X importtime`` top offenders of each command (cumulative time of the
modules it imports, and which cowdisk modules are among them). ``volume ls`` and ``template ls``
through a daemon run without click (cli/light.py); the ``-v`` row is the same call through click.

    python3 bench/startup.py [--runs 20] [--top 12] [--json FILE] [--client-before SRC] [--client-only]

The goal: each command within 2x of ``python3 -c pass``. The ``-S`` rows show the same against the
interpreter with no ``site`` (no .pth file of this machine runs): the floor a machine whose
site-packages carry heavy .pth hooks hides. Run as root (it makes a copy-backend
store with one template and 20 volumes and a daemon on a socket, all under a temp dir named
``cdbench-<random>``, removed at the end).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
SRC = str(ROOT / "src")
ENV = {k: v for k, v in os.environ.items() if not k.startswith("COWDISK_") and k != "PYTHONDONTWRITEBYTECODE"} | {
    "PYTHONPATH": SRC}
"""As an installed cowdisk runs: with its bytecode cached (pip compiles it). A shell that sets
PYTHONDONTWRITEBYTECODE would have every cowdisk module compiled from source at every
start; scratch() points PYTHONPYCACHEPREFIX into its temp dir instead (the warm-up run
fills it, the tree stays clean)."""


NOSITE_PATH = os.pathsep.join([SRC, *(p for p in sys.path if p.endswith("-packages"))])
"""For ``python3 -S``: the site-packages directories on the path by hand, their .pth files unread."""


def cowdisk(*args: str) -> list[str]:
    return [sys.executable, "-m", "cowdisk", *args]


def wall(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of one run of ``argv``. CPU time moves
    less than wall time when other work shares the machine."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert p.stderr is not None
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: exit {p.returncode}: {err.decode()}")
    return dt, ru.ru_utime + ru.ru_stime


def importtime(argv: list[str], env: dict[str, str]) -> list[tuple[str, int, int]]:
    """(module, self us, cumulative us) for every module ``argv`` imports."""
    p = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, check=True)
    out = []
    for line in p.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if m:
            out.append((m[4], int(m[1]), int(m[2])))
    return out


@contextlib.contextmanager
def scratch() -> Iterator[tuple[str, str]]:
    """A copy-backend store with template base and 20 volumes, and a daemon serving it:
    (root, socket). Both removed at the end."""
    work = tempfile.mkdtemp(prefix="cdbench-")
    root, sock = os.path.join(work, "store"), os.path.join(work, "cowdisk.sock")
    ENV["PYTHONPYCACHEPREFIX"] = os.path.join(work, "pycache")
    daemon = None
    try:
        image = os.path.join(work, "base.img")
        with open(image, "wb") as f:
            f.truncate(4 << 20)
        subprocess.run(cowdisk("--root", root, "--backend", "copy", "-q", "template", "import", image, "--name",
                               "base"), env=ENV, check=True, stdout=subprocess.DEVNULL)
        for i in range(20):
            subprocess.run(cowdisk("--root", root, "-q", "volume", "create", f"vm{i}", "-t", "base"), env=ENV,
                           check=True, stdout=subprocess.DEVNULL)
        daemon = subprocess.Popen(cowdisk("--root", root, "serve", "--socket", sock, "--config", os.devnull,
                                          "--processes", "1", "--log-level", "error"), env=ENV,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the daemon did not start")
            time.sleep(0.05)
        yield root, sock
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
        if os.path.exists(os.path.join(root, "registry.db")):
            subprocess.run(cowdisk("--root", root, "-q", "store", "destroy", "--yes", "--force"), env=ENV,
                           stdout=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)


def client_import(runs: int, srcs: dict[str, str]) -> dict[str, dict[str, float]]:
    """``import cowdisk.client`` per source tree (``srcs``: label -> a src directory): its
    ``-X importtime`` cumulative time (median, min of ``runs``, alternating trees) and the
    whole process's wall time against ``python3 -c pass`` (medians)."""
    imp: dict[str, list[float]] = {k: [] for k in srcs}
    whole: dict[str, list[tuple[float, float]]] = {k: [] for k in srcs}
    bare: list[tuple[float, float]] = []
    for _ in range(runs):
        bare.append(wall([sys.executable, "-c", "pass"], ENV))
        for label, src in srcs.items():
            env = ENV | {"PYTHONPATH": src}
            mods = importtime([sys.executable, "-c", "import cowdisk.client"], env)
            imp[label].append(next(c for m, _, c in mods if m == "cowdisk.client") / 1000)
            whole[label].append(wall([sys.executable, "-c", "import cowdisk.client"], env))
    base, base_cpu = statistics.median(w for w, _ in bare), statistics.median(c for _, c in bare)
    print(f"\nimport cowdisk.client, {runs} runs each, alternating (-X importtime cumulative of cowdisk.client: "
          f"median, min, max; the whole process: wall and CPU medians; python3 -c pass: wall {base * 1000:.1f} ms, "
          f"cpu {base_cpu * 1000:.1f} ms):")
    out = {}
    for label, ts in imp.items():
        w = statistics.median(x for x, _ in whole[label])
        c = statistics.median(y for _, y in whole[label])
        mods = [m for m, _, _ in importtime([sys.executable, "-c", "import cowdisk.client"],
                                             ENV | {"PYTHONPATH": srcs[label]})]
        print(f"  {label:8s} import {statistics.median(ts):6.1f} ms (min {min(ts):5.1f}, max {max(ts):5.1f}), "
              f"{len(mods)} modules ({len([m for m in mods if m.startswith('cowdisk')])} of cowdisk); "
              f"process wall {w * 1000:6.1f} ms = {w / base:4.2f}x, cpu {c * 1000:5.1f} ms = {c / base_cpu:4.2f}x "
              "python3 -c pass")
        out[label] = {"import_ms": statistics.median(ts), "import_min_ms": min(ts), "modules": len(mods),
                      "process_ms": w * 1000, "ratio": w / base, "cpu_ms": c * 1000, "ratio_cpu": c / base_cpu}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--client-before", metavar="SRC",
                    help="Also time `import cowdisk.client` from this src directory (e.g. `git archive` of an older "
                         "commit's src/), beside this checkout's")
    ap.add_argument("--client-only", action="store_true", help="Only the client import (no store, no daemon)")
    a = ap.parse_args()
    if a.client_only:
        srcs = {"this": SRC} | ({"before": os.path.abspath(a.client_before)} if a.client_before else {})
        client_import(a.runs, srcs)
        return 0
    with scratch() as (root, sock):
        daemon_env = ENV | {"COWDISK_SOCKET": sock}
        direct_env = ENV | {"COWDISK_SOCKET": os.path.join(os.path.dirname(sock), "none.sock")}
        cases = {
            "python3 -c pass": ([sys.executable, "-c", "pass"], ENV),
            "import cowdisk.client": ([sys.executable, "-c", "import cowdisk.client"], ENV),
            "cowdisk --version": (cowdisk("--version"), ENV),
            "cowdisk volume ls (daemon)": (cowdisk("--root", root, "volume", "ls"), daemon_env),
            "cowdisk volume ls -o -q --filter (daemon)": (cowdisk("--root", root, "volume", "ls", "-o", "id,state",
                                                                 "--filter", "state=attached", "--no-headings"),
                                                         daemon_env),
            "cowdisk template ls (daemon)": (cowdisk("--root", root, "template", "ls"), daemon_env),
            # the same call through click (-v leaves the light path): what cli/light.py saves
            "cowdisk -v volume ls (daemon, click)": (cowdisk("--root", root, "-v", "volume", "ls"), daemon_env),
            "cowdisk volume ls (direct)": (cowdisk("--root", root, "volume", "ls"), direct_env),
            # the interpreter's own floor: no site module, so no .pth file of this machine runs
            # (a sandbox's certifi hook costs ~20 ms here on both sides of the ratios above)
            "python3 -S -c pass": ([sys.executable, "-S", "-c", "pass"], ENV | {"PYTHONPATH": NOSITE_PATH}),
            "cowdisk volume ls (daemon, -S)": ([sys.executable, "-S", "-m", "cowdisk", "--root", root, "volume", "ls"],
                                               ENV | {"PYTHONPATH": NOSITE_PATH, "COWDISK_SOCKET": sock}),
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        cpu: dict[str, list[float]] = {k: [] for k in cases}
        for argv, env in cases.values():  # warm the page cache and .pyc files
            wall(argv, env)
        for _ in range(a.runs):
            for name, (argv, env) in cases.items():
                w, c = wall(argv, env)
                times[name].append(w)
                cpu[name].append(c)
        def floor(name: str) -> str:  # the -S rows are measured against python3 -S -c pass
            return "python3 -S -c pass" if "-S" in name else "python3 -c pass"

        print(f"whole process, {a.runs} runs each, alternating: wall time (median, min, max) and CPU time (user + "
              "system, median); ratios to python3 -c pass (-S rows: to python3 -S -c pass) of the wall medians, the wall minimums and the CPU "
              "medians (the last two moved least by other load):")
        result: dict[str, object] = {"runs": a.runs, "cases": {}}
        for name, ts in times.items():
            med, cmed = statistics.median(ts), statistics.median(cpu[name])
            base, base_min = statistics.median(times[floor(name)]), min(times[floor(name)])
            base_cpu = statistics.median(cpu[floor(name)])
            print(f"  {name:41s} wall {med * 1000:7.1f} ms (min {min(ts) * 1000:6.1f}, max {max(ts) * 1000:6.1f}), "
                  f"cpu {cmed * 1000:6.1f} ms   {med / base:4.2f}x, min {min(ts) / base_min:4.2f}x, "
                  f"cpu {cmed / base_cpu:4.2f}x")
            result["cases"][name] = {"median_ms": med * 1000, "min_ms": min(ts) * 1000,  # type: ignore[index]
                                     "max_ms": max(ts) * 1000, "cpu_ms": cmed * 1000, "ratio": med / base,
                                     "ratio_min": min(ts) / base_min, "ratio_cpu": cmed / base_cpu}
        for name, (argv, env) in cases.items():
            if not name.startswith("cowdisk") or "-S" in name:
                continue
            mods = importtime(argv, env)
            total = sum(s for _, s, _ in mods)
            ours = [m for m, _, _ in mods if m.startswith("cowdisk")]
            print(f"\n{name}: {len(mods)} modules imported, {total / 1000:.1f} ms (-X importtime, self times "
                  f"summed); cowdisk modules: {', '.join(ours)}")
            print(f"  top {a.top} by cumulative time:")
            for m, s, c in sorted(mods, key=lambda x: -x[2])[:a.top]:
                print(f"    {c / 1000:7.1f} ms  {m}  (self {s / 1000:.1f})")
            result["cases"][name]["modules"] = len(mods)  # type: ignore[index]
            result["cases"][name]["cowdisk_modules"] = ours  # type: ignore[index]
        # inside the scratch: its PYTHONPYCACHEPREFIX points into the scratch dir (removed with it)
        srcs = {"this": SRC} | ({"before": os.path.abspath(a.client_before)} if a.client_before else {})
        result["client_import"] = client_import(a.runs, srcs)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
