#!/usr/bin/env python3
"""The device-mapper paths side by side (issue 15): fio through each, and create/remove
through the Store against the kernel's floor, in one run.

    python3 lab/kernel_lab.py run --timeout 1700 --scratch-size 4G -- python3 bench/dm_paths.py

``--sections fio``: fio ``--direct=1 --ioengine=libaio --iodepth=16`` (4 KiB randread,
4 KiB randwrite, 1 MiB read, 1 MiB write; ``--fio-runtime`` s each, the median of
``--samples``) on a fresh volume over a fully written template, for: a raw loop over a
full copy, buffered and with direct I/O (the reference: ratios are to the direct-I/O
raw loop of the same run); dm-snapshot with the old settings (4 KiB chunks, buffered
loops) and the new ones (64 KiB chunks, direct I/O) and, for the choice, 64 KiB
buffered and 256 KiB direct; dm-thin with 64 KiB and 256 KiB blocks.

``--sections floor``: ``Store.create_volume`` + ``Store.remove_volume`` against the
kernel's floor, the same loop and dm ioctls and thin messages made directly through
``cowdisk.kernel`` with no registry, lock, link or check; alternating, at 1 existing
volume and at ``--existing`` volumes, for dm-thin (with and without the discard that
gives a removed volume's blocks back to the host) and dm-snapshot. The backend alone
(its create/detach/destroy with no registry) is timed too, so the table says where the
rest goes: backend vs store (registry commits, lock files, the link).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchutil as bu  # noqa: E402
from benchutil import MiB  # noqa: E402

from cowdisk.backends import VolumeCtx  # noqa: E402
from cowdisk.backends.dm_snapshot import cow_size  # noqa: E402
from cowdisk.kernel import blk, dm, dm_status, fs, loop  # noqa: E402
from cowdisk.store import Store  # noqa: E402

FIO_JOBS = (("randread", "4k"), ("randwrite", "4k"), ("read", "1M"), ("write", "1M"))

PATHS: dict[str, tuple[str, dict[str, str]] | None] = {
    "raw loop, buffered": None,
    "raw loop, direct I/O": None,
    "dm-snapshot old: 4 KiB chunks, buffered": ("dm-snapshot", {"chunk_kib": "4", "direct_io": "no"}),
    "dm-snapshot 64 KiB chunks, buffered": ("dm-snapshot", {"chunk_kib": "64", "direct_io": "no"}),
    "dm-snapshot new: 64 KiB chunks, direct I/O": ("dm-snapshot", {}),
    "dm-snapshot 256 KiB chunks, direct I/O": ("dm-snapshot", {"chunk_kib": "256"}),
    "dm-thin: 64 KiB blocks": ("dm-thin", {}),
    "dm-thin: 256 KiB blocks": ("dm-thin", {"block_kib": "256"}),
}


def fio(target: str, rw: str, bs: str, args: argparse.Namespace) -> float:
    """MB/s (10^6) of one fio job."""
    argv = ["fio", "--name=bench", f"--filename={target}", f"--rw={rw}", f"--bs={bs}", "--direct=1",
            "--ioengine=libaio", "--iodepth=16", f"--runtime={args.fio_runtime}", "--time_based",
            "--randrepeat=0", "--norandommap", "--group_reporting", "--output-format=json"]
    out = bu.run(*argv)
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["write" if "write" in rw else "read"]
    return side["bw_bytes"] / 1e6


def fio_all(target: str, args: argparse.Namespace) -> dict[str, float]:
    out = {}
    for rw, bs in FIO_JOBS:
        out[f"{bs} {rw}"] = statistics.median(fio(target, rw, bs, args) for _ in range(args.samples))
    return out


def sec_fio(args: argparse.Namespace, base: str, tag: str) -> dict[str, dict[str, float]]:
    src = os.path.join(base, "template.img")
    bu.make_template(src, args.fio_size, "full")
    res: dict[str, dict[str, float]] = {}
    for label, spec in PATHS.items():
        if args.paths and not any(p in label for p in args.paths.split(",")):
            continue
        t0 = time.monotonic()
        if spec is None:
            raw = os.path.join(base, "raw.img")
            bu.run("cp", "--reflink=never", "--sparse=never", src, raw)
            os.sync()
            lp = loop.attach(raw, autoclear=True, direct_io="direct" in label, label=f"{tag}-raw")
            try:
                res[label] = fio_all(lp.path, args)
            finally:
                lp.close()
                bu.drop_file(raw)
        else:
            backend, opts = spec
            root = os.path.join(base, f"store-{len(res)}")
            s = Store(root, backend=backend, backend_options=opts)
            try:
                t = s.import_template(src, "fio")
                v = s.create_volume("fio", t.id)
                res[label] = fio_all(str(v.device), args)
                s.remove_volume("fio")
            finally:
                s.destroy()
                s.close()
        print(f"  {label}: {time.monotonic() - t0:.0f} s", flush=True)
    os.unlink(src)
    return res


def print_fio(res: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    ref = res.get("raw loop, direct I/O")
    print(f"\n== fio, {args.fio_size // MiB} MiB template fully written, direct=1 libaio iodepth 16, "
          f"{args.fio_runtime} s per job, median of {args.samples}; MB/s (ratio to the raw loop with direct I/O) ==")
    rows = []
    for label, r in res.items():
        cells = [label]
        for rw, bs in FIO_JOBS:
            k = f"{bs} {rw}"
            cells.append(f"{r[k]:.1f}" + (f" ({r[k] / ref[k]:.2f})" if ref else ""))
        rows.append(cells)
    bu.table(["path"] + [f"{bs} {rw}" for rw, bs in FIO_JOBS], rows)


# -- the kernel's floor -------------------------------------------------------------


class ThinFloor:
    """dm-thin's kernel steps for one volume, made directly on the store's own pool: thin id
    (set_transaction_id), create_snap, DEV_CREATE+TABLE_LOAD+resume; remove: DEV_REMOVE,
    (discard: activate, BLKDISCARD, DEV_REMOVE), delete."""

    def __init__(self, store: Store, origin: int, size: int, discard: bool) -> None:
        self.b = store.backend
        self.ctl = dm.control()
        self.pool = self.b.pool_name  # type: ignore[attr-defined]
        self.origin, self.size, self.discard = origin, size, discard
        self.ids: dict[str, int] = {}

    def _table(self, tid: int) -> list[dm.Target]:
        i = self.ctl.info(self.pool)
        return [dm.Target(0, self.size // 512, "thin", f"{i.major}:{i.minor} {tid}")]

    def create(self, name: str) -> None:
        st = dm_status.parse_thin_pool_status(self.ctl.status(self.pool, noflush=True)[0].text)
        assert st.transaction_id is not None
        tid = st.transaction_id + 1
        self.ctl.message(self.pool, 0, f"set_transaction_id {st.transaction_id} {tid}")
        self.ctl.message(self.pool, 0, f"create_snap {tid} {self.origin}")
        info = self.ctl.create_device(name, self._table(tid))
        dm.device_node(info)
        self.ids[name] = tid

    def remove(self, name: str) -> None:
        tid = self.ids.pop(name)
        self.ctl.remove(name)
        if self.discard:
            info = self.ctl.create_device(name, self._table(tid))
            fd = os.open(dm.device_node(info), os.O_WRONLY | os.O_CLOEXEC)
            try:
                blk.discard(fd, 0, self.size)
            finally:
                os.close(fd)
            self.ctl.remove(name)
        self.ctl.message(self.pool, 0, f"delete {tid}")


class SnapFloor:
    """dm-snapshot's kernel steps: a sparse COW file, its loop (direct I/O, autoclear), the
    snapshot over the template's loop (held open here); remove: DEV_REMOVE, unlink."""

    def __init__(self, store: Store, template: str, size: int, base: str) -> None:
        self.tl = loop.attach(template, read_only=True, autoclear=True, direct_io=True, label="cdbench-floor-t")
        self.size, self.base = size, base
        self.ctl = dm.control()

    def create(self, name: str) -> None:
        cow = os.path.join(self.base, f"{name}.cow")
        fs.create_sparse(cow, cow_size(self.size))
        cl = loop.attach(cow, autoclear=True, direct_io=True, label="cdbench-floor-c")
        try:
            info = self.ctl.create_device(name, [dm.Target(0, self.size // 512, "snapshot",
                                                           f"{self.tl.devno} {cl.devno} P 128")])
        finally:
            cl.close()
        dm.device_node(info)

    def remove(self, name: str) -> None:
        self.ctl.remove(name)
        os.unlink(os.path.join(self.base, f"{name}.cow"))

    def close(self) -> None:
        self.tl.close()


