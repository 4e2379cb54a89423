#!/usr/bin/env python3
"""Volume benchmarks per backend, against the seed systems' way, in the same run.

    python3 bench/volumes.py                       # host: reflink on xfs and btrfs, pool, copy
    python3 lab/kernel_lab.py run --timeout 1500 --scratch-size 4G -- python3 bench/volumes.py
                                                   # lab: dm-snapshot

Sections (all by default, pick with ``--sections``):

``latency``  create and remove latency (median, p99) of ``Store.create_volume`` /
             ``Store.remove_volume`` against the seed way on the same storage:
             dm-snapshot: ``truncate`` + ``losetup -f --show`` + ``blockdev --getsz`` +
             ``dmsetup create`` (origin loop made once with ``losetup -r``), removed with
             ``dmsetup remove`` + ``losetup -d`` + ``rm``; file backends:
             ``cp --reflink=always`` (where the filesystem can) and ``cp --sparse=never``
             (a plain full copy; with ``--reflink=never`` as
             coreutils 9 cp would otherwise clone), removed with ``rm -f``.  Both alternate iteration by
             iteration.
``sizes``    create time against template size (64 MiB, 1 GiB, 8 GiB sparse templates
             with the same 16 MiB of data in each, see ``--fill``).
``usage``    disk bytes of a fresh volume and after writing 1 MiB into it (own_bytes:
             what the volume alone costs; disk_bytes: st_blocks, shared blocks included).
``fio``      4 KiB random write and 1 MiB sequential read (direct=1, libaio, iodepth 16,
             5 s each) through a volume, against a raw full copy of the template on the
             same storage, as a ratio.

Every store is destroyed, every seed loop/dm device removed and every scratch
filesystem unmounted at the end, also on failure or Ctrl-C.  Only objects the bench
made are touched (names and directories ``cdbench-*``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchutil as bu  # noqa: E402
from benchutil import GiB, MiB  # noqa: E402

from cowdisk.kernel import fs  # noqa: E402
from cowdisk.store import Store  # noqa: E402

HOST_SITES = ["reflink-xfs", "reflink-btrfs", "pool", "copy"]
LAB_SITES = ["dm-snapshot"]
ALL_SITES = HOST_SITES + LAB_SITES
SECTIONS = ["latency", "sizes", "usage", "fio"]

OURS = "cowdisk"
FULL = "cp --sparse=never"  # run with --reflink=never too: coreutils 9 cp reflinks by default


# -- sites: one backend on its storage, with the seed ways next to it -------------


@dataclass
class Site:
    name: str
    backend: str
    store: Store
    data_dir: str  # seed copies and raw copies go here: the same storage as the volumes
    tag: str
    reflink: bool
    seeds: list[str] = field(default_factory=list)
    templates: dict[str, str] = field(default_factory=dict)  # label -> template id
    live_files: set[str] = field(default_factory=set)
    seed_dms: list[bu.SeedDm] = field(default_factory=list)

    # the seed ways -----------------------------------------------------------------

    def seed_dm(self, tid: str) -> bu.SeedDm:
        sd = bu.SeedDm(self.store.template(tid).path, self.data_dir, f"{self.tag}-seed")
        self.seed_dms.append(sd)
        sd.open()
        return sd

    def seed_create(self, method: str, tid: str, name: str, sd: bu.SeedDm | None = None) -> str:
        src = self.store.template(tid).path
        if method == "dmsetup CLI":
            assert sd is not None
            return sd.create(f"{self.tag}-{name}")
        dst = os.path.join(self.data_dir, f"{name}.img")
        self.live_files.add(dst)
        if method == "cp --reflink=always":
            bu.run("cp", "--reflink=always", src, dst)
        elif method == FULL:
            bu.run("cp", "--reflink=never", "--sparse=never", src, dst)
        else:
            raise ValueError(method)
        return dst

    def seed_remove(self, method: str, name: str, sd: bu.SeedDm | None = None) -> None:
        if method == "dmsetup CLI":
            assert sd is not None
            sd.remove(f"{self.tag}-{name}")
            return
        dst = os.path.join(self.data_dir, f"{name}.img")
        bu.run("rm", "-f", dst)
        self.live_files.discard(dst)

    def close_seeds(self) -> None:
        for sd in self.seed_dms:
            sd.close()
        self.seed_dms.clear()
        for p in list(self.live_files):
            bu.drop_file(p)
        self.live_files.clear()


def close_store(store: Store) -> None:
    """destroy() (volumes, templates, pool), then close; best effort past a failure."""
    try:
        store.destroy()
    except Exception as e:
        print(f"cleanup: store.destroy() of {store.root} failed: {e}; removing piece by piece", file=sys.stderr)
        for v in store.volumes():
            with contextlib.suppress(Exception):
                store.remove_volume(v.id)
        for t in store.templates():
            with contextlib.suppress(Exception):
                store.remove_template(t.id)
        if store.backend_name == "pool":
            with contextlib.suppress(Exception):
                store.backend.pool.destroy()
    finally:
        store.close()


def open_site(name: str, stack: contextlib.ExitStack, tag: str, args: argparse.Namespace) -> Site:
    base = args.dir
    if name.startswith("reflink-"):
        fstype = name.split("-", 1)[1]
        mnt = stack.enter_context(bu.scratch_fs(fstype, args.scratch_size, tag, base))
        root = os.path.join(mnt, "store")
        data = os.path.join(mnt, "seed")
        backend = "reflink"
    else:
        root = stack.enter_context(bu.workdir(f"{tag}-{name}", base))
        data = os.path.join(root, "seed")  # pool: moved into the pool mount below
        backend = name
    store = Store(root, backend=backend)
    stack.callback(close_store, store)
    if backend == "pool":
        data = os.path.join(store.data_root, "seed")
    os.makedirs(data, exist_ok=True)
    stack.callback(shutil.rmtree, data, True)
    reflink = backend in ("reflink", "pool")
    site = Site(name, backend, store, data, f"{tag}-{name.replace('reflink-', '')}", reflink)
    stack.callback(site.close_seeds)
    if backend == "dm-snapshot":
        site.seeds = ["dmsetup CLI"]
    else:
        site.seeds = (["cp --reflink=always"] if reflink else []) + [FULL]
    return site


def template(site: Site, label: str, size: int, fill: str) -> str:
    """Import a template of ``size`` with ``fill`` data into the site's store (cached by label)."""
    if label in site.templates:
        return site.templates[label]
    src = os.path.join(site.data_dir, f"src-{label}.img")
    try:
        bu.make_template(src, size, fill)
        t = site.store.import_template(src, f"bench-{label}")
    finally:
        bu.drop_file(src)
    site.templates[label] = t.id
    return t.id


