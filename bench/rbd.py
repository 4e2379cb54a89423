#!/usr/bin/env python3
"""The rbd backend against librbd itself and the ``rbd`` tool, in one run on one cluster.

1. create+remove of a volume: the Store (map=none: QEMU opens the image itself; map=fuse:
   a qemu-storage-daemon exports it as a file) vs ``RBD.clone``/``RBD.remove`` raw (the
   floor) vs ``rbd clone`` + ``rbd rm`` as processes (the plain-CLI way).
   Goal: the Store (map=none) adds at most 20 % to the raw librbd clone+remove.
2. restore on another host: a volume checkpointed through store A is restored through
   store B (``restore(vid, adopt=True)``: B adopts it from the cluster, knowing the
   template by digest only, and attaches it; nothing copied) vs copying the checkpointed
   local volume file of the same data (``cp --sparse=always``) to another directory, for
   a 64 MiB and an 8 GiB template. Goal: B's restore costs the same whatever the size
   (within 1.2x).

Starts its own single-node cluster (lab/ceph_cluster.py) unless given ``--conf``/``--pool``
of an existing one (then it works in a namespace of its own, removed at the end).

    python3 bench/rbd.py [--rounds 20] [--conf /etc/ceph/ceph.conf --pool rbd]
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import time

from benchutil import GiB, MiB, ROOT, fmt_ms, make_template, new_tag, sigterm_as_interrupt, summary, table, \
    workdir

sys.path.insert(0, str(ROOT / "lab"))
from ceph_cluster import Cluster  # noqa: E402

from cowdisk.backends.rbd import librbd, template_image, template_snap  # noqa: E402
from cowdisk.store import Store  # noqa: E402


def bench_create_remove(d: str, opts: dict[str, str], rounds: int) -> list[list[str]]:
    rados, rbd = librbd()
    tpl = os.path.join(d, "tpl-64m.img")
    make_template(tpl, 64 * MiB)
    stores = {m: Store(os.path.join(d, f"store-{m}"), backend="rbd", backend_options={**opts, "map": m})
              for m in ("none", "fuse")}
    t = None
    for s in stores.values():
        t = s.import_template(tpl, "base")
    assert t is not None
    keep = stores["none"].create_volume("keep", "base")  # the template image stays in the cluster
    io = stores["none"].backend.ioctx()
    timings: dict[str, list[float]] = {k: [] for k in ("raw", "cli", "none", "fuse")}
    cli = ["rbd", "-c", opts["conf"], "-p", opts["pool"], "--namespace", opts["namespace"]]
    parent = f"{opts['pool']}/{opts['namespace']}/{template_image(t.id)}@{template_snap(t.id)}"
    for i in range(rounds):  # interleaved: the machine's load hits every way alike
        t0 = time.perf_counter()
        rbd.RBD().clone(io, template_image(t.id), template_snap(t.id), io, f"raw-{i}")
        rbd.RBD().remove(io, f"raw-{i}")
        timings["raw"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        subprocess.run(cli[:1] + ["-c", opts["conf"], "clone", parent, f"{opts['pool']}/{opts['namespace']}/cli-{i}"],
                       check=True, capture_output=True)
        subprocess.run(cli + ["rm", "--no-progress", f"cli-{i}"], check=True, capture_output=True)
        timings["cli"].append(time.perf_counter() - t0)
        for m, s in stores.items():
            t0 = time.perf_counter()
            s.create_volume(f"v{i}", "base")
            s.remove_volume(f"v{i}")
            timings[m].append(time.perf_counter() - t0)
    stores["none"].remove_volume(keep.id)
    for s in stores.values():
        s.destroy()
        s.close()
    raw = summary(timings["raw"])["median_ms"]
    rows = []
    for k, label in (("raw", "RBD.clone + RBD.remove (librbd, the floor)"),
                     ("cli", "rbd clone + rbd rm (processes)"),
                     ("none", "Store create+remove, map=none"),
                     ("fuse", "Store create+remove, map=fuse (qemu-storage-daemon)")):
        st = summary(timings[k])
        rows.append([label, fmt_ms(st["median_ms"]), fmt_ms(st["p99_ms"]), f"{st['median_ms'] / raw:.2f}x"])
    return rows


def bench_restore_elsewhere(d: str, opts: dict[str, str], rounds: int) -> list[list[str]]:
    rows = []
    for size, label in ((64 * MiB, "64 MiB"), (8 * GiB, "8 GiB")):
        tpl = os.path.join(d, f"tpl-{label.replace(' ', '')}.img")
        make_template(tpl, size)
        ns = {**opts, "map": "none", "namespace": opts["namespace"] + "-" + label.replace(" ", "")}
        a = Store(os.path.join(d, f"a-{size}"), backend="rbd", backend_options=ns)
        b = Store(os.path.join(d, f"b-{size}"), backend="rbd", backend_options=ns)
        a.import_template(tpl, "base")
        a.create_volume("keep", "base")  # the template's image stays in the cluster between rounds
        attach, copy = [], []
        local = os.path.join(d, "local.img")
        subprocess.run(["cp", "--sparse=always", tpl, local], check=True)
        with open(local, "r+b") as f:
            f.seek(size // 2)
            f.write(os.urandom(4 * MiB))
        for i in range(rounds):
            vid = f"m{i}"
            a.create_volume(vid, "base")
            a.checkpoint(vid)
            t0 = time.perf_counter()
            b.restore(vid, adopt=True)
            attach.append(time.perf_counter() - t0)
            b.remove_volume(vid)  # B owns it now: its image goes
            a.remove_volume(vid)  # A only forgets it
            dst = os.path.join(d, f"copy-{i}.img")
            t0 = time.perf_counter()
            subprocess.run(["cp", "--sparse=always", local, dst], check=True)
            with open(dst, "rb+") as f:
                os.fsync(f.fileno())
            copy.append(time.perf_counter() - t0)
            os.unlink(dst)
        os.unlink(local)
        a.remove_volume("keep")
        for s in (b, a):
            s.destroy()
            s.close()
        sa, sc = summary(attach), summary(copy)
        rows.append([f"{label} template", fmt_ms(sa["median_ms"]), fmt_ms(sa["p99_ms"]), fmt_ms(sc["median_ms"])])
        os.unlink(tpl)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--conf", help="an existing cluster's ceph.conf (default: start one)")
    ap.add_argument("--pool", default="rbd")
    a = ap.parse_args()
    sigterm_as_interrupt()
    tag = new_tag()
    with workdir(tag) as d:
        cluster = None
        if a.conf:
            opts = {"conf": a.conf, "pool": a.pool, "client": "admin"}
        else:
            cluster = Cluster(os.path.join(d, "cluster"), die_with_parent=True)
            t0 = time.monotonic()
            opts = cluster.up()
            print(f"single-node cluster up in {time.monotonic() - t0:.1f} s")
        opts = {**opts, "namespace": f"{tag}-{secrets.token_hex(2)}"}
        try:
            print(f"\ncreate+remove of one volume, {a.rounds} rounds (64 MiB template)")
            table(["way", "median", "p99", "vs raw"], bench_create_remove(d, opts, a.rounds))
            print(f"\nrestore on another host (store B attaches A's checkpoint), {a.rounds} rounds")
            table(["size", "B adopt+restore median", "p99", "cp of the local file (same data)"],
                  bench_restore_elsewhere(d, opts, a.rounds))
        finally:
            if cluster is not None:
                cluster.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
