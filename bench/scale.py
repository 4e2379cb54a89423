#!/usr/bin/env python3
"""Scale: N volumes from one template, created, listed, removed.

    python3 bench/scale.py                         # host: pool and reflink (xfs), 1000 each
    python3 lab/kernel_lab.py run --timeout 1500 -- python3 bench/scale.py --count 200
                                                   # lab: dm-snapshot

Per backend: total and per-operation median/p99 time of ``create_volume`` (all N, all
alive at once), one ``volumes()`` listing with N volumes, and ``remove_volume`` of all N;
the peak RSS of this process (``ru_maxrss``), the loop devices in use at the peak
(dm-snapshot: one per volume plus the template's; reflink/copy: none; pool: its one
mount loop; dm-thin: the pool's two) counted from sysfs, and a leak check at the end: no loop backed by the
run's files, no dm device with the store's prefix, no thin device in a dm-thin pool but the template's, no file
left of the run.  Every store is destroyed and every scratch
filesystem unmounted at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchutil as bu  # noqa: E402
from benchutil import GiB, MiB  # noqa: E402

from cowdisk.store import Store  # noqa: E402

SITES = ["pool", "reflink-xfs", "reflink-btrfs", "copy", "dm-snapshot", "dm-thin"]


def store_wide_files(store: Store) -> set[str]:
    """Backing files of loops that belong to the store, not to a volume (they stay while
    the store exists): the pool's image, dm-thin's data and metadata files."""
    b = store.backend
    if hasattr(b, "pool"):
        return {b.pool.image}
    if hasattr(b, "data_file") and getattr(b, "on_files", False):
        return {b.data_file, b.meta_file}
    return set()


def store_wide_dm(store: Store) -> set[str]:
    """dm devices that belong to the store, not to a volume (dm-thin's pool)."""
    name = getattr(store.backend, "pool_name", None)
    return {name} if isinstance(name, str) else set()


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_site(name: str, args: argparse.Namespace, tag: str) -> dict[str, object]:
    with contextlib.ExitStack() as stack:
        if name.startswith("reflink-"):
            mnt = stack.enter_context(bu.scratch_fs(name.split("-", 1)[1], args.scratch_size, tag, args.dir))
            root = os.path.join(mnt, "store")
            backend = "reflink"
        else:
            root = stack.enter_context(bu.workdir(f"{tag}-{name}", args.dir))
            backend = name
        rss0 = maxrss_mib()
        store = Store(root, backend=backend)
        closed = False

        def close() -> None:
            if not closed:
                try:
                    store.destroy()
                finally:
                    store.close()

        stack.callback(close)
        src = os.path.join(root, "src.img")
        bu.make_template(src, args.template_size, "scattered")
        t = store.import_template(src, "scale")
        os.unlink(src)
        loops_before = {li.number for li in bu.loop.list_loops()}
        own = (store.root.rstrip("/") + "/", store.data_root.rstrip("/") + "/")
        mine = lambda: [li for li in bu.loop.list_loops() if li.backing_file.startswith(own)]  # noqa: E731
        create: list[float] = []
        remove: list[float] = []
        ids = [f"s{i:05d}" for i in range(args.count)]
        t0 = time.perf_counter()
        for i, vid in enumerate(ids):
            a = time.perf_counter()
            store.create_volume(vid, t.id)
            create.append(time.perf_counter() - a)
            if args.progress and (i + 1) % args.progress == 0:
                print(f"  {name}: {i + 1} created, {time.perf_counter() - t0:.1f} s", flush=True)
        t_create = time.perf_counter() - t0
        a = time.perf_counter()
        listed = store.volumes()
        t_list = time.perf_counter() - a
        assert len(listed) == args.count, f"listed {len(listed)} volumes, made {args.count}"
        peak_loops = mine()
        all_loops_peak = {li.number for li in bu.loop.list_loops()}
        dm_peak = bu.dm_names(store.dm_prefix)
        rss_peak = maxrss_mib()
        t0 = time.perf_counter()
        for vid in ids:
            a = time.perf_counter()
            store.remove_volume(vid)
            remove.append(time.perf_counter() - a)
        t_remove = time.perf_counter() - t0
        after_loops = [li for li in mine() if li.backing_file not in store_wide_files(store)]  # the pool's stay
        after_dm = [n for n in bu.dm_names(store.dm_prefix) if n not in store_wide_dm(store)]  # dm-thin's pool stays
        after_vols = os.listdir(os.path.join(store.data_root, "volumes"))
        after_links = os.listdir(os.path.join(store.root, "links"))
        # dm-thin: thin devices left in the pool besides the template's (thin_ls on a metadata snapshot)
        after_thins = sorted(store.backend.thin_usage())[1:] if hasattr(store.backend, "thin_usage") else []
        prefix = store.dm_prefix
        closed = True
        store.destroy()
        store.close()
        after_tpl_loops = [li for li in bu.loop.list_loops() if li.backing_file.startswith(own)]
    # the stack is closed: scratch fs unmounted, work dir removed
    leftovers = [li.path for li in bu.loop.list_loops() if tag in li.backing_file]
    left_dirs = bu.leftover_dirs(f"{tag}-{name}", args.dir) + (
        bu.leftover_dirs(f"{tag}-{name.split('-', 1)[-1]}", args.dir) if name.startswith("reflink-") else [])
    res = {
        "backend": name, "count": args.count, "template_size": args.template_size,
        "create_total_s": t_create, "create": bu.summary(create),
        "list_s": t_list, "remove_total_s": t_remove, "remove": bu.summary(remove),
        "rss_before_mib": rss0, "rss_peak_mib": rss_peak,
        "loops_in_use_at_peak": len(peak_loops),
        "loops_host_delta_at_peak": len(all_loops_peak - loops_before),
        "dm_devices_at_peak": len(dm_peak),
        "leaks": {
            "after_remove_all": {"loops": [li.path for li in after_loops], "dm": after_dm,
                                 "volume_dirs": after_vols, "link_dirs": after_links, "thins": after_thins},
            "after_destroy": {"loops": [li.path for li in after_tpl_loops] + leftovers,
                              "dm": bu.dm_names(prefix), "dirs": left_dirs},
        },
    }
    leak = any(res["leaks"]["after_remove_all"].values()) or any(res["leaks"]["after_destroy"].values())
    res["leak"] = leak
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--backends", default=None,
                    help=f"comma list of {','.join(SITES)} (default: dm-thin,dm-snapshot in the lab, else pool,reflink-xfs)")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--template-size", type=bu.parse_size, default=1 * GiB,
                    help="sparse template size (16 MiB of data in it)")
    ap.add_argument("--scratch-size", type=bu.parse_size, default=8 * GiB)
    ap.add_argument("--progress", type=int, default=0, metavar="K", help="print progress every K creates")
    ap.add_argument("--dir", default=os.environ.get("COWDISK_LAB_SCRATCH") or None)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("needs root")
    lab = bu.in_lab()
    sites = args.backends.split(",") if args.backends else (["dm-thin", "dm-snapshot"] if lab else
                                                            ["pool", "reflink-xfs"])
    for s in sites:
        if s not in SITES:
            ap.error(f"unknown backend {s!r}")
    bu.sigterm_as_interrupt()
    tag = bu.new_tag()
    print(f"cowdisk scale bench {tag}: {args.count} volumes from one {bu.size_label(args.template_size)} template "
          f"per backend; kernel {os.uname().release}, {os.cpu_count()} CPUs, "
          f"{'kernel lab (QEMU TCG)' if lab else 'host'}, load {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    for s in sites:
        if s.startswith("dm-") and not bu.dm_available():
            print(f"skip {s}: no device-mapper snapshot target here (run it in the kernel lab)")
            continue
        t0 = time.monotonic()
        results.append(run_site(s, args, tag))
        print(f"[{s}: {time.monotonic() - t0:.0f} s]", flush=True)
    print()
    rows = []
    for r in results:
        rows.append([r["backend"], str(r["count"]), f"{r['create_total_s']:.1f} s", bu.fmt_ms(r["create"]["median_ms"]),
                     bu.fmt_ms(r["create"]["p99_ms"]), bu.fmt_ms(r["list_s"] * 1e3),
                     f"{r['remove_total_s']:.1f} s", bu.fmt_ms(r["remove"]["median_ms"]),
                     bu.fmt_ms(r["remove"]["p99_ms"]), f"{r['rss_peak_mib']:.0f} MiB",
                     f"{r['loops_in_use_at_peak']} (+{r['loops_host_delta_at_peak']} on host)",
                     str(r["dm_devices_at_peak"]), "LEAK" if r["leak"] else "none"])
    bu.table(["backend", "N", "create all", "create med", "p99", "list N", "remove all", "remove med", "p99",
              "peak RSS", "loops at peak", "dm at peak", "leaks"], rows)
    for r in results:
        if r["leak"]:
            print(f"LEAK in {r['backend']}: {json.dumps(r['leaks'])}", file=sys.stderr)
    print("\nloops at peak: loops backed by the store's files (sysfs), and in brackets all loops the host gained "
          "meanwhile (other users of this machine count there too); peak RSS: ru_maxrss of this process")
    if args.json:
        Path(args.json).write_text(json.dumps({"tag": tag, "lab": lab, "kernel": os.uname().release,
                                               "results": results}, indent=2))
    return 1 if any(r["leak"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