def drop_template(site: Site, label: str) -> None:
    tid = site.templates.pop(label, None)
    if tid:
        site.store.remove_template(tid)


# -- sections -----------------------------------------------------------------------


def sec_latency(site: Site, args: argparse.Namespace) -> list[dict[str, object]]:
    tid = template(site, "64M", 64 * MiB, args.fill)
    methods = [OURS] + site.seeds
    create: dict[str, list[float]] = {m: [] for m in methods}
    remove: dict[str, list[float]] = {m: [] for m in methods}
    sd = site.seed_dm(tid) if site.backend == "dm-snapshot" else None
    st = site.store
    for i in range(args.warmup + args.iterations):
        order = methods if i % 2 == 0 else list(reversed(methods))
        for m in order:
            name = f"lat{i}"
            if m == OURS:
                c = bu.timed(lambda: st.create_volume(name, tid))
                r = bu.timed(lambda: st.remove_volume(name))
            else:
                c = bu.timed(lambda: site.seed_create(m, tid, name, sd))
                r = bu.timed(lambda: site.seed_remove(m, name, sd))
            if i >= args.warmup:
                create[m].append(c)
                remove[m].append(r)
    if sd:
        sd.close()
    rows = []
    ours_pair = bu.summary([a + b for a, b in zip(create[OURS], remove[OURS])])
    for m in methods:
        pair = bu.summary([a + b for a, b in zip(create[m], remove[m])])
        rows.append({"backend": site.name, "method": m, "create": bu.summary(create[m]),
                     "remove": bu.summary(remove[m]), "create+remove": pair,
                     "ratio_vs_cowdisk": pair["median_ms"] / ours_pair["median_ms"]})
    return rows


