#!/usr/bin/env python3
"""Templates on demand (issue 25, docs/remote.md): figures for the chunked format and the
object store, on a real template.

Sections (``--sections``, comma-separated):

* ``chunks``: the chunk size. A real template (ext4 built with ``mkfs.ext4 -d`` from a
  copy of this host's /etc, /usr/sbin, /usr/bin and Python trees: ~700 MiB of real files
  in a 1 GiB image) is cut at each candidate size (``--chunk-sizes``); per size: chunks
  stored and their zstd bytes, the manifest's bytes; a *read set* standing for a boot
  (every metadata block, as ``e2image -r`` copies them, and every block of a
  deterministic 3% of the files, from ``debugfs blocks``): chunks it touches, bytes a lazy
  host fetches for it and the ratio to the bytes it reads; a *1% change* (v2 = v1 with 1%
  of its used 4 KiB blocks rewritten, in runs of 64 KiB at seeded random places): the
  chunks and bytes a push of v2 uploads; then, against the RADOS Gateway, the wall time
  of a real push of v1 and a real fetch of the read set's chunks (8 threads).

* ``lazy``: the same real template pushed at the default chunk size; on a second store
  (a second host): the time until a lazy template is served (manifest fetched, cache
  made, nbdkit started) against a local ``template import`` of the same image, then a
  second start (the manifest cached: 0 fetches); bytes fetched by a full read
  (``prefetch``) over the template's size; 4 KiB random reads (fio, psync, 4 jobs, 10 s,
  page cache dropped first) through the lazy template's file (the qemu-storage-daemon
  FUSE export Firecracker and Cloud Hypervisor get) with a full cache, against the same
  reads of the local template file, and the kernel floor: the same reads of the cache's
  own data file (the data file's pages are dropped before each run too: they are what
  the lazy file and the server read); then the two parts of the lazy file's path apart:
  the cache's data file through the same FUSE export with no NBD and no server (what any
  server could reach through that export), and the lazy template's NBD server read
  directly, one connection per job (fio's NBD engine: what the kernel's nbd device of
  the dm path reads; the device itself is lab-only).

* ``boot``: a guest boots from a template this host has never seen. The tests' tiny guest
  (tests/vmm/guest.py: Debian's kernel, a busybox root) in an ext4 of ``--template-size``
  with real host trees under /pad (as ``chunks`` builds them; the boot reads none of
  them), pushed from host A at the default chunk size. Each of ``--boot-rounds`` rounds,
  on a new host B: QEMU (TCG, q35, 256 MiB) boots to COWDISK-READY from a qcow2 overlay
  (qemu-img) over (a) the template imported on host C, a local file; (b) the lazy
  template with an empty cache, QEMU's NBD client on the URL ``template pull --lazy``
  prints; (c) the same after ``pull --lazy --prefetch`` (a full cache). Each backing's
  pages are dropped from the host's page cache first; the local boot goes first in even
  rounds, last in odd ones. Printed: the boot times and the ratios lazy / local, the
  chunks and bytes the empty-cache boot fetched over the template's size (the issue's
  goal: at most 10%) and the time its fetches took (the server's sum), and the chunks
  the full-cache boot fetched (0).

The gateway: ``--config FILE`` (a remote.toml), else a private single-node cluster with
a gateway is started in the work directory (lab/ceph_cluster.py) and ended at the end.
Run as root: ``python3 bench/remote.py``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "lab"))
sys.path.insert(0, HERE)

from benchutil import fmt_bytes, parse_size, table  # noqa: E402

from cowdisk.kernel import fs  # noqa: E402
from cowdisk.remote import config as rconfig  # noqa: E402
from cowdisk.remote.chunks import chunk_key, compress, read_chunks  # noqa: E402

if TYPE_CHECKING:
    from cowdisk.store import Store

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
TREE_SOURCES = ("/etc", "/usr/sbin", "/usr/lib/python3.11", "/usr/lib/python3", "/usr/share/zoneinfo", "/usr/bin")


def run(*argv: str) -> str:
    p = subprocess.run(list(argv), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {p.returncode}: {p.stderr.strip()[-1000:]}")
    return p.stdout


def real_template(work: str, size: int, *, base: str | None = None, under: str = "",
                  name: str = "v1.img") -> tuple[str, list[str]]:
    """An ext4 image of ``size`` built from a copy of real host trees (mkfs.ext4 -d), and
    its regular files (paths in the image, sorted). ``base``: a root tree the image starts
    from (a guest's), the host trees then go under ``under`` in it."""
    tree = os.path.join(work, "tree")
    if base is not None:
        run("cp", "-a", "--", base, tree)
    else:
        os.makedirs(tree)
    for src in TREE_SOURCES:
        if os.path.isdir(src):
            dst = os.path.join(tree, under.strip("/"), src.lstrip("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            run("cp", "-a", "--", src, dst)
    files = sorted("/" + os.path.relpath(os.path.join(d, n), tree) for d, _, names in os.walk(tree) for n in names
                   if os.path.isfile(os.path.join(d, n)) and not os.path.islink(os.path.join(d, n)))
    img = os.path.join(work, name)
    run("mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0,lazy_itable_init=0", "-d", tree, img, str(size // KiB) + "K")
    shutil.rmtree(tree)
    return img, files


def read_set(img: str, files: list[str], work: str) -> set[int]:
    """4 KiB block numbers a boot-like read touches: all metadata and every 33rd file's blocks."""
    meta = os.path.join(work, "meta.img")
    run("e2image", "-r", img, meta)
    blocks: set[int] = set()
    fd = os.open(meta, os.O_RDONLY)
    try:
        for off, length in fs.data_segments(fd, os.fstat(fd).st_size):
            blocks.update(range(off // 4096, (off + length + 4095) // 4096))
    finally:
        os.close(fd)
        os.unlink(meta)
    cmds = os.path.join(work, "cmds")
    with open(cmds, "w") as f:
        for p in files[::33]:
            f.write(f'blocks "{p}"\n')
    for line in run("debugfs", "-f", cmds, img).splitlines():
        if not line.startswith("debugfs"):
            blocks.update(int(b) for b in line.split() if b.isdigit())
    return blocks


def changed_copy(img: str, out: str, fraction: float, run_bytes: int = 64 * KiB, seed: int = 25) -> int:
    """``out`` = ``img`` with ``fraction`` of its used 4 KiB blocks rewritten (random data), in
    runs of ``run_bytes`` at seeded random places inside its data; returns the bytes changed."""
    run("cp", "--sparse=always", img, out)
    fd = os.open(out, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        segs = list(fs.data_segments(fd, size))
        used = sum(length for _, length in segs)
        want = int(used * fraction) // run_bytes * run_bytes
        rng = random.Random(seed)
        done = 0
        while done < want:
            off, length = rng.choice(segs)
            if length < run_bytes:
                continue
            pos = off + rng.randrange(0, length - run_bytes + 1) // 4096 * 4096
            os.pwrite(fd, rng.randbytes(run_bytes), pos)
            done += run_bytes
        os.fsync(fd)
    finally:
        os.close(fd)
    return done


def cut(img: str, cs: int) -> tuple[list[str | None], dict[str, bytes]]:
    """The chunk names of ``img`` at chunk size ``cs`` and each distinct chunk's zstd bytes."""
    names: list[str | None] = []
    blobs: dict[str, bytes] = {}
    fd = os.open(img, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pending: dict[str, cf.Future[bytes]] = {}
        with cf.ThreadPoolExecutor(4) as pool:
            for _, data in read_chunks(fd, size, cs):
                if data is None:
                    names.append(None)
                    continue
                n = hashlib.sha256(data).hexdigest()
                names.append(n)
                if n not in pending:
                    pending[n] = pool.submit(compress, data)
            blobs = {n: f.result() for n, f in pending.items()}
    finally:
        os.close(fd)
    return names, blobs


def section_chunks(args: argparse.Namespace, work: str, cfg: rconfig.RemoteConfig) -> list[dict[str, object]]:
    from cowdisk.remote.s3 import ObjectStore
    from cowdisk.remote.transfer import push

    t0 = time.monotonic()
    v1, files = real_template(work, parse_size(args.template_size))
    fd = os.open(v1, os.O_RDONLY)
    used = sum(length for _, length in fs.data_segments(fd, os.fstat(fd).st_size))
    size = os.fstat(fd).st_size
    os.close(fd)
    print(f"template: {fmt_bytes(size)}, {fmt_bytes(used)} allocated, built in {time.monotonic() - t0:.0f} s",
          file=sys.stderr)
    rs = read_set(v1, files, work)
    rs_bytes = len(rs) * 4096
    v2 = os.path.join(work, "v2.img")
    changed = changed_copy(v1, v2, 0.01)
    print(f"read set: {len(rs)} blocks ({fmt_bytes(rs_bytes)}); v2: {fmt_bytes(changed)} changed", file=sys.stderr)
    from cowdisk.digest import sha256_file

    digest = sha256_file(v1)
    rows: list[dict[str, object]] = []
    for cs in [parse_size(s) for s in args.chunk_sizes.split(",")]:
        names1, blobs1 = cut(v1, cs)
        names2, blobs2 = cut(v2, cs)
        touched = {b * 4096 // cs for b in rs}
        rs_chunks = {names1[i] for i in touched if names1[i] is not None}
        new = set(blobs2) - set(blobs1)
        manifest_bytes = len(json.dumps({"chunks": names1}, separators=(",", ":")))
        objects = ObjectStore(cfg.at(f"s3://{cfg.bucket}/bench-{os.getpid()}-{cs}"))
        t = time.monotonic()
        push(v1, digest, objects, cs)
        push_s = time.monotonic() - t
        t = time.monotonic()
        with cf.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: objects.get(objects.cfg.key(chunk_key(n))), rs_chunks))
        fetch_s = time.monotonic() - t
        row = {"chunk": cs, "chunks": len(names1), "stored": len(blobs1),
               "stored_bytes": sum(len(b) for b in blobs1.values()), "manifest_bytes": manifest_bytes,
               "read_chunks": len(rs_chunks), "read_fetch_bytes": sum(len(blobs1[n]) for n in rs_chunks),
               "read_raw_bytes": len(rs_chunks) * cs, "read_set_bytes": rs_bytes,
               "delta_chunks": len(new), "delta_bytes": sum(len(blobs2[n]) for n in new), "size": size,
               "push_s": round(push_s, 2), "fetch_s": round(fetch_s, 2)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    table(["chunk", "stored chunks", "stored (zstd)", "manifest", "read set: chunks", "fetched (zstd)",
           "fetched / read", "fetched / size", "1% change: chunks", "uploaded (zstd)", "uploaded / size",
           "push (s)", "fetch read set (s)"],
          [[fmt_bytes(int(r["chunk"])), str(r["stored"]), fmt_bytes(int(r["stored_bytes"])),  # type: ignore[call-overload]
            fmt_bytes(int(r["manifest_bytes"])), str(r["read_chunks"]), fmt_bytes(int(r["read_fetch_bytes"])),  # type: ignore[call-overload]
            f"{int(r['read_fetch_bytes']) / rs_bytes:.2f}x", f"{100 * int(r['read_fetch_bytes']) / size:.1f}%",  # type: ignore[call-overload]
            str(r["delta_chunks"]), fmt_bytes(int(r["delta_bytes"])),  # type: ignore[call-overload]
            f"{100 * int(r['delta_bytes']) / size:.2f}%", str(r["push_s"]), str(r["fetch_s"])]  # type: ignore[call-overload]
           for r in rows])
    return rows


def host_store(work: str, name: str, cfg: rconfig.RemoteConfig, prefix: str) -> "Store":
    """A store (copy backend) at ``<work>/<name>``, a host of its own, with the remote config
    of ``cfg`` at ``prefix`` (the default chunk size)."""
    from cowdisk.store import Store

    root = os.path.join(work, name)
    os.makedirs(root)
    with open(os.path.join(root, "remote.toml"), "w") as f:
        f.write("[remote]\n" + "".join(f'{k} = {json.dumps(v)}\n' for k, v in {
            "endpoint": cfg.endpoint, "access_key": cfg.access_key, "secret_key": cfg.secret_key,
            "bucket": cfg.bucket, "region": cfg.region, "prefix": prefix}.items()))
    os.chmod(os.path.join(root, "remote.toml"), 0o600)
    return Store(root, backend="copy")


def fio_randread(target: str, runtime: int) -> float:
    """IOPS of 4 KiB random reads of ``target`` (4 jobs, psync, buffered with the page cache
    dropped first: a FUSE file may refuse O_DIRECT); an ``nbd+unix://`` URL is read by fio's
    NBD engine instead, one connection per job (as the kernel's nbd device of the dm path
    connects to the server: multi-conn)."""
    argv = ["fio", "--name=r", "--rw=randread", "--bs=4k", "--numjobs=4", "--group_reporting",
            f"--runtime={runtime}", "--time_based", "--readonly", "--output-format=json"]
    if target.startswith("nbd+unix://"):
        argv += ["--ioengine=nbd", f"--uri={target}"]
    else:
        argv += [f"--filename={target}", "--ioengine=psync", "--invalidate=1"]
    out = run(*argv)
    return float(json.loads(out[out.index("{"):])["jobs"][0]["read"]["iops"])  # the nbd engine prints a line first


def export_plain(path: str, mountpoint: str, pidfile: str) -> None:
    """``path`` exported as the file ``mountpoint`` by qemu-storage-daemon's FUSE export
    reading it directly (no NBD, no server): the ceiling of the export the lazy file uses."""
    with open(mountpoint, "a"):
        pass
    run("qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f,filename={path},read-only=on",
        "--export", f"type=fuse,id=e,node-name=f,mountpoint={mountpoint},writable=off", "--pidfile", pidfile,
        "--daemonize")


LAZY_FILE = "lazy (FUSE file, full cache)"
PLAIN_FILE = "cache data file through the same FUSE export, no NBD (the export's ceiling)"
LAZY_NBD = "lazy NBD server, 4 connections (what the dm path's nbd device reads)"


def section_lazy(args: argparse.Namespace, work: str, cfg: rconfig.RemoteConfig) -> dict[str, object]:
    from cowdisk.remote import lazy

    v1 = os.path.join(work, "v1.img")
    if not os.path.exists(v1):
        v1, _ = real_template(work, parse_size(args.template_size))
    prefix = f"bench-lazy-{os.getpid()}"
    a, b, c = (host_store(work, name, cfg, prefix) for name in ("host-a", "host-b", "host-c"))
    out: dict[str, object] = {}
    f, pidf = os.path.join(work, "lazy.img"), os.path.join(work, "qsd.pid")
    plain, plain_pid = os.path.join(work, "data-fuse.img"), os.path.join(work, "qsd-data.pid")
    try:
        a.import_template(v1, "base")
        t = time.monotonic()
        r = a.push_template("base")
        out["push_s"] = round(time.monotonic() - t, 2)
        t = time.monotonic()
        c.import_template(v1, "base")
        out["local_import_s"] = round(time.monotonic() - t, 3)
        t = time.monotonic()
        d = b.lazy_template(r["url"])
        out["lazy_ready_s"] = round(time.monotonic() - t, 3)
        b.stop_lazy_template(d["manifest"])
        t = time.monotonic()
        d = b.lazy_template(d["manifest"])
        out["lazy_ready_again_s"] = round(time.monotonic() - t, 3)
        out["fetched_before_reads"] = d["stats"].get("fetched_chunks", 0)
        t = time.monotonic()
        d = b.lazy_template(d["manifest"], prefetch=True)
        out["prefetch_s"] = round(time.monotonic() - t, 2)
        size = int(d["size"])
        out["size"] = size
        out["cached_bytes"] = d["cached_bytes"]
        fetched_after_prefetch = int(lazy.stats(d["cache"]).get("fetched_chunks", 0))
        served = lazy.server(d["cache"])
        assert served is not None
        lazy.export_file(served, f, pidf)
        export_plain(os.path.join(d["cache"], "data"), plain, plain_pid)
        targets = {LAZY_FILE: f, "local template file": c.template("base").path,
                   "cache data file (floor)": os.path.join(d["cache"], "data"), PLAIN_FILE: plain, LAZY_NBD: served.url}
        iops: dict[str, list[float]] = {k: [] for k in targets}
        for _ in range(args.rounds):
            for k, target in targets.items():
                drop_page_cache(os.path.join(d["cache"], "data"))  # under the lazy file and the server too
                iops[k].append(fio_randread(target, args.fio_runtime))
        out["iops"] = {k: round(sum(v) / len(v)) for k, v in iops.items()}
        st = lazy.stats(d["cache"])
        out["fetched_during_reads"] = st.get("fetched_chunks", 0) - fetched_after_prefetch
    finally:
        lazy.unexport_file(f, pidf)
        lazy.unexport_file(plain, plain_pid)
        for s in (a, b, c):
            s.destroy()
            s.close()
    i = out["iops"]
    assert isinstance(i, dict)
    table(["what", "figure"], [
        ["push of the template (s)", str(out["push_s"])],
        ["local `template import` on host C (s)", str(out["local_import_s"])],
        ["lazy template served on host B, first time (manifest fetched, nbdkit started) (s)", str(out["lazy_ready_s"])],
        ["again, manifest cached (s); chunks fetched", f"{out['lazy_ready_again_s']}; {out['fetched_before_reads']}"],
        ["prefetch of every chunk (s); cached / size",
         f"{out['prefetch_s']}; {int(str(out['cached_bytes'])) / size:.1%}"],
        *[[f"4 KiB random reads, IOPS: {k}", str(v)] for k, v in i.items()],
        ["chunks fetched during the reads (a full cache: 0)", str(out["fetched_during_reads"])],
        *[[f"{k} / local", f"{i[k] / max(1, i['local template file']):.2f}x"] for k in (LAZY_FILE, PLAIN_FILE, LAZY_NBD)]])
    return out


def drop_page_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def section_boot(args: argparse.Namespace, work: str, cfg: rconfig.RemoteConfig) -> dict[str, object]:
    """The tests' tiny guest (tests/vmm/guest.py) in a ``--template-size`` ext4 with real host
    trees under /pad, pushed from host A; each round on a new host B: QEMU (TCG) boots to
    COWDISK-READY from a qcow2 overlay over (a) the template imported on host C (a local
    file), (b) the lazy template with an empty cache (the URL ``pull --lazy`` prints), (c)
    the same after ``--prefetch`` (a full cache). Boot: QEMU started to COWDISK-READY; each
    backing's pages dropped from the host's page cache first."""
    import statistics

    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    from vmm import guest as guestlib
    from vmm.qemu import Vm, lazy_overlay, overlay, qcow2_drive

    guest = guestlib.build()
    t0 = time.monotonic()
    img, _ = real_template(work, parse_size(args.template_size), base=guest.rootfs_dir, under="pad",
                           name="guest.img")
    fd = os.open(img, os.O_RDONLY)
    size = os.fstat(fd).st_size
    allocated = sum(length for _, length in fs.data_segments(fd, size))
    os.close(fd)
    print(f"guest template: {fmt_bytes(size)}, {fmt_bytes(allocated)} allocated, built in "
          f"{time.monotonic() - t0:.0f} s", file=sys.stderr)
    prefix = f"bench-boot-{os.getpid()}"
    a, c = host_store(work, "boot-a", cfg, prefix), host_store(work, "boot-c", cfg, prefix)
    stores = [a, c]

    def boot(backing_overlay: str, name: str, drop: str) -> float:
        drop_page_cache(drop)
        with Vm(guest, backing_overlay, work, name=name, drive_args=qcow2_drive(backing_overlay)) as vm:
            vm.wait_ready(timeout=300)
            took = float(vm.times["boot"])
        os.unlink(backing_overlay)
        return took

    rounds: list[dict[str, float | int]] = []
    try:
        a.import_template(img, "guest")
        t = time.monotonic()
        url = a.push_template("guest")["url"]
        push_s = time.monotonic() - t
        c.import_template(img, "guest")
        local = c.template("guest").path
        os.unlink(img)
        for r in range(args.boot_rounds):
            b = host_store(work, f"boot-b{r}", cfg, prefix)
            stores.append(b)
            row: dict[str, float | int] = {}
            if r % 2 == 0:  # the local boot first in even rounds, last in odd ones
                row["local_s"] = boot(overlay(local, os.path.join(work, "local.qcow2")), f"local{r}", local)
            d = b.lazy_template(url)
            data = os.path.join(d["cache"], "data")
            row["empty_s"] = boot(lazy_overlay(d["url"], os.path.join(work, "empty.qcow2")), f"empty{r}", data)
            d = b.lazy_templates()[0]
            row.update(fetched_chunks=d["stats"]["fetched_chunks"], fetched_bytes=d["stats"]["fetched_bytes"],
                       cached_bytes=d["cached_bytes"], data_chunks=d["data_chunks"],
                       fetch_sum_s=d["stats"]["fetch_sum"])
            t = time.monotonic()
            d = b.lazy_template(url, prefetch=True)
            row["prefetch_s"] = time.monotonic() - t
            before = b.lazy_templates()[0]["stats"]["fetched_chunks"]
            row["full_s"] = boot(lazy_overlay(d["url"], os.path.join(work, "full.qcow2")), f"full{r}", data)
            row["full_fetched_chunks"] = b.lazy_templates()[0]["stats"]["fetched_chunks"] - before
            if r % 2 == 1:
                row["local_s"] = boot(overlay(local, os.path.join(work, "local.qcow2")), f"local{r}", local)
            rounds.append(row)
            print(json.dumps(row), file=sys.stderr)
    finally:
        for s in stores:
            s.destroy()
            s.close()
    med = {k: statistics.median(float(r[k]) for r in rounds) for k in rounds[0]}
    cols = [f"round {i + 1}" for i in range(len(rounds))] + ["median"]  # ratios: of the medians

    def line(what: str, key: str, f: str = "{:.2f}") -> list[str]:
        return [what, *(f.format(r[key]) for r in rounds), f.format(med[key])]

    def ratio(what: str, key: str) -> list[str]:
        return [what, *(f"{float(r[key]) / float(r['local_s']):.2f}x" for r in rounds),
                f"{med[key] / med['local_s']:.2f}x"]

    table(["what", *cols], [
        line("boot to COWDISK-READY (s): local template", "local_s"),
        line("boot (s): lazy, empty cache", "empty_s"),
        line("boot (s): lazy, full cache (after prefetch)", "full_s"),
        ratio("lazy empty / local", "empty_s"),
        ratio("lazy full / local", "full_s"),
        line("empty-cache boot: chunks fetched", "fetched_chunks", "{:.0f}"),
        ["empty-cache boot: chunk bytes fetched / template size (goal <= 10%)",
         *(f"{int(r['cached_bytes']) / size:.1%}" for r in rounds), f"{med['cached_bytes'] / size:.1%}"],
        ["empty-cache boot: bytes transferred (zstd)", *(fmt_bytes(int(r["fetched_bytes"])) for r in rounds),
         fmt_bytes(int(med["fetched_bytes"]))],
        line("empty-cache boot: time in fetches (s, sum; each waits for the gateway)", "fetch_sum_s"),
        line("full-cache boot: chunks fetched", "full_fetched_chunks", "{:.0f}"),
        line("prefetch of the rest (s)", "prefetch_s")])
    print(f"template {fmt_bytes(size)} ({fmt_bytes(allocated)} allocated, {rounds[0]['data_chunks']} data chunks), "
          f"pushed in {push_s:.1f} s")
    return {"size": size, "allocated": allocated, "push_s": round(push_s, 2), "rounds": rounds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default="chunks")
    ap.add_argument("--chunk-sizes", default="256K,1M,4M")
    ap.add_argument("--template-size", default="1G")
    ap.add_argument("--config", help="a remote.toml (default: start a private cluster with a gateway)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--rounds", type=int, default=2, help="lazy: fio rounds, alternating lazy and local")
    ap.add_argument("--fio-runtime", type=int, default=10)
    ap.add_argument("--boot-rounds", type=int, default=3, help="boot: rounds (a new host B each)")
    ap.add_argument("--workdir", help="where to work (default: a new directory under /var/tmp)")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="cdbench-remote-", dir=args.workdir or "/var/tmp")
    cluster = None
    try:
        if args.config:
            cfg = rconfig.read(args.config)
        else:
            from ceph_cluster import Cluster

            cluster = Cluster(os.path.join(work, "ceph"), die_with_parent=True)
            cluster.up()
            cfg = rconfig.from_dict(cluster.start_rgw())
        out: dict[str, object] = {}
        if "chunks" in args.sections.split(","):
            out["chunks"] = section_chunks(args, work, cfg)
        if "lazy" in args.sections.split(","):
            out["lazy"] = section_lazy(args, work, cfg)
        if "boot" in args.sections.split(","):
            out["boot"] = section_boot(args, work, cfg)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
    finally:
        if cluster is not None:
            problems = cluster.down()
            if problems:
                print("cluster:", problems, file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