def _ctx(store: Store, vid: str) -> VolumeCtx:
    """A context for the backend alone: no registry callbacks (record/forget/step do nothing)."""
    t = store.registry.get_template("floor")
    from cowdisk.backends import TemplateRef

    return VolumeCtx(id=vid, template=TemplateRef(t.id, t.path, t.size), data_dir=store.vol_dir(vid),
                     tag=store.tag, dm_name=store.dm_prefix + vid)


def commits(s: Store, fn: Callable[[], object]) -> list[str]:
    """The registry commits ``fn`` makes, each named by the first statement of its
    transaction and marked ``(durable)`` when it waits for the disk (synchronous=FULL: an
    fsync of the WAL) or ``(relaxed)`` when it does not (synchronous=NORMAL; see the
    power-loss argument in docs/architecture.md)."""
    seen: list[str] = []
    first: list[str] = []
    relaxed = [False]

    def trace(sql: str) -> None:
        q = " ".join(sql.split()).upper()
        if q == "PRAGMA SYNCHRONOUS=NORMAL":
            relaxed[0] = True
        elif q == "PRAGMA SYNCHRONOUS=FULL":
            relaxed[0] = False
        elif q.startswith("BEGIN"):
            first.clear()
        elif q.startswith("COMMIT"):
            seen.append(f"{first[0] if first else '?'} ({'relaxed' if relaxed[0] else 'durable'})")
        elif not first and q.startswith(("INSERT", "UPDATE", "DELETE", "REPLACE")):
            first.append(" ".join(q.split()[:4]).lower())

    c = s.registry._conn()
    c.set_trace_callback(trace)
    try:
        fn()
    finally:
        c.set_trace_callback(None)
    return seen


