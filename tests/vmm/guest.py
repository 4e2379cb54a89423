#!/usr/bin/env python3
"""Build and cache a tiny Linux guest for VMM end-to-end tests (stdlib only).

The guest is Debian's ``linux-image-*-amd64`` kernel, an initramfs made of
busybox-static that loads virtio_pci, virtio_mmio, virtio_blk and ext4 (with dependencies)
and ``switch_root``s into ``/dev/vda``, and a rootfs *directory* (busybox, an
``/sbin/init`` script, a few directories) from which an ext4 template is made
with ``mkfs.ext4 -d DIR`` (see :func:`make_ext4_image`; cowdisk's
``template build`` does the same from the same directory).

Artifacts are cached under ``$COWDISK_VMM_CACHE`` (default
``/var/cache/cowdisk-vmm``), keyed on the kernel package name and version plus
a hash of this recipe, and published atomically (staging dir + rename under a
lock), so concurrent builders never see half a guest.

The guest speaks a line protocol on its serial console (``/dev/ttyS0``):

* at boot, if ``/data/a`` does not exist it writes the boot id to it and syncs,
  then prints ``COWDISK-READY <bootid>``;
* the host sends ``CMD <tag> <verb> [args...]``; the guest answers one line
  ``COWDISK-OK <tag> [result]`` or ``COWDISK-ERR <tag> <message>``.

Verbs: ``ping``; ``bootid`` (the boot id the guest remembered at boot, from its
memory, so after a migrate-restore it is the original boot's); ``cat NAME``
(one line: the content of /data/NAME); ``write NAME VALUE`` (writes VALUE to
/data/NAME, syncs); ``put NAME VALUE`` (the same without sync: the file may be
in the guest's page cache only); ``write2`` (writes ``/data/b`` = "<bootid> <content of
/data/a>", syncs, answers with that content); ``ls`` (names in /data); ``sum PATH [N]``
(the SHA-256 of any file in the guest, or of its first N bytes, read through its disk);
``poweroff`` (syncs, remounts / read-only, powers off).

CLI: ``python3 tests/vmm/guest.py build`` builds (or finds) the guest and
prints its paths as JSON; ``image OUT`` also makes an ext4 image from it.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, asdict
from pathlib import Path

DEFAULT_CACHE = "/var/cache/cowdisk-vmm"
LAB_CACHE = "/var/cache/cowdisk-lab"
META_PACKAGE = "linux-image-amd64"
BUSYBOX = "/bin/busybox"  # busybox-static's statically linked binary

# Modules the initramfs loads, in this order, each with its dependencies first.
# virtio_mmio: the transport of QEMU's microvm machine (no PCI bus)
ROOT_MODULES = ("virtio_pci", "virtio_mmio", "virtio_blk", "crc32c_generic", "ext4")

READY = "COWDISK-READY"
OK = "COWDISK-OK"
ERR = "COWDISK-ERR"

INITRAMFS_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "cowdisk-initramfs: loading modules"
for m in $(cat /lib/modules/order); do
    insmod "/lib/modules/$m" 2>/dev/null || echo "cowdisk-initramfs: insmod $m failed (ignored)"
done
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    if [ "$i" -gt 300 ]; then
        echo "COWDISK-PANIC no /dev/vda"
        poweroff -f
    fi
    sleep 0.1
done
mkdir -p /newroot
if ! mount -t ext4 -o rw /dev/vda /newroot; then
    echo "COWDISK-PANIC cannot mount /dev/vda"
    poweroff -f
fi
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /sbin/init
echo "COWDISK-PANIC switch_root failed"
poweroff -f
"""

