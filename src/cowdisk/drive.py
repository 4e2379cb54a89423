"""Render a VMM's drive configuration for a cowdisk device or stable link path.

Pure functions (no I/O except :func:`is_block_device`, which ``qemu_blockdev`` calls only
when told neither). Give them the volume's *stable link* (``<store>/links/<volume>/rootfs``),
not the device it points at: a VM snapshot records this path, and restore retargets the
link, so the same configuration works before and after a checkpoint/restore.

=====================  ===========================================================
form                   what it is
=====================  ===========================================================
``firecracker``        the ``Drive`` object of Firecracker's API (``PUT /drives/{id}``,
                       or an entry of the config file's ``drives``); ``jail_path`` gives
                       the jailed form (the path inside the jailer's chroot)
``cloud-hypervisor``   the ``--disk`` argv of ``cloud-hypervisor``
``cloud-hypervisor-api``  the REST API's ``DiskConfig`` (``vm.create``'s ``disks[]``,
                       ``PUT /api/v1/vm.add-disk``)
``qemu``               ``-drive`` (``if=virtio`` on pc/q35; ``if=none`` + ``-device
                       virtio-blk-device`` on ``-M microvm``, which has no PCI bus)
``qemu-blockdev``      ``-blockdev`` + ``-device`` (virtio-blk-pci, or virtio-blk-device
                       on microvm)
=====================  ===========================================================

A volume of an rbd store made with ``map=none`` has no file on the host: its stable link
is a symlink whose *target text* is QEMU's rbd filename (``rbd:<pool>/[<ns>/]<image>:
id=<client>:conf=<path>``). :func:`config` reads that text (:func:`network_target`) and
gives QEMU its own rbd driver (``-drive file=rbd:...``, or ``-blockdev ...,file.driver=rbd``);
Firecracker and Cloud Hypervisor open only files and block devices, so they are refused.

Options every form takes (:class:`DriveOptions`): read-only, the drive id, a cache mode,
an I/O engine and rate limits (IOPS, bytes/s). Each VMM has its own words for cache and
engine; a value a VMM does not have, or a combination it refuses (QEMU's ``aio=native``
without O_DIRECT), raises ValueError naming the VMM and the choices.

>>> firecracker("/var/lib/cowdisk/links/vm1/rootfs")["path_on_host"]
'/var/lib/cowdisk/links/vm1/rootfs'
>>> cloud_hypervisor("/l/vm1/rootfs", readonly=True)
'--disk path=/l/vm1/rootfs,readonly=on'
>>> qemu("/l/vm1/rootfs")
['-drive', 'file=/l/vm1/rootfs,format=raw,if=virtio,cache=none,id=rootfs']
>>> qemu("/l/vm1/rootfs", machine="microvm")
['-drive', 'file=/l/vm1/rootfs,format=raw,if=none,cache=none,id=rootfs', '-device', 'virtio-blk-device,drive=rootfs']
>>> qemu_blockdev("/l/vm1/rootfs", block_device=True)[:2]
['-blockdev', 'driver=raw,node-name=rootfs,cache.direct=on,file.driver=host_device,file.filename=/l/vm1/rootfs']
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
from dataclasses import dataclass, replace
from typing import Any

__all__ = [
    "FORMATS", "MACHINES", "DriveOptions", "firecracker", "cloud_hypervisor", "cloud_hypervisor_argv",
    "cloud_hypervisor_config", "qemu", "qemu_blockdev", "rate_limiter", "config", "render", "is_block_device",
    "for_link",
]

FORMATS = ("firecracker", "cloud-hypervisor", "cloud-hypervisor-api", "qemu", "qemu-blockdev")
MACHINES = ("q35", "pc", "microvm")
# Firecracker accepts ids of 1..64 characters from [A-Za-z0-9_].
_FC_ID = re.compile(r"[A-Za-z0-9_]{1,64}")
# QEMU ids: a letter, then letters, digits, '-', '.', '_'.
_QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,127}")
# Cloud Hypervisor splits its option strings on ',' and '='; an id is used in device names.
_CH_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_QEMU_CACHE = ("none", "writeback", "writethrough", "directsync", "unsafe")
_QEMU_AIO = ("threads", "native", "io_uring")
_QEMU_IF = ("virtio", "none", "ide", "scsi", "sd", "mtd", "pflash")
_FC_CACHE = {"unsafe": "Unsafe", "writeback": "Writeback"}
_FC_ENGINE = {"sync": "Sync", "async": "Async"}
_CH_CACHE = {"none": True, "direct": True, "writeback": False}  # -> DiskConfig.direct
REFILL_MS = 1000
"""Rate limits are token buckets refilled over one second: ``size`` tokens per ``REFILL_MS``."""


@dataclass(frozen=True)
class DriveOptions:
    """What a caller may ask of any form. ``None`` means the VMM's default.

    ``cache``: QEMU ``none|writeback|writethrough|directsync|unsafe`` (default ``none``,
    O_DIRECT); Firecracker ``unsafe|writeback`` (its ``cache_type``); Cloud Hypervisor
    ``none`` (``direct=on``) or ``writeback`` (``direct=off``, its default).
    ``io_engine``: QEMU ``threads|native|io_uring`` (``aio=``); Firecracker ``sync|async``;
    Cloud Hypervisor has none to choose. ``iops``/``bandwidth`` (bytes/s) limit the drive.
    ``machine`` (QEMU only) picks the virtio transport; ``jail_path`` (Firecracker only) is
    the drive's path inside the jailer's chroot.
    """

    read_only: bool = False
    drive_id: str | None = None
    cache: str | None = None
    io_engine: str | None = None
    iops: int | None = None
    bandwidth: int | None = None
    machine: str | None = None
    jail_path: str | None = None


RBD_PREFIX = "rbd:"


def network_target(path: str | os.PathLike[str]) -> str | None:
    """QEMU's rbd filename when ``path`` is, or is a symlink whose target text is, one (an
    rbd volume with ``map=none``); None for a file or device path."""
    p = os.fspath(path)
    if isinstance(p, str) and p.startswith(RBD_PREFIX):
        return p
    try:
        target = os.readlink(p)
    except (OSError, ValueError, TypeError):
        return None
    return target if target.startswith(RBD_PREFIX) else None


def _rbd_blockdev(spec: str) -> list[str]:
    """``rbd:<pool>/[<ns>/]<image>:id=<client>:conf=<path>`` as -blockdev rbd options."""
    where, *kvs = spec[len(RBD_PREFIX):].split(":")
    parts = where.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"not an rbd filename QEMU takes: {spec!r}")
    out = [f"pool={parts[0]}", f"image={parts[-1]}"] + ([f"namespace={parts[1]}"] if len(parts) == 3 else [])
    for kv in kvs:
        k, sep, v = kv.partition("=")
        if not sep or k not in ("id", "conf"):
            raise ValueError(f"rbd filename {spec!r}: unknown option {kv!r}")
        out.append(f"{'user' if k == 'id' else 'conf'}={v.replace(',', ',,')}")
    return out


def _path(path: str | os.PathLike[str]) -> str:
    p = os.fspath(path)
    if not isinstance(p, str):
        raise TypeError(f"path must be str or os.PathLike[str], not {type(p).__name__}")
    if not p:
        raise ValueError("empty drive path")
    if any(c in p for c in "\0\n\r"):
        raise ValueError(f"drive path contains a NUL or newline: {p!r}")
    return p


def _limit(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return value


def rate_limiter(iops: int | None = None, bandwidth: int | None = None) -> dict[str, Any] | None:
    """Firecracker's ``RateLimiter`` and Cloud Hypervisor's ``RateLimiterConfig`` (the same
    shape): token buckets of ``iops`` operations and ``bandwidth`` bytes per second."""
    out: dict[str, Any] = {}
    if _limit("bandwidth", bandwidth) is not None:
        out["bandwidth"] = {"size": bandwidth, "refill_time": REFILL_MS}
    if _limit("iops", iops) is not None:
        out["ops"] = {"size": iops, "refill_time": REFILL_MS}
    return out or None


# --------------------------------------------------------------------------- Firecracker


def firecracker(path: str | os.PathLike[str], drive_id: str = "rootfs", is_root_device: bool = True,
                is_read_only: bool = False, *, cache_type: str | None = None, io_engine: str | None = None,
                iops: int | None = None, bandwidth: int | None = None,
                jail_path: str | None = None) -> dict[str, Any]:
    """Firecracker's drive object (``PUT /drives/{drive_id}`` body, or an entry of the
    config file's ``drives`` list).

    ``jail_path`` is the jailed form: under the jailer Firecracker runs chrooted, so
    ``path_on_host`` is the path inside the chroot (``cowdisk volume jail`` staged the disk
    there), e.g. ``rootfs``; ``path`` is then only checked, not used."""
    if not isinstance(drive_id, str) or not _FC_ID.fullmatch(drive_id):
        raise ValueError(f"invalid Firecracker drive_id {drive_id!r}: 1-64 of [A-Za-z0-9_]")
    p = _path(path)
    if jail_path is not None:
        jp = _path(jail_path)
        if ".." in jp.split("/"):
            raise ValueError(f"jail path {jp!r} must stay inside the jail (no '..')")
        p = jp
    d: dict[str, Any] = {
        "drive_id": drive_id,
        "path_on_host": p,
        "is_root_device": bool(is_root_device),
        "is_read_only": bool(is_read_only),
    }
    if cache_type is not None:
        c = _FC_CACHE.get(cache_type.lower())
        if c is None:
            raise ValueError(f"Firecracker's cache_type is one of {', '.join(_FC_CACHE)}, not {cache_type!r}")
        d["cache_type"] = c
    if io_engine is not None:
        e = _FC_ENGINE.get(io_engine.lower())
        if e is None:
            raise ValueError(f"Firecracker's io_engine is one of {', '.join(_FC_ENGINE)}, not {io_engine!r}")
        d["io_engine"] = e
    rl = rate_limiter(iops, bandwidth)
    if rl is not None:
        d["rate_limiter"] = rl
    return d


# --------------------------------------------------------------------------- Cloud Hypervisor


def _ch_direct(cache: str | None) -> bool | None:
    if cache is None:
        return None
    if cache not in _CH_CACHE:
        raise ValueError(f"Cloud Hypervisor's cache is none (direct=on) or writeback (direct=off), not {cache!r}")
    return _CH_CACHE[cache]


def _ch_id(disk_id: str | None) -> str | None:
    if disk_id is not None and (not isinstance(disk_id, str) or not _CH_ID.fullmatch(disk_id)):
        raise ValueError(f"invalid Cloud Hypervisor disk id {disk_id!r}: 1-64 of [A-Za-z0-9_-]")
    return disk_id


def cloud_hypervisor_config(path: str | os.PathLike[str], *, readonly: bool = False, disk_id: str | None = None,
                            cache: str | None = None, iops: int | None = None,
                            bandwidth: int | None = None) -> dict[str, Any]:
    """Cloud Hypervisor's REST API ``DiskConfig``: an entry of ``vm.create``'s ``disks``, or
    the body of ``PUT /api/v1/vm.add-disk``. Unlike the argv, any path goes here."""
    d: dict[str, Any] = {"path": _path(path), "readonly": bool(readonly)}
    direct = _ch_direct(cache)
    if direct is not None:
        d["direct"] = direct
    if _ch_id(disk_id) is not None:
        d["id"] = disk_id
    rl = rate_limiter(iops, bandwidth)
    if rl is not None:
        d["rate_limiter_config"] = rl
    return d


def cloud_hypervisor_argv(path: str | os.PathLike[str], *, readonly: bool = False, disk_id: str | None = None,
                          cache: str | None = None, iops: int | None = None,
                          bandwidth: int | None = None) -> list[str]:
    """``['--disk', 'path=...[,readonly=on][,direct=on][,id=..][,ops_size=..,...]']``."""
    p = _path(path)
    # Cloud Hypervisor splits the option on ',' and '=' with no escape.
    if "," in p or "=" in p or " " in p:
        raise ValueError(f"Cloud Hypervisor cannot take a disk path with ',', '=' or space: {p!r} "
                         "(use the API form, cloud-hypervisor-api)")
    opts = [f"path={p}"]
    if readonly:
        opts.append("readonly=on")
    direct = _ch_direct(cache)
    if direct is not None:
        opts.append(f"direct={'on' if direct else 'off'}")
    if _ch_id(disk_id) is not None:
        opts.append(f"id={disk_id}")
    if _limit("bandwidth", bandwidth) is not None:
        opts += [f"bw_size={bandwidth}", f"bw_refill_time={REFILL_MS}"]
    if _limit("iops", iops) is not None:
        opts += [f"ops_size={iops}", f"ops_refill_time={REFILL_MS}"]
    return ["--disk", ",".join(opts)]


def cloud_hypervisor(path: str | os.PathLike[str], readonly: bool = False) -> str:
    """Cloud Hypervisor's ``--disk`` argument as one string: ``--disk path=...[,readonly=on]``."""
    return " ".join(cloud_hypervisor_argv(path, readonly=readonly))


