#!/usr/bin/env python3
"""Volumes over a lazy template against volumes over a local template (issue 25 item 3),
in the kernel lab (nbd and device-mapper).

    python3 lab/kernel_lab.py run --timeout 900 -- python3 bench/lazy_volume.py [--rounds 10]

For dm-thin and dm-snapshot, one store with two ext4 templates of the same size built from
different trees: one imported (local), one lazy, whose cache holds every chunk (made
without an object store by tests/remoteutil.offline_lazy: the lab has none; the issue's
case "a volume over a lazy template whose manifest is cached"). Times, in this process:

1. the first create over each: local dm-thin fills the template's thin; lazy starts
   nothing (its nbdkit was started by the pull) but connects the nbd device;
2. ``--rounds`` more creates over each, one after another (the template's nbd device is
   shared: no connect), and their removes;
3. 4 KiB random reads of the first volume over each (fio: O_DIRECT, psync, 4 jobs,
   ``--read-seconds`` each, ``--read-rounds`` alternating rounds): on dm-snapshot the local
   volume reads through its origin, a loop device over the template's file, and the lazy
   one through the nbd device its nbdkit serves from the full cache: the issue's "4k
   random reads through the lazy device with a full cache, at least 0.5x of the same
   reads on a local loop file". On dm-thin the local volume reads the pool's data (a loop
   device over the pool's file) and the lazy one its external origin, the same nbd device.

Goal (the issue): a create over a lazy template within 1.5x of a local create (the local
create is the reference here; bench/fork.py and bench/kernel_ops.py put the local create
against the kernel's own steps). Medians; every figure of a row comes from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from benchutil import ROOT, MiB, in_lab, new_tag, table, workdir

sys.path.insert(0, str(ROOT / "tests"))

from cowdisk.store import Store  # noqa: E402
from remoteutil import offline_lazy  # noqa: E402


def image(d: str, name: str, size: int) -> str:
    """An ext4 image of ``size`` bytes: a small tree with 2 MiB of random payload."""
    tree = os.path.join(d, f"{name}-tree")
    os.makedirs(os.path.join(tree, "etc"))
    with open(os.path.join(tree, "etc", "hostname"), "w") as f:
        f.write(f"{name}\n")
    with open(os.path.join(tree, "payload.bin"), "wb") as f:
        f.write(os.urandom(2 * MiB))
    img = os.path.join(d, f"{name}.img")
    with open(img, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", tree, img], check=True, capture_output=True)
    return img


def ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:.1f}"


def randread_iops(dev: str, seconds: float) -> float:
    """IOPS of 4 KiB random O_DIRECT reads of ``dev`` (fio, psync, 4 jobs)."""
    out = subprocess.run(["fio", "--name=r", f"--filename={dev}", "--rw=randread", "--bs=4k", "--direct=1",
                          "--ioengine=psync", "--numjobs=4", "--group_reporting", f"--runtime={seconds}",
                          "--time_based", "--readonly", "--output-format=json"],
                         check=True, capture_output=True, text=True).stdout
    return float(json.loads(out)["jobs"][0]["read"]["iops"])


def device_floor(d: str, cache: str, tag: str, seconds: float, rounds: int) -> list[list[str]]:
    """The same 4 KiB random reads of one set of bytes (the lazy template's cache, every
    chunk held) by three raw devices, alternating: the lazy template's own server through a
    new /dev/nbdN (its Python plugin), nbdkit's C ``file`` plugin over the cache's data file
    through another (the NBD floor), and a loop device over that data file (the kernel's
    floor). Each device is held open by this process while fio runs (an nbd device here
    disconnects at its last close)."""
    from cowdisk.kernel import loop, nbd
    from cowdisk.remote import lazy

    data = os.path.join(cache, "data")
    sock = os.path.join(d, "floor.sock")
    server = subprocess.Popen(["nbdkit", "--foreground", "--unix", sock, "--readonly", "--threads", "16", "file", data],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    held: list[int] = []
    lo = None
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"nbdkit file {data} did not start")
            time.sleep(0.02)
        devs = {}
        for name, srv in (("nbd: the lazy server (Python plugin)", lazy.socket_path(cache)),
                          ("nbd: nbdkit file plugin on the data file (NBD floor)", sock)):
            dev = nbd.connect(srv, f"{tag}:{len(devs)}")
            held.append(os.open(dev.path, os.O_RDONLY))
            devs[name] = dev.path
        lo = loop.attach(data, read_only=True, label=tag)
        devs["loop on the data file (kernel floor)"] = lo.path
        iops: dict[str, list[float]] = {k: [] for k in devs}
        for _ in range(rounds):
            for name, path in devs.items():
                iops[name].append(randread_iops(path, seconds))
        kernel = statistics.median(iops["loop on the data file (kernel floor)"])
        return [[name, f"{statistics.median(v):.0f}", f"{statistics.median(v) / kernel:.2f}x"] for name, v in iops.items()]
    finally:
        if lo is not None:
            lo.close()
        for fd in held:
            os.close(fd)
        server.terminate()
        server.wait(30)


def bench(backend: str, rounds: int, size: int, read_s: float, read_rounds: int,
          reads: list[list[str]], floors: list[list[str]]) -> list[list[str]]:
    with workdir(new_tag(), os.environ.get("TMPDIR")) as d:
        s = Store(os.path.join(d, "store"), backend=backend)
        made: list[str] = []
        try:
            s.import_template(image(d, "local", size), "local")
            url, _ = offline_lazy(s, image(d, "lazy", size), chunk_size=512 << 10)
            served = s.lazy_template(url, "lazy")
            first, later, removes = {}, {}, {}
            for name in ("local", "lazy"):
                t0 = time.perf_counter()
                s.create_volume(f"{name}-0", name)
                first[name] = time.perf_counter() - t0
                made.append(f"{name}-0")
                later[name], removes[name] = [], []
                for i in range(1, rounds + 1):
                    t0 = time.perf_counter()
                    s.create_volume(f"{name}-{i}", name)
                    later[name].append(time.perf_counter() - t0)
                    made.append(f"{name}-{i}")
                for i in range(1, rounds + 1):
                    t0 = time.perf_counter()
                    s.remove_volume(f"{name}-{i}")
                    removes[name].append(time.perf_counter() - t0)
                    made.remove(f"{name}-{i}")
            if read_s > 0:  # the first volume over each, alternating so that load hits both alike
                iops: dict[str, list[float]] = {"local": [], "lazy": []}
                for _ in range(read_rounds):
                    for name in ("local", "lazy"):
                        iops[name].append(randread_iops(str(s.volume(f"{name}-0").device), read_s))
                lo, la = statistics.median(iops["local"]), statistics.median(iops["lazy"])
                reads.append([backend, f"{lo:.0f}", f"{la:.0f}", f"{la / lo:.2f}x"])
                if backend == "dm-snapshot":  # once: the devices under the volumes, over the same bytes
                    floors.extend(device_floor(d, str(served["cache"]), new_tag(), read_s, read_rounds))
            ratio = statistics.median(later["lazy"]) / statistics.median(later["local"])
            return [[backend, f"{first['local'] * 1000:.1f}", f"{first['lazy'] * 1000:.1f}", ms(later["local"]),
                     ms(later["lazy"]), f"{ratio:.2f}x", ms(removes["local"]), ms(removes["lazy"])]]
        finally:
            for v in made:
                s.remove_volume(v)
            s.destroy()
            s.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--size", type=int, default=32, help="template size in MiB")
    ap.add_argument("--read-seconds", type=float, default=5, help="fio time per read figure (0: no reads)")
    ap.add_argument("--read-rounds", type=int, default=3)
    a = ap.parse_args()
    if not in_lab():
        sys.exit("bench/lazy_volume.py needs nbd and device-mapper: run it in the kernel lab "
                 "(python3 lab/kernel_lab.py run -- python3 bench/lazy_volume.py)")
    rows: list[list[str]] = []
    reads: list[list[str]] = []
    floors: list[list[str]] = []
    for backend in ("dm-thin", "dm-snapshot"):
        rows += bench(backend, a.rounds, a.size * MiB, a.read_seconds, a.read_rounds, reads, floors)
    table(["backend", "first local (ms)", "first lazy (ms)", "create local (ms)", "create lazy (ms)",
           "lazy / local", "remove local (ms)", "remove lazy (ms)"], rows)
    if reads:
        print(f"\n4 KiB random reads of a volume's device (fio O_DIRECT, psync, 4 jobs, {a.read_seconds:g} s, "
              f"median of {a.read_rounds} alternating rounds; goal: lazy at least 0.5x local)")
        table(["backend", "local (IOPS)", "lazy, full cache (IOPS)", "lazy / local"], reads)
    if floors:
        print("\nthe same reads of the lazy template's bytes by the devices under the volumes")
        table(["device", "IOPS", "/ kernel floor"], floors)


if __name__ == "__main__":
    main()
