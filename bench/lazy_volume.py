#!/usr/bin/env python3
"""Volumes over a lazy template against volumes over a local template (issue 25 item 3),
in the kernel lab (nbd and device-mapper).

    python3 lab/kernel_lab.py run --timeout 900 -- python3 bench/lazy_volume.py [--rounds 10]

For dm-thin and dm-snapshot, one store with two ext4 templates of the same size built from
different trees: one imported (local), one lazy (made without an object store by
tests/remoteutil.offline_lazy: the lab has none; the issue's case "a volume over a lazy
template whose manifest is cached"), whose cache first holds every data chunk but the last.
Three kinds of volumes: over the local template; over the lazy one while its cache lacks
that chunk (origin: the nbd device its nbdkit serves; they keep it); over the lazy one
after the chunk is fetched by the cache's own path (a whole cache: origin, a read-only
loop over the cache's data file, no NBD). Times, in this process:

1. the first create of each kind: local dm-thin fills the template's thin; lazy starts
   nothing (its nbdkit was started by the pull) but connects the nbd device; whole binds
   the loop;
2. ``--rounds`` more creates of each kind, one after another (the template's nbd device or
   loop is shared: found again), and their removes;
3. 4 KiB random reads of the first volume of each kind (fio: O_DIRECT, psync, 4 jobs,
   ``--read-seconds`` each, ``--read-rounds`` alternating rounds), every chunk cached by
   then: on dm-snapshot the local volume reads through its origin, a loop device over the
   template's file, and the lazy ones through the nbd device or the loop over the cache's
   data file: the issue's "4k random reads through the lazy device with a full cache, at
   least 0.5x of the same reads on a local loop file". On dm-thin the local volume reads
   the pool's data (a loop device over the pool's file) and the lazy ones their external
   origin, the same nbd device or loop.

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
from remoteutil import chunked, offline_lazy  # noqa: E402


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


KINDS = ("local", "lazy", "whole")
LABEL = {"local": "local template", "lazy": "lazy, nbd origin", "whole": "lazy, whole cache: loop origin"}


def bench(backend: str, rounds: int, size: int, read_s: float, read_rounds: int,
          reads: list[list[str]], floors: list[list[str]]) -> list[list[str]]:
    """One store on ``backend``: volumes over the local template; over the lazy one while its
    cache lacks one chunk (their origin is the nbd device, and stays so: a volume keeps the
    device it was attached with); then, the chunk fetched, over the lazy one again (a whole
    cache: their origin is a loop over the cache's data file)."""
    from cowdisk.remote.cache import ChunkCache

    with workdir(new_tag(), os.environ.get("TMPDIR")) as d:
        s = Store(os.path.join(d, "store"), backend=backend)
        made: list[str] = []
        try:
            s.import_template(image(d, "local", size), "local")
            lazy_img = image(d, "lazy", size)
            m, blobs = chunked(lazy_img, 512 << 10)
            last = max(i for i, c in enumerate(m.chunks) if c is not None)
            url, _ = offline_lazy(s, lazy_img, chunk_size=512 << 10, hold=set(range(len(m.chunks))) - {last})
            served = s.lazy_template(url, "lazy")
            first, later, removes = {}, {}, {}
            for name in KINDS:
                if name == "whole":  # the last chunk fetched (checked, written, synced, recorded): the cache is whole
                    c = ChunkCache(str(served["cache"]), m, lambda key: blobs[key], where=str)
                    try:
                        c.ensure(last)
                    finally:
                        c.close()
                tpl = "local" if name == "local" else "lazy"
                t0 = time.perf_counter()
                s.create_volume(f"{name}-0", tpl)
                first[name] = time.perf_counter() - t0
                made.append(f"{name}-0")
                later[name], removes[name] = [], []
                for i in range(1, rounds + 1):
                    t0 = time.perf_counter()
                    s.create_volume(f"{name}-{i}", tpl)
                    later[name].append(time.perf_counter() - t0)
                    made.append(f"{name}-{i}")
                for i in range(1, rounds + 1):
                    t0 = time.perf_counter()
                    s.remove_volume(f"{name}-{i}")
                    removes[name].append(time.perf_counter() - t0)
                    made.remove(f"{name}-{i}")
            if read_s > 0:  # the first volume over each, alternating so that load hits all alike
                iops: dict[str, list[float]] = {k: [] for k in KINDS}
                for _ in range(read_rounds):
                    for name in KINDS:
                        iops[name].append(randread_iops(str(s.volume(f"{name}-0").device), read_s))
                med = {k: statistics.median(v) for k, v in iops.items()}
                reads.append([backend, f"{med['local']:.0f}", f"{med['lazy']:.0f}", f"{med['lazy'] / med['local']:.2f}x",
                              f"{med['whole']:.0f}", f"{med['whole'] / med['local']:.2f}x"])
                if backend == "dm-snapshot":  # once: the devices under the volumes, over the same bytes
                    floors.extend(device_floor(d, str(served["cache"]), new_tag(), read_s, read_rounds))
            local = statistics.median(later["local"])
            return [[backend, LABEL[k], f"{first[k] * 1000:.1f}", ms(later[k]),
                     f"{statistics.median(later[k]) / local:.2f}x", ms(removes[k])] for k in KINDS]
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
    table(["backend", "template", "first create (ms)", "create (ms)", "/ local", "remove (ms)"], rows)
    if reads:
        print(f"\n4 KiB random reads of a volume's device (fio O_DIRECT, psync, 4 jobs, {a.read_seconds:g} s, "
              f"median of {a.read_rounds} alternating rounds; every chunk cached; goal: lazy at least 0.5x local)")
        table(["backend", "local (IOPS)", "lazy, nbd origin (IOPS)", "/ local", "lazy, loop origin (IOPS)", "/ local"],
              reads)
    if floors:
        print("\nthe same reads of the lazy template's bytes by the devices under the volumes")
        table(["device", "IOPS", "/ kernel floor"], floors)


if __name__ == "__main__":
    main()