# --------------------------------------------------------------------------- QEMU


def _qemu_common(cache: str, aio: str | None, drive_id: str | None, machine: str) -> None:
    if cache not in _QEMU_CACHE:
        raise ValueError(f"invalid QEMU cache mode {cache!r}: one of {', '.join(_QEMU_CACHE)}")
    if aio is not None:
        if aio not in _QEMU_AIO:
            raise ValueError(f"invalid QEMU aio {aio!r}: one of {', '.join(_QEMU_AIO)}")
        if aio == "native" and cache not in ("none", "directsync"):
            raise ValueError(f"QEMU's aio=native needs O_DIRECT (cache none or directsync), not cache={cache}")
    if drive_id is not None and (not isinstance(drive_id, str) or not _QEMU_ID.fullmatch(drive_id)):
        raise ValueError(f"invalid QEMU drive id {drive_id!r}")
    if machine not in MACHINES:
        raise ValueError(f"unknown QEMU machine {machine!r}: one of {', '.join(MACHINES)}")


def _virtio_blk(machine: str) -> str:
    return "virtio-blk-device" if machine == "microvm" else "virtio-blk-pci"


def qemu(path: str | os.PathLike[str], *, readonly: bool = False, cache: str = "none",
         interface: str = "virtio", drive_id: str | None = "rootfs", fmt: str = "raw",
         aio: str | None = None, machine: str = "q35", iops: int | None = None,
         bandwidth: int | None = None) -> list[str]:
    """QEMU's ``-drive`` arguments as an argv fragment (``['-drive', 'file=...', ...]``).

    On ``machine="microvm"`` (no PCI bus: ``if=virtio`` would fail with "No 'PCI' bus found
    for device 'virtio-blk-pci'") the drive is ``if=none`` and a ``-device
    virtio-blk-device`` (virtio-mmio) takes it. ``cache=none`` (O_DIRECT) suits block
    devices; use ``writeback`` for files on filesystems without O_DIRECT (tmpfs). Commas
    in the path are doubled, as QEMU requires.
    """
    p = _path(path)
    _qemu_common(cache, aio, drive_id, machine)
    if interface not in _QEMU_IF:
        raise ValueError(f"invalid QEMU interface {interface!r}: one of {', '.join(_QEMU_IF)}")
    if fmt not in ("raw",):
        raise ValueError(f"cowdisk volumes are raw, not {fmt!r}")
    mmio = machine == "microvm" and interface == "virtio"
    if machine == "microvm" and interface not in ("virtio", "none"):
        raise ValueError(f"QEMU's microvm machine has no {interface} interface: use virtio")
    if mmio and drive_id is None:
        raise ValueError("on the microvm machine the drive needs an id (its -device refers to it)")
    opts = [f"file={p.replace(',', ',,')}", f"format={fmt}", f"if={'none' if mmio else interface}", f"cache={cache}"]
    if aio is not None:
        opts.append(f"aio={aio}")
    if readonly:
        opts.append("readonly=on")
    if _limit("iops", iops) is not None:
        opts.append(f"throttling.iops-total={iops}")
    if _limit("bandwidth", bandwidth) is not None:
        opts.append(f"throttling.bps-total={bandwidth}")
    if drive_id is not None:
        opts.append(f"id={drive_id}")
    argv = ["-drive", ",".join(opts)]
    if mmio:
        argv += ["-device", f"{_virtio_blk(machine)},drive={drive_id}"]
    return argv


