"""Backends: the mechanisms that make a volume, all behind one protocol.

A backend turns (template, volume id) into something a VMM can open (the *device
path*) and back. It never touches the registry: the store hands it a
:class:`VolumeCtx` whose callbacks record the kernel objects it makes, mark crash
points and take the template's lock.

Lifecycle of a volume's data on every backend::

    create  -> data made from the template, attached (device path returned)
    detach  -> device released, data kept           (checkpoint)
    attach  -> the kept data attached again          (restore)
    destroy -> data deleted (after detach)           (remove)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterator, Protocol

from ..kernel.fs import Progress
from ..registry import TemplateRow


def _no_lock() -> ContextManager[None]:
    return contextlib.nullcontext()


@dataclass
class VolumeCtx:
    """What a backend needs to know about one volume, and how it reports back."""

    id: str
    template: TemplateRow
    data_dir: str
    tag: str
    """Label prefix for kernel objects of this store (loop labels, dm names)."""
    dm_name: str
    record: Callable[[str, str], None] = lambda kind, name: None
    forget: Callable[[str, str], None] = lambda kind, name: None
    step: Callable[[str], None] = lambda name: None
    template_lock: Callable[[], ContextManager[None]] = field(default=_no_lock)
    progress: Progress | None = None


@dataclass(frozen=True)
class Usage:
    """What a volume costs. ``disk_bytes`` is real allocation (st_blocks), not apparent size."""

    disk_bytes: int
    apparent_bytes: int
    exclusive_bytes: int | None = None
    shared_bytes: int | None = None
    cow_used_bytes: int | None = None
    cow_total_bytes: int | None = None
    health: str = "ok"

    @property
    def own_bytes(self) -> int:
        """What this volume alone costs on disk: its exclusive bytes where blocks can be
        shared (reflink), else its allocated bytes (a COW file, a copy)."""
        return self.exclusive_bytes if self.exclusive_bytes is not None else self.disk_bytes


@dataclass(frozen=True)
class KernelObject:
    """A kernel object of this store that a backend found on the host."""

    kind: str  # "dm", "loop"
    name: str  # dm name or loop number
    volume_id: str | None  # the volume it belongs to, if the name tells
    detail: str = ""


class Backend(Protocol):
    name: str
    block_device: bool
    """True when the device path is a block device (dm), False when it is a file."""

    def create(self, ctx: VolumeCtx) -> str: ...

    def attach(self, ctx: VolumeCtx) -> str: ...

    def detach(self, ctx: VolumeCtx, *, deadline_s: float = 5.0) -> None: ...

    def destroy(self, ctx: VolumeCtx) -> None: ...

    def copy_data(self, src: VolumeCtx, dst: VolumeCtx, *, src_attached: bool) -> None: ...

    def flatten(self, ctx: VolumeCtx, out_path: str, *, attached: bool) -> None: ...

    def usage(self, ctx: VolumeCtx, *, attached: bool) -> Usage: ...

    def is_attached(self, ctx: VolumeCtx) -> bool: ...

    def device_path(self, ctx: VolumeCtx) -> str | None: ...

    def scan(self, tag: str) -> Iterator[KernelObject]: ...

    def release(self, obj: KernelObject, *, deadline_s: float = 5.0) -> None: ...


BACKENDS = ("dm-snapshot", "reflink", "pool", "copy")