GUEST_INIT = r"""#!/bin/sh
# cowdisk VMM test guest: PID 1. Line protocol on /dev/ttyS0 (see tests/vmm/guest.py).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
grep -q " /dev " /proc/mounts || mount -t devtmpfs devtmpfs /dev
mount -o remount,rw / 2>/dev/null
mkdir -p /data /tmp
TTY=/dev/ttyS0
stty -F "$TTY" -echo 2>/dev/null
exec <"$TTY" >"$TTY" 2>&1
BOOTID=$(cat /proc/sys/kernel/random/boot_id)
if [ ! -e /data/a ]; then
    echo "$BOOTID" >/data/a.tmp && sync && mv /data/a.tmp /data/a && sync
fi
echo "COWDISK-READY $BOOTID"
while :; do
    if ! read -r kw tag verb a1 a2; then
        sleep 1
        continue
    fi
    [ "$kw" = CMD ] || continue
    case "$verb" in
    ping) echo "COWDISK-OK $tag pong" ;;
    bootid) echo "COWDISK-OK $tag $BOOTID" ;;
    cat)
        if [ -f "/data/$a1" ]; then
            echo "COWDISK-OK $tag $(cat "/data/$a1")"
        else
            echo "COWDISK-ERR $tag no such file $a1"
        fi ;;
    write)
        if echo "$a2" >"/data/$a1" && sync; then
            echo "COWDISK-OK $tag wrote $a1"
        else
            echo "COWDISK-ERR $tag write failed $a1"
        fi ;;
    put)
        if echo "$a2" >"/data/$a1"; then
            echo "COWDISK-OK $tag put $a1"
        else
            echo "COWDISK-ERR $tag put failed $a1"
        fi ;;
    write2)
        v="$BOOTID $(cat /data/a 2>/dev/null)"
        if echo "$v" >/data/b && sync; then
            echo "COWDISK-OK $tag $v"
        else
            echo "COWDISK-ERR $tag write2 failed"
        fi ;;
    ls) echo "COWDISK-OK $tag $(ls /data | tr '\n' ' ')" ;;
    sum)
        if [ -n "$a2" ]; then h=$(head -c "$a2" "$a1" | sha256sum); else h=$(sha256sum "$a1"); fi
        if [ -n "$h" ]; then
            echo "COWDISK-OK $tag ${h%% *}"
        else
            echo "COWDISK-ERR $tag read failed $a1"
        fi ;;
    poweroff)
        sync
        echo "COWDISK-OK $tag poweroff"
        mount -o remount,ro / 2>/dev/null
        sync
        poweroff -f ;;
    *) echo "COWDISK-ERR $tag unknown verb $verb" ;;
    esac
done
"""

ROOTFS_DIRS = ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp",
               "data", "etc", "root", "run", "mnt")

# Bump when the recipe changes in a way the hash below cannot see.
RECIPE_VERSION = "1"


@dataclass(frozen=True)
class Guest:
    """Paths of a built guest (all inside the cache; never modify them)."""

    kernel: str          # vmlinuz
    initrd: str          # initramfs (newc cpio, gzip)
    rootfs_dir: str      # directory to turn into an ext4 template
    kernel_version: str  # uname -r of the guest kernel, e.g. 6.1.0-56-amd64
    package: str         # e.g. linux-image-6.1.0-56-amd64
    package_version: str # e.g. 6.1.192-2
    key: str             # cache key (directory name)
    cmdline: str         # kernel command line to use with it

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


DEFAULT_CMDLINE = ("console=ttyS0 root=/dev/vda rw panic=-1 quiet loglevel=1 "
                   "printk.devkmsg=off i8042.noaux i8042.nokbd tsc=reliable")


def cache_root() -> Path:
    return Path(os.environ.get("COWDISK_VMM_CACHE", DEFAULT_CACHE))


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{' '.join(cmd)} failed ({e.returncode}): "
                           f"{(e.stderr or e.stdout or '').strip()[-2000:]}") from None


def resolve_kernel_package() -> tuple[str, str]:
    """(package, version) of the kernel package ``linux-image-amd64`` depends on.

    ``$COWDISK_VMM_KERNEL_PKG`` overrides the package name.
    """
    pkg = os.environ.get("COWDISK_VMM_KERNEL_PKG")
    if not pkg:
        out = _run(["apt-cache", "depends", META_PACKAGE]).stdout
        m = re.search(r"^\s*Depends:\s*(linux-image-\S+)\s*$", out, re.M)
        if not m:
            raise RuntimeError(f"cannot find the kernel package {META_PACKAGE} depends on:\n{out}")
        pkg = m.group(1)
    out = _run(["apt-cache", "show", "--no-all-versions", pkg]).stdout
    m = re.search(r"^Version:\s*(\S+)\s*$", out, re.M)
    if not m:
        raise RuntimeError(f"no version for {pkg} in apt-cache")
    return pkg, m.group(1)


def _recipe_hash() -> str:
    h = hashlib.sha256()
    for part in (RECIPE_VERSION, INITRAMFS_INIT, GUEST_INIT, " ".join(ROOT_MODULES),
                 " ".join(ROOTFS_DIRS), DEFAULT_CMDLINE):
        h.update(part.encode())
        h.update(b"\0")
    with open(BUSYBOX, "rb") as f:
        h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:12]


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", s)


