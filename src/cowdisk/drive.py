"""Render a VMM's drive configuration for a cowdisk device or stable link path.

Pure functions, no I/O. Give them the volume's *stable link*
(``<store>/links/<volume>/rootfs``), not the device it points at: a VM snapshot
records this path, and restore retargets the link, so the same configuration
works before and after a checkpoint/restore.

>>> firecracker("/var/lib/cowdisk/links/vm1/rootfs")["path_on_host"]
'/var/lib/cowdisk/links/vm1/rootfs'
>>> cloud_hypervisor("/l/vm1/rootfs", readonly=True)
'--disk path=/l/vm1/rootfs,readonly=on'
>>> qemu("/l/vm1/rootfs")
['-drive', 'file=/l/vm1/rootfs,format=raw,if=virtio,cache=none,id=rootfs']
"""

from __future__ import annotations

import json
import os
import re
import shlex
from typing import Any

__all__ = ["FORMATS", "firecracker", "cloud_hypervisor", "qemu", "render"]

FORMATS = ("firecracker", "cloud-hypervisor", "qemu")
_ALIASES = {
    "firecracker": "firecracker", "fc": "firecracker",
    "cloud-hypervisor": "cloud-hypervisor", "cloud_hypervisor": "cloud-hypervisor",
    "ch": "cloud-hypervisor",
    "qemu": "qemu",
}
# Firecracker accepts ids of 1..64 characters from [A-Za-z0-9_].
_FC_ID = re.compile(r"[A-Za-z0-9_]{1,64}")
# QEMU ids: a letter, then letters, digits, '-', '.', '_'.
_QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,127}")
_QEMU_CACHE = ("none", "writeback", "writethrough", "directsync", "unsafe")
_QEMU_IF = ("virtio", "none", "ide", "scsi", "sd", "mtd", "pflash")


def _path(path: str | os.PathLike[str]) -> str:
    p = os.fspath(path)
    if not isinstance(p, str):
        raise TypeError(f"path must be str or os.PathLike[str], not {type(p).__name__}")
    if not p:
        raise ValueError("empty drive path")
    if any(c in p for c in "\0\n\r"):
        raise ValueError(f"drive path contains a NUL or newline: {p!r}")
    return p


def firecracker(path: str | os.PathLike[str], drive_id: str = "rootfs",
                is_root_device: bool = True, is_read_only: bool = False) -> dict[str, Any]:
    """Firecracker's drive object (``PUT /drives/{drive_id}`` body, or an entry of
    the config file's ``drives`` list)."""
    if not isinstance(drive_id, str) or not _FC_ID.fullmatch(drive_id):
        raise ValueError(f"invalid Firecracker drive_id {drive_id!r}: 1-64 of [A-Za-z0-9_]")
    return {
        "drive_id": drive_id,
        "path_on_host": _path(path),
        "is_root_device": bool(is_root_device),
        "is_read_only": bool(is_read_only),
    }


def cloud_hypervisor(path: str | os.PathLike[str], readonly: bool = False) -> str:
    """Cloud Hypervisor's ``--disk`` argument: ``--disk path=...[,readonly=on]``."""
    p = _path(path)
    # Cloud Hypervisor splits the option on ',' and '=' with no escape.
    if "," in p or "=" in p or " " in p:
        raise ValueError(f"Cloud Hypervisor cannot take a disk path with ',', '=' or space: {p!r}")
    return f"--disk path={p}" + (",readonly=on" if readonly else "")


def qemu(path: str | os.PathLike[str], *, readonly: bool = False, cache: str = "none",
         interface: str = "virtio", drive_id: str | None = "rootfs",
         fmt: str = "raw") -> list[str]:
    """QEMU's ``-drive`` arguments as an argv fragment (``['-drive', 'file=...']``).

    ``cache=none`` (O_DIRECT) suits block devices; use ``writeback`` for files on
    filesystems without O_DIRECT (tmpfs). Commas in the path are doubled, as QEMU
    requires.
    """
    p = _path(path)
    if cache not in _QEMU_CACHE:
        raise ValueError(f"invalid QEMU cache mode {cache!r}: one of {', '.join(_QEMU_CACHE)}")
    if interface not in _QEMU_IF:
        raise ValueError(f"invalid QEMU interface {interface!r}: one of {', '.join(_QEMU_IF)}")
    if fmt not in ("raw",):
        raise ValueError(f"cowdisk volumes are raw, not {fmt!r}")
    opts = [f"file={p.replace(',', ',,')}", f"format={fmt}", f"if={interface}", f"cache={cache}"]
    if readonly:
        opts.append("readonly=on")
    if drive_id is not None:
        if not isinstance(drive_id, str) or not _QEMU_ID.fullmatch(drive_id):
            raise ValueError(f"invalid QEMU drive id {drive_id!r}")
        opts.append(f"id={drive_id}")
    return ["-drive", ",".join(opts)]


def render(fmt: str, path: str | os.PathLike[str], *, readonly: bool = False) -> str:
    """Text for the CLI: JSON for Firecracker, a shell-quoted argument otherwise."""
    name = _ALIASES.get(fmt)
    if name is None:
        raise ValueError(f"unknown drive format {fmt!r}: one of {', '.join(FORMATS)}")
    if name == "firecracker":
        return json.dumps(firecracker(path, is_read_only=readonly), indent=2)
    if name == "cloud-hypervisor":
        opt, _, value = cloud_hypervisor(path, readonly=readonly).partition(" ")
        return shlex.join([opt, value])
    return shlex.join(qemu(path, readonly=readonly))
