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
   shared: no connect), and their removes.

Goal (the issue): a create over a lazy template within 1.5x of a local create (the local
create is the reference here; bench/fork.py and bench/kernel_ops.py put the local create
against the kernel's own steps). Medians; every figure of a row comes from the same run.
"""

from __future__ import annotations

import argparse
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


def bench(backend: str, rounds: int, size: int) -> list[list[str]]:
    with workdir(new_tag(), os.environ.get("TMPDIR")) as d:
        s = Store(os.path.join(d, "store"), backend=backend)
        made: list[str] = []
        try:
            s.import_template(image(d, "local", size), "local")
            url, _ = offline_lazy(s, image(d, "lazy", size), chunk_size=512 << 10)
            s.lazy_template(url, "lazy")
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
    a = ap.parse_args()
    if not in_lab():
        sys.exit("bench/lazy_volume.py needs nbd and device-mapper: run it in the kernel lab "
                 "(python3 lab/kernel_lab.py run -- python3 bench/lazy_volume.py)")
    rows = []
    for backend in ("dm-thin", "dm-snapshot"):
        rows += bench(backend, a.rounds, a.size * MiB)
    table(["backend", "first local (ms)", "first lazy (ms)", "create local (ms)", "create lazy (ms)",
           "lazy / local", "remove local (ms)", "remove lazy (ms)"], rows)


if __name__ == "__main__":
    main()