@contextlib.contextmanager
def _locked(path: Path, timeout: float = 900.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                    raise TimeoutError(f"{path} held by {holder or 'unknown'} for {timeout}s")
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _find_deb(pkg: str, version: str, debs: Path) -> Path:
    """Return a local .deb for pkg=version: our cache, the kernel lab's, or apt-get download."""
    arch_ver = _safe(version.split(":")[-1])
    name = f"{pkg}_{arch_ver}_amd64.deb"
    ours = debs / name
    if ours.is_file():
        return ours
    debs.mkdir(parents=True, exist_ok=True)
    # Share the kernel lab's download if it has the same package (read only; copy it).
    lab = Path(LAB_CACHE)
    if lab.is_dir():
        for cand in lab.rglob(f"{pkg}_*.deb"):
            try:
                info = _run(["dpkg-deb", "-f", str(cand), "Package", "Version"]).stdout
            except RuntimeError:
                continue
            if f"Package: {pkg}" in info and f"Version: {version}" in info:
                tmp = debs / f".{name}.{os.getpid()}.tmp"
                shutil.copyfile(cand, tmp)
                os.replace(tmp, ours)
                return ours
    with tempfile.TemporaryDirectory(dir=debs, prefix=".dl-") as td:
        os.chmod(td, 0o755)  # let apt's _apt user write there if it sandboxes
        _run(["apt-get", "download", f"{pkg}={version}"], cwd=td)
        got = list(Path(td).glob("*.deb"))
        if len(got) != 1:
            raise RuntimeError(f"apt-get download {pkg}={version} produced {got}")
        os.replace(got[0], ours)
    return ours


def _cpio_newc(entries: list[tuple]) -> bytes:
    """A newc cpio archive of (name, mode, data[, (rdev_major, rdev_minor)]) entries.

    Symlinks carry their target as data.
    """
    out = io.BytesIO()

    def pad(n: int) -> None:
        out.write(b"\0" * ((4 - n % 4) % 4))

    for ino, e in enumerate(list(entries) + [("TRAILER!!!", 0, b"")], start=1000):
        name, mode, data = e[0], e[1], e[2]
        rmaj, rmin = e[3] if len(e) > 3 else (0, 0)
        nb = name.encode() + b"\0"
        nlink = 2 if (mode & 0o170000) == 0o040000 else 1
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rmaj, rmin, len(nb), 0)
        out.write(("070701" + "".join(f"{v:08x}" for v in fields)).encode())
        out.write(nb)
        pad(110 + len(nb))
        out.write(data)
        pad(len(data))
    return out.getvalue()


def _module_order(moddir_root: Path, kver: str) -> list[Path]:
    order: list[Path] = []
    for mod in ROOT_MODULES:
        out = _run(["modprobe", "-d", str(moddir_root), "-S", kver, "--show-depends", mod]).stdout
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "insmod":
                p = Path(parts[1])
                if p not in order:
                    order.append(p)
            elif parts and parts[0] == "builtin":
                continue
    if not order:
        raise RuntimeError("no modules resolved for the initramfs")
    return order