def is_block_device(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` (followed) is a block device: QEMU's ``host_device`` driver, else ``file``."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except FileNotFoundError:
        raise ValueError(f"{os.fspath(path)!r} does not exist: cannot tell a block device (host_device) from a "
                         "file; say which (block_device=)") from None


def qemu_blockdev(path: str | os.PathLike[str], *, readonly: bool = False, cache: str = "none",
                  node_name: str = "rootfs", aio: str | None = None, machine: str = "q35",
                  block_device: bool | None = None, iops: int | None = None,
                  bandwidth: int | None = None) -> list[str]:
    """QEMU's ``-blockdev`` + ``-device`` form, the one libvirt uses.

    ``-blockdev driver=raw,node-name=N,...,file.driver=host_device|file,file.filename=PATH``
    and ``-device virtio-blk-pci,drive=N,id=N-dev`` (``virtio-blk-device`` on microvm).
    ``block_device`` picks the protocol driver (QEMU refuses ``file`` on a block device);
    ``None`` looks at the path. Cache modes map to ``cache.direct``/``cache.no-flush`` and,
    for writethrough/directsync, the device's ``write-cache=off``. Rate limits go through
    a ``throttle`` filter node and its ``-object throttle-group``.
    """
    p = _path(path)
    _qemu_common(cache, aio, node_name, machine)
    if p.startswith(RBD_PREFIX):  # QEMU's own rbd driver (an rbd volume with map=none)
        if aio is not None:
            raise ValueError("QEMU's rbd driver has no aio= to choose")
        proto = ["driver=rbd", *_rbd_blockdev(p)]
    else:
        if block_device is None:
            block_device = is_block_device(p)
        proto = [f"driver={'host_device' if block_device else 'file'}", f"filename={p.replace(',', ',,')}"]
    if aio is not None:
        proto.append(f"aio={aio}")
    objects: list[str] = []
    limits = [f"x-iops-total={iops}"] if _limit("iops", iops) is not None else []
    limits += [f"x-bps-total={bandwidth}"] if _limit("bandwidth", bandwidth) is not None else []
    if limits:  # raw -> throttle -> protocol
        group = f"{node_name}-throttle"
        objects = ["-object", ",".join(["throttle-group", f"id={group}", *limits])]
        child = ["file.driver=throttle", f"file.throttle-group={group}", *(f"file.file.{o}" for o in proto)]
    else:
        child = [f"file.{o}" for o in proto]
    opts = ["driver=raw", f"node-name={node_name}"]
    if readonly:
        opts.append("read-only=on")
    if cache in ("none", "directsync"):
        opts.append("cache.direct=on")
    if cache == "unsafe":
        opts.append("cache.no-flush=on")
    dev = [_virtio_blk(machine), f"drive={node_name}", f"id={node_name}-dev"]
    if cache in ("writethrough", "directsync"):
        dev.append("write-cache=off")
    return [*objects, "-blockdev", ",".join(opts + child), "-device", ",".join(dev)]


# --------------------------------------------------------------------------- one entry point


def _name(fmt: str) -> str:
    """``fmt`` when it is one of :data:`FORMATS`: the one set of names every face takes (the
    command line's ``--format`` choices and the API's ``format``), no aliases."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown drive format {fmt!r}: one of {', '.join(FORMATS)}")
    return fmt


def for_link(fmt: str, link: str, opts: DriveOptions, *, backend_block_device: bool) -> tuple[Any, str]:
    """(:func:`config`, :func:`render`) of a volume's stable ``link``, as every face gives them:
    a ``qemu-blockdev`` drive is a ``host_device`` or a ``file`` as the link says, or, while the
    volume is detached (no link), as its backend makes them (``backend_block_device``)."""
    block = None
    if fmt == "qemu-blockdev":
        try:
            block = is_block_device(link)
        except ValueError:
            block = backend_block_device
    return config(fmt, link, opts, block_device=block), render(fmt, link, opts=opts, block_device=block)


def config(fmt: str, path: str | os.PathLike[str], opts: DriveOptions | None = None, *,
           block_device: bool | None = None) -> Any:
    """The configuration of form ``fmt`` as data: a dict (firecracker, cloud-hypervisor-api)
    or an argv list (cloud-hypervisor, qemu, qemu-blockdev). Options a form cannot express
    are refused (ValueError), never dropped."""
    o = opts or DriveOptions()
    name = _name(fmt)
    net = network_target(path)
    if net is not None:
        if not name.startswith("qemu"):
            raise ValueError(f"{os.fspath(path)} is an rbd image QEMU opens itself ({net}): {name} opens only "
                             "files and block devices; make the store with map=fuse for it (docs/rbd.md)")
        path = net
    if o.machine is not None and not name.startswith("qemu"):
        raise ValueError(f"--machine is a QEMU option; {name} has no machine types")
    if o.jail_path is not None and name != "firecracker":
        raise ValueError(f"a jail path is for Firecracker's jailer, not {name} "
                         "(give the VMM the path cowdisk volume jail printed)")
    if name == "firecracker":
        return firecracker(path, o.drive_id or "rootfs", True, o.read_only, cache_type=o.cache,
                           io_engine=o.io_engine, iops=o.iops, bandwidth=o.bandwidth, jail_path=o.jail_path)
    if name.startswith("cloud-hypervisor"):
        if o.io_engine is not None:
            raise ValueError("Cloud Hypervisor has no I/O engine to choose (it uses io_uring where it can)")
        kw: dict[str, Any] = {"readonly": o.read_only, "disk_id": o.drive_id, "cache": o.cache, "iops": o.iops,
                              "bandwidth": o.bandwidth}
        return cloud_hypervisor_config(path, **kw) if name.endswith("-api") else cloud_hypervisor_argv(path, **kw)
    common: dict[str, Any] = {"readonly": o.read_only, "cache": o.cache or "none", "aio": o.io_engine,
                              "machine": o.machine or "q35", "iops": o.iops, "bandwidth": o.bandwidth}
    if name == "qemu":
        return qemu(path, drive_id=o.drive_id or "rootfs", **common)
    return qemu_blockdev(path, node_name=o.drive_id or "rootfs", block_device=block_device, **common)


def render(fmt: str, path: str | os.PathLike[str], *, readonly: bool = False, opts: DriveOptions | None = None,
           block_device: bool | None = None) -> str:
    """Text for the CLI: JSON for Firecracker and the Cloud Hypervisor API, shell words otherwise."""
    opts = opts or DriveOptions()
    if readonly:
        opts = replace(opts, read_only=True)
    cfg = config(fmt, path, opts, block_device=block_device)
    if isinstance(cfg, dict):
        return json.dumps(cfg, indent=2)
    return shlex.join(cfg)