COMMITS: dict[str, dict[str, list[str]]] = {}


def floor_site(label: str, backend: str, opts: dict[str, str], args: argparse.Namespace, base: str) -> list[list[str]]:
    root = os.path.join(base, f"floor-{backend}-{len(opts)}")
    s = Store(root, backend=backend, backend_options=opts)
    rows = []
    try:
        src = os.path.join(base, "floor.img")
        bu.make_template(src, args.floor_size, "scattered")
        t = s.import_template(src, "floor")
        os.unlink(src)
        s.create_volume("warm", t.id)  # the template's thin (or loop) exists from here on
        if backend == "dm-thin":
            origin = int(open(os.path.join(s.backend.tdir, t.id)).read().split()[0])  # type: ignore[attr-defined]
            floor: ThinFloor | SnapFloor = ThinFloor(s, origin, t.size, opts.get("discard_on_remove") != "no")
        else:
            floor = SnapFloor(s, t.path, t.size, root)
        COMMITS[label] = {"create": commits(s, lambda: s.create_volume("c0", t.id)),
                          "remove": commits(s, lambda: s.remove_volume("c0"))}
        existing = 1
        for target in (1, args.existing):
            while existing < target:
                s.create_volume(f"e{existing:05d}", t.id)
                existing += 1
            times: dict[str, list[float]] = {"store": [], "backend": [], "floor": []}

            def store_side(i: int) -> None:
                s.create_volume(f"b{i}", t.id)
                s.remove_volume(f"b{i}")

            def backend_side(i: int) -> None:
                ctx = _ctx(s, f"k{i}")
                s.backend.create(ctx)
                s.backend.detach(ctx)
                s.backend.destroy(ctx)
                os.rmdir(ctx.data_dir)

            def floor_side(i: int) -> None:
                floor.create(f"{s.dm_prefix}f{i}")
                floor.remove(f"{s.dm_prefix}f{i}")

            sides: list[tuple[str, Callable[[int], None]]] = [("store", store_side), ("backend", backend_side),
                                                              ("floor", floor_side)]
            for i in range(args.warmup + args.iterations):
                order = sides if i % 2 == 0 else list(reversed(sides))
                for name, fn in order:
                    dt = bu.timed(lambda: fn(i))
                    if i >= args.warmup:
                        times[name].append(dt)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            rows.append([label, str(existing), bu.fmt_ms(med["store"]), bu.fmt_ms(med["backend"]),
                         bu.fmt_ms(med["floor"]), f"{med['store'] / med['floor']:.2f}x",
                         f"{med['backend'] / med['floor']:.2f}x"])
            print(f"  {label} at {existing}: store {med['store']:.1f} ms, backend {med['backend']:.1f} ms, "
                  f"floor {med['floor']:.1f} ms", flush=True)
        if isinstance(floor, SnapFloor):
            floor.close()
    finally:
        s.destroy()
        s.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--sections", default="fio,floor")
    ap.add_argument("--paths", default="", help="comma list of substrings of the fio paths to run")
    ap.add_argument("--fio-size", type=bu.parse_size, default=256 * MiB)
    ap.add_argument("--fio-runtime", type=int, default=4)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--floor-size", type=bu.parse_size, default=64 * MiB)
    ap.add_argument("-n", "--iterations", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--existing", type=int, default=200, help="the second point: this many volumes on the host")
    ap.add_argument("--floor-backends", default="dm-thin,dm-thin-nodiscard,dm-snapshot")
    ap.add_argument("--dir", default=os.environ.get("COWDISK_LAB_SCRATCH") or None)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("needs root")
    if not bu.dm_available():
        ap.error("needs device-mapper: run it in the kernel lab (see bench/README.md)")
    bu.sigterm_as_interrupt()
    tag = bu.new_tag()
    print(f"cowdisk dm paths {tag}: kernel {os.uname().release}, {os.cpu_count()} CPUs, "
          f"{'kernel lab (QEMU TCG)' if bu.in_lab() else 'host'}, load {os.getloadavg()[0]:.1f}", flush=True)
    out: dict[str, object] = {"tag": tag, "kernel": os.uname().release}
    t_all = time.monotonic()
    with bu.workdir(tag, args.dir) as base:
        sections = args.sections.split(",")
        if "fio" in sections:
            res = sec_fio(args, base, tag)
            out["fio"] = res
            print_fio(res, args)
        if "floor" in sections:
            rows = []
            specs = {"dm-thin": ("dm-thin", {}), "dm-thin-nodiscard": ("dm-thin", {"discard_on_remove": "no"}),
                     "dm-snapshot": ("dm-snapshot", {})}
            for name in args.floor_backends.split(","):
                backend, opts = specs[name]
                rows += floor_site(name, backend, opts, args, base)
            out["floor"] = rows
            print(f"\n== create + remove, {args.floor_size // MiB} MiB template, median of {args.iterations} "
                  f"(+{args.warmup} warm-up), alternating: Store vs backend alone vs the kernel floor ==")
            bu.table(["backend", "volumes", "Store", "backend only", "kernel floor", "Store/floor",
                      "backend/floor"], rows)
            print("\nregistry commits (durable: an fsync of the WAL; named by the first statement of the "
                  "transaction):")
            for label, ops in COMMITS.items():
                for op, seen in ops.items():
                    durable = sum(x.endswith("(durable)") for x in seen)
                    print(f"  {label} {op}: {len(seen)}, {durable} durable: {'; '.join(seen)}")
            out["commits"] = COMMITS
    left = [n for n in bu.dm_names("cowdisk-") if tag in n] + [li.path for li in loop.list_loops() if tag in li.backing_file]
    print(f"\n[total {time.monotonic() - t_all:.0f} s; leak check: {'LEFT ' + ', '.join(left) if left else 'nothing of this run left'}]")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 1 if left else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