def _build(pkg: str, version: str, dest: Path, debs: Path) -> None:
    deb = _find_deb(pkg, version, debs)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".x-") as td:
        x = Path(td) / "x"
        _run(["dpkg-deb", "-x", str(deb), str(x)])
        kvers = [p.name for p in (x / "lib/modules").iterdir()]
        if len(kvers) != 1:
            raise RuntimeError(f"expected one kernel version in {deb}, got {kvers}")
        kver = kvers[0]
        _run(["depmod", "-b", str(x), kver])
        mods = _module_order(x, kver)

        dest.mkdir()
        shutil.copyfile(x / "boot" / f"vmlinuz-{kver}", dest / "vmlinuz")

        # initramfs
        entries: list[tuple] = []
        for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"):
            entries.append((d, 0o040755, b""))
        entries.append(("dev/console", 0o020600, b"", (5, 1)))
        with open(BUSYBOX, "rb") as f:
            entries.append(("bin/busybox", 0o100755, f.read()))
        entries.append(("bin/sh", 0o120777, b"busybox"))
        entries.append(("init", 0o100755, INITRAMFS_INIT.encode()))
        names = []
        for p in mods:
            with open(p, "rb") as f:
                data = f.read()
            if p.suffix in (".xz", ".zst", ".gz"):
                raise RuntimeError(f"compressed module {p} not supported")
            entries.append((f"lib/modules/{p.name}", 0o100644, data))
            names.append(p.name)
        entries.append(("lib/modules/order", 0o100644, ("\n".join(names) + "\n").encode()))
        with open(dest / "initramfs.cpio.gz", "wb") as f:
            f.write(gzip.compress(_cpio_newc(entries), compresslevel=6, mtime=0))

        # rootfs directory
        r = dest / "rootfs"
        for d in ROOTFS_DIRS:
            (r / d).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(BUSYBOX, r / "bin/busybox")
        os.chmod(r / "bin/busybox", 0o755)
        applets = _run([BUSYBOX, "--list-full"]).stdout.split()
        for a in applets:
            link = r / a
            if link.exists() or link.is_symlink():
                continue
            link.parent.mkdir(parents=True, exist_ok=True)
            rel = os.path.relpath(r / "bin/busybox", link.parent)
            os.symlink(rel, link)
        (r / "sbin/init").unlink(missing_ok=True)
        (r / "sbin/init").write_text(GUEST_INIT)
        os.chmod(r / "sbin/init", 0o755)
        (r / "etc/hostname").write_text("cowdisk-guest\n")
        os.chmod(r / "tmp", 0o1777)

        meta = {"kernel_version": kver, "package": pkg, "package_version": version,
                "modules": names, "built_at": time.time()}
        (dest / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def build(cache: Path | None = None) -> Guest:
    """Return the cached guest, building it first if needed (idempotent, concurrency safe)."""
    cache = Path(cache) if cache else cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    try:
        pkg, version = resolve_kernel_package()
    except (RuntimeError, FileNotFoundError):
        # No apt metadata: use the newest guest already built, if any.
        built = sorted(cache.glob("guest-*/meta.json"), key=lambda p: p.stat().st_mtime)
        if not built:
            raise
        meta = json.loads(built[-1].read_text())
        pkg, version = meta["package"], meta["package_version"]
    key = f"guest-{_safe(pkg)}_{_safe(version)}-{_recipe_hash()}"
    dest = cache / key
    if not (dest / "meta.json").is_file():
        with _locked(cache / ".lock"):
            if not (dest / "meta.json").is_file():
                # debris from a crashed builder of this key
                for stale in cache.glob(".stage-*"):
                    _remove_if_dead(stale)
                stage = cache / f".stage-{os.getpid()}-{key}"
                shutil.rmtree(stage, ignore_errors=True)
                try:
                    stage.mkdir()
                    _build(pkg, version, stage / "g", cache / "debs")
                    if dest.exists():
                        shutil.rmtree(dest)
                    os.rename(stage / "g", dest)
                finally:
                    shutil.rmtree(stage, ignore_errors=True)
    meta = json.loads((dest / "meta.json").read_text())
    return Guest(kernel=str(dest / "vmlinuz"), initrd=str(dest / "initramfs.cpio.gz"),
                 rootfs_dir=str(dest / "rootfs"), kernel_version=meta["kernel_version"],
                 package=pkg, package_version=version, key=key, cmdline=DEFAULT_CMDLINE)


def _remove_if_dead(stage: Path) -> None:
    m = re.match(r"\.stage-(\d+)-", stage.name)
    if not m:
        return
    pid = int(m.group(1))
    try:
        os.kill(pid, 0)
        return  # alive (we hold the lock, so it is not building; leave it alone)
    except ProcessLookupError:
        shutil.rmtree(stage, ignore_errors=True)
    except PermissionError:
        return


def make_ext4_image(rootfs_dir: str | os.PathLike, out: str | os.PathLike,
                    size_mib: int = 64) -> Path:
    """Make an ext4 image at ``out`` populated from ``rootfs_dir`` (mkfs.ext4 -d).

    Stands in for ``cowdisk template build`` until tests use that.
    """
    out = Path(out)
    with open(out, "wb") as f:
        f.truncate(size_mib * 1024 * 1024)
    try:
        _run(["mkfs.ext4", "-q", "-F", "-L", "cowdisk-guest", "-E", "root_owner=0:0",
              "-d", str(rootfs_dir), str(out)])
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return out


def read_file(image: str | os.PathLike, path: str) -> bytes | None:
    """Content of ``path`` inside an ext4 image (debugfs, no mount), None if absent."""
    p = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)],
                       capture_output=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"debugfs on {image} failed: {p.stderr.decode(errors='replace')}")
    err = p.stderr.decode(errors="replace")
    if "File not found" in err or "not found by ext2_lookup" in err:
        return None
    return p.stdout


def main(argv: list[str]) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="guest.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or find) the cached guest, print its paths")
    b.add_argument("--cache", help=f"cache dir (default $COWDISK_VMM_CACHE or {DEFAULT_CACHE})")
    i = sub.add_parser("image", help="build the guest and make an ext4 image of its rootfs")
    i.add_argument("out")
    i.add_argument("--size-mib", type=int, default=64)
    i.add_argument("--cache")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    g = build(Path(args.cache) if args.cache else None)
    if args.cmd == "image":
        make_ext4_image(g.rootfs_dir, args.out, args.size_mib)
    print(g.to_json())
    print(f"({time.monotonic() - t0:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