def print_latency(rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    print(f"\n== create / remove latency, 64 MiB template, {args.iterations} iterations "
          f"(+{args.warmup} warm-up), alternating ==")
    out = []
    for r in rows:
        c, d, p = r["create"], r["remove"], r["create+remove"]
        out.append([r["backend"], r["method"], bu.fmt_ms(c["median_ms"]), bu.fmt_ms(c["p99_ms"]),
                    bu.fmt_ms(d["median_ms"]), bu.fmt_ms(d["p99_ms"]), bu.fmt_ms(p["median_ms"]),
                    "1.0x" if r["method"] == OURS else f"{r['ratio_vs_cowdisk']:.1f}x"])
    bu.table(["backend", "method", "create med", "p99", "remove med", "p99", "pair med",
              "seed/cowdisk"], out)


def sec_sizes(site: Site, args: argparse.Namespace) -> list[dict[str, object]]:
    rows: dict[str, dict[str, object]] = {}
    methods = [OURS] + site.seeds
    st = site.store
    for size in args.sizes:
        label = bu.size_label(size).replace(" ", "")
        tid = template(site, label, size, args.fill)
        sd = site.seed_dm(tid) if site.backend == "dm-snapshot" else None
        samples: dict[str, list[float]] = {m: [] for m in methods}
        skipped: dict[str, str] = {}
        for i in range(args.size_iterations):
            for m in methods if i % 2 == 0 else list(reversed(methods)):
                if m == FULL:
                    if i >= (args.size_iterations if size <= GiB else args.big_copy_iterations):
                        continue
                    need = size + 256 * MiB
                    free = min(shutil.disk_usage(site.data_dir).free,
                               shutil.disk_usage(args.dir or tempfile.gettempdir()).free)
                    if free < need:
                        skipped[m] = f"needs {bu.fmt_bytes(need)} free, has {bu.fmt_bytes(free)}"
                        continue
                name = f"sz{label}-{i}"
                if m == OURS:
                    samples[m].append(bu.timed(lambda: st.create_volume(name, tid)))
                    st.remove_volume(name)
                else:
                    samples[m].append(bu.timed(lambda: site.seed_create(m, tid, name, sd)))
                    site.seed_remove(m, name, sd)
        if sd:
            sd.close()
        for m in methods:
            r = rows.setdefault(m, {"backend": site.name, "method": m, "sizes": {}})
            r["sizes"][label] = bu.summary(samples[m]) | ({"skipped": skipped[m]} if m in skipped else {})
        drop_template(site, label)
    return list(rows.values())


def print_sizes(rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    labels = [bu.size_label(s).replace(" ", "") for s in args.sizes]
    print(f"\n== create time against template size (median of {args.size_iterations}; full copy "
          f"{args.big_copy_iterations}x above 1 GiB), templates: sparse, {FILL_DESC[args.fill]} ==")
    out = []
    for r in rows:
        meds = [r["sizes"].get(lb, {}).get("median_ms", float("nan")) for lb in labels]
        growth = meds[-1] / meds[0] if meds and meds[0] == meds[0] and meds[0] else float("nan")
        out.append([r["backend"], r["method"], *(bu.fmt_ms(m) for m in meds),
                    "-" if growth != growth else f"{growth:.2f}x"])
    bu.table(["backend", "method", *labels, f"{labels[-1]}/{labels[0]}"], out)


FILL_DESC = {
    "scattered": "16 x 1 MiB of random data at evenly spread offsets (16 MiB of data whatever the size)",
    "dense": "1 MiB of random data in every 16 MiB (6.25 % of the size)",
    "full": "every byte written",
}


def _write_1mib(path: str, block: bool) -> None:
    buf = os.urandom(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, buf, 32 * MiB)  # into the middle of the 64 MiB template
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_usage(path: str, reflink: bool) -> tuple[int, int]:
    disk = fs.disk_usage(path)
    own = fs.shared_usage(path).exclusive if reflink else disk
    return own, disk


def sec_usage(site: Site, args: argparse.Namespace) -> list[dict[str, object]]:
    tid = template(site, "64M", 64 * MiB, args.fill)
    st = site.store
    rows = []
    v = st.create_volume("usage", tid)
    try:
        u0 = st.usage("usage")
        _write_1mib(v.device or v.link, st.backend.block_device)
        u1 = st.usage("usage")
    finally:
        st.remove_volume("usage")
    rows.append({"backend": site.name, "method": OURS, "fresh_own": u0.own_bytes, "fresh_disk": u0.disk_bytes,
                 "after_own": u1.own_bytes, "after_disk": u1.disk_bytes,
                 "template_disk": st.template_usage(tid)})
    for m in site.seeds:
        sd = site.seed_dm(tid) if m == "dmsetup CLI" else None
        dev = site.seed_create(m, tid, "usage", sd)
        try:
            if sd:
                cow = sd.vols[f"{site.tag}-usage"][0]
                f0 = (fs.disk_usage(cow),) * 2
                _write_1mib(dev, True)
                f1 = (fs.disk_usage(cow),) * 2
            else:
                f0 = _file_usage(dev, m == "cp --reflink=always")
                _write_1mib(dev, False)
                f1 = _file_usage(dev, m == "cp --reflink=always")
        finally:
            site.seed_remove(m, "usage", sd)
            if sd:
                sd.close()
        rows.append({"backend": site.name, "method": m, "fresh_own": f0[0], "fresh_disk": f0[1],
                     "after_own": f1[0], "after_disk": f1[1]})
    return rows


def print_usage(rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    print("\n== disk bytes of a volume over a 64 MiB template (16 MiB of data): fresh, and after writing "
          "1 MiB at offset 32 MiB (fsync) ==")
    print("own = what this volume alone costs (reflink: exclusive extents by FIEMAP; else allocated); "
          "disk = st_blocks (shared extents included)")
    out = [[r["backend"], r["method"], bu.fmt_bytes(r["fresh_own"]), bu.fmt_bytes(r["fresh_disk"]),
            bu.fmt_bytes(r["after_own"]), bu.fmt_bytes(r["after_disk"])] for r in rows]
    bu.table(["backend", "method", "fresh own", "fresh disk", "+1MiB own", "+1MiB disk"], out)


def fio(target: str, rw: str, size: int | None, args: argparse.Namespace) -> dict[str, float]:
    bs = "4k" if rw == "randwrite" else "1M"
    argv = ["fio", "--name=bench", f"--filename={target}", f"--rw={rw}", f"--bs={bs}", "--direct=1",
            "--ioengine=libaio", "--iodepth=16", f"--runtime={args.fio_runtime}", "--time_based",
            "--fallocate=none", "--allow_file_create=0", "--randrepeat=0", "--norandommap",
            "--group_reporting", "--output-format=json"]
    if size is not None:
        argv.append(f"--size={size}")
    out = bu.run(*argv)
    j = json.loads(out[out.index("{"):])
    job = j["jobs"][0]
    side = job["write" if rw == "randwrite" else "read"]
    return {"iops": side["iops"], "bw_MiBps": side["bw"] / 1024, "lat_p99_us": side.get("clat_ns", {}).get(
        "percentile", {}).get("99.000000", 0) / 1000}


def sec_fio(site: Site, args: argparse.Namespace) -> list[dict[str, object]]:
    if not shutil.which("fio"):
        return [{"backend": site.name, "skipped": "fio not installed"}]
    size = args.fio_size
    label = f"fio{size // MiB}M"
    tid = template(site, label, size, "full")
    st = site.store
    res: dict[str, dict[str, dict[str, float]]] = {}
    raw = os.path.join(site.data_dir, "raw.img")
    site.live_files.add(raw)
    try:
        bu.run("cp", "--reflink=never", "--sparse=never", st.template(tid).path, raw)
        os.sync()
        v = st.create_volume("fio", tid)
        try:
            vt = v.device or v.link
            fsz = None if st.backend.block_device else size
            res["volume"] = {rw: fio(vt, rw, fsz, args) for rw in ("randwrite", "read")}
        finally:
            st.remove_volume("fio")
        res["raw"] = {rw: fio(raw, rw, size, args) for rw in ("randwrite", "read")}
    finally:
        bu.drop_file(raw)
        site.live_files.discard(raw)
        drop_template(site, label)
    return [{"backend": site.name, "volume": res["volume"], "raw": res["raw"],
             "randwrite_iops_ratio": res["volume"]["randwrite"]["iops"] / res["raw"]["randwrite"]["iops"],
             "read_bw_ratio": res["volume"]["read"]["bw_MiBps"] / res["raw"]["read"]["bw_MiBps"]}]


def print_fio(rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    print(f"\n== fio through a fresh volume vs a raw full copy of the template on the same storage "
          f"({bu.size_label(args.fio_size)} template, fully written; direct=1 libaio iodepth 16, "
          f"{args.fio_runtime} s each; randwrite 4 KiB then read 1 MiB sequential) ==")
    out = []
    for r in rows:
        if "skipped" in r:
            out.append([r["backend"], r["skipped"], "", "", "", "", ""])
            continue
        v, w = r["volume"], r["raw"]
        out.append([r["backend"], f"{v['randwrite']['iops']:.0f}", f"{w['randwrite']['iops']:.0f}",
                    f"{r['randwrite_iops_ratio']:.2f}", f"{v['read']['bw_MiBps']:.0f}",
                    f"{w['read']['bw_MiBps']:.0f}", f"{r['read_bw_ratio']:.2f}"])
    bu.table(["backend", "randwrite IOPS vol", "raw", "vol/raw", "seqread MiB/s vol", "raw", "vol/raw"], out)


def leak_check(tag: str, dm_prefixes: list[str]) -> tuple[list[str], list[str]]:
    """Loops backed by files of this run (every path has ``tag`` in it) and dm devices
    named with this run's prefixes (seed names, the stores' dm prefixes)."""
    loops = [f"{li.path}={li.backing_file}" for li in bu.loop.list_loops() if tag in li.backing_file]
    dms = sorted({n for p in dm_prefixes for n in bu.dm_names(p)})
    return loops, dms


RUNNERS: dict[str, tuple[Callable[[Site, argparse.Namespace], list[dict[str, object]]],
                         Callable[[list[dict[str, object]], argparse.Namespace], None]]] = {
    "latency": (sec_latency, print_latency),
    "sizes": (sec_sizes, print_sizes),
    "usage": (sec_usage, print_usage),
    "fio": (sec_fio, print_fio),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--backends", default=None,
                    help=f"comma list of {','.join(ALL_SITES)} (default: {','.join(LAB_SITES)} in the lab, "
                         f"else {','.join(HOST_SITES)})")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {','.join(SECTIONS)}")
    ap.add_argument("-n", "--iterations", type=int, default=50, help="latency iterations per method")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sizes", default=None,
                    help="template sizes for the sizes section (default 64M,1G,8G; 64M,1G in the lab, where "
                         "importing 8 GiB (digest of every byte, holes as zeros) is minutes under emulation)")
    ap.add_argument("--size-iterations", type=int, default=5)
    ap.add_argument("--big-copy-iterations", type=int, default=1,
                    help="full copies (cp --sparse=never) per size above 1 GiB")
    ap.add_argument("--fill", choices=sorted(FILL_DESC), default="scattered", help="template data")
    ap.add_argument("--fio-size", type=bu.parse_size, default=256 * MiB)
    ap.add_argument("--fio-runtime", type=int, default=5)
    ap.add_argument("--scratch-size", type=bu.parse_size, default=20 * GiB,
                    help="sparse size of the loop-mounted xfs/btrfs for the reflink backends")
    ap.add_argument("--dir", default=os.environ.get("COWDISK_LAB_SCRATCH") or None,
                    help="where stores and scratch images go (default: the lab scratch or TMPDIR)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("needs root (loop devices, mounts, device-mapper)")
    lab = bu.in_lab()
    sites = (args.backends.split(",") if args.backends else (LAB_SITES if lab else HOST_SITES))
    for s in sites:
        if s not in ALL_SITES:
            ap.error(f"unknown backend {s!r}: one of {', '.join(ALL_SITES)}")
    sections = args.sections.split(",")
    for s in sections:
        if s not in SECTIONS:
            ap.error(f"unknown section {s!r}: one of {', '.join(SECTIONS)}")
    args.sizes = [bu.parse_size(x) for x in (args.sizes or ("64M,1G" if lab else "64M,1G,8G")).split(",")]
    bu.sigterm_as_interrupt()

    usable = []
    for s in sites:
        if s == "dm-snapshot" and not bu.dm_available():
            print(f"skip {s}: no device-mapper snapshot target here (run it in the kernel lab)")
        elif s.startswith("reflink-") and not bu.can_mkfs(s.split("-", 1)[1]):
            print(f"skip {s}: {bu.MKFS[s.split('-', 1)[1]][0]} not installed")
        else:
            usable.append(s)
    tag = bu.new_tag()
    print(f"cowdisk volume bench {tag}: kernel {os.uname().release}, {os.cpu_count()} CPUs, "
          f"{'kernel lab (QEMU TCG)' if lab else 'host'}, load {os.getloadavg()[0]:.1f}, "
          f"backends {','.join(usable)}, sections {','.join(sections)}")
    results: dict[str, list[dict[str, object]]] = {s: [] for s in sections}
    t_start = time.monotonic()
    prefixes: list[str] = [tag]
    try:
        for s in usable:
            with contextlib.ExitStack() as stack:
                t0 = time.monotonic()
                site = open_site(s, stack, tag, args)
                prefixes.append(site.store.dm_prefix)
                for sec in sections:
                    results[sec] += RUNNERS[sec][0](site, args)
                print(f"[{s}: {time.monotonic() - t0:.0f} s]", flush=True)
    finally:
        leaks, dms = leak_check(tag, prefixes)
        if leaks or dms:
            print(f"LEAK: loops {leaks} dm {dms}", file=sys.stderr)
    for sec in sections:
        RUNNERS[sec][1](results[sec], args)
    print(f"\n[total {time.monotonic() - t_start:.0f} s; leak check: "
          f"{'no' if not (leaks or dms) else 'SOME'} loop or dm device of this run left, "
          f"{'no' if not bu.leftover_dirs(tag, args.dir) else 'SOME'} {tag}* files left]")
    if args.json:
        Path(args.json).write_text(json.dumps({"tag": tag, "kernel": os.uname().release, "lab": lab,
                                               "args": {k: v for k, v in vars(args).items()},
                                               "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
