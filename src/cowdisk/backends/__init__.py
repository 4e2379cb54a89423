"""Backends: the mechanisms that make a volume, all behind one protocol.

A backend turns (template, volume id) into something a VMM can open (the *device
path*) and back. It never touches the registry and never parses arguments: the store
hands it a :class:`VolumeCtx` whose callbacks record the kernel objects it makes, mark
crash points and take the template's lock.

Lifecycle of a volume's data on every backend::

    create  -> data made from the template, attached (device path returned)
    detach  -> device released, data kept           (checkpoint)
    attach  -> the kept data attached again          (restore)
    destroy -> data deleted (after detach)           (remove)

The contract (what the store relies on, and the conformance suite checks):

* **Order.** The store holds the volume's lock around every call for that volume, so
  calls for one volume never overlap; calls for different volumes may run at once in
  several threads and processes. ``destroy`` only follows a ``detach`` that returned.
* **Record before you make.** Every kernel object or file a method makes is passed to
  ``ctx.record(kind, name)`` *before* it exists (and ``ctx.forget`` once it is gone or
  owned by another object), so a kill at any instant leaves the registry naming it.
* **Steps.** ``steps[method]`` names, in order, the points at which the method calls
  ``ctx.step(name)``: right after each durable change. The crash matrix kills the
  process at each of them.
* **Failure.** A method that raises leaves nothing of its own call behind that it did
  not record: it undoes what it made, or leaves it recorded for the store's rollback.
  Errors are cowdisk errors naming the operation, the object and the errno.
* **Idempotency.** ``detach``, ``destroy`` and ``release`` succeed when their object is
  already gone; ``detach`` waits up to ``deadline_s`` for a busy device and then raises
  InUse or a KernelError(EBUSY) with the device still attached. ``attach`` and
  ``create`` may find a half-made attempt of a killed process (recovery tears it down
  first, so they may assume a clean slate for the volume).
* **Data.** ``create`` and ``copy_data`` never change the template or the source
  volume; ``copy_data`` of an attached source gives a crash-consistent copy: the source's
  writes are flushed and it is held (a dm device suspended; a file cloned under its
  inode's lock, FICLONE writing its dirty pages back first) for that instant only.
* **Fork.** ``copy_data(src, dst, like=first)`` makes ``dst`` equal to ``first``, a copy
  of ``src`` the same caller just made and nobody has attached: from ``first``'s data
  (a thin snapshot of it, a clone or copy of its file) or from the snapshot ``first`` was
  cloned from (rbd), never by holding ``src`` again. Fork into N holds the source once
  and makes the other N-1 children this way: every child from one instant.
  ``prepare_copies(src, n)`` (optional) is called first: the backend may reserve what n
  copies need in one step (dm-thin: n thin ids with one pool message, each message
  committing the pool's metadata); it makes nothing a crash could leave behind.
* **Open count** (optional). ``open_count(ctx) -> int | None``: how many times the
  attached volume's device is open as the kernel counts it (a dm device's open count
  from DM_DEV_STATUS, 0.1 ms), None when it is not attached. The store's busy check
  (remove, checkpoint) reads it instead of searching every process's fds; the holder
  search then runs only to name the holder in an error. A backend without it (files)
  gets the holder search.
* **Records ahead** (optional). ``records_ahead(ctx) -> tuple[(kind, name), ...]``: the
  objects ``create`` will record, when they are known before it runs (a file backend's
  volume file). The store commits their records with the create's intent (one
  transaction fewer per create); ``ctx.record`` of them then does nothing.
* **Thaw** (optional). ``thaw(ctx) -> bool``: resume the attached volume's device if a
  process killed in the middle of a copy left it suspended (every I/O to it would wait
  forever); recovery calls it for attached volumes no process works on.
* **Space** (optional). ``space() -> list[Space]``: the backend's own areas that fill
  as volumes write (dm-thin: the pool's data and metadata, with the pool's mode; pool:
  the embedded xfs), read without changing anything. ``Store.space()`` adds the
  filesystem holding the data; ``store info``, ``doctor`` and ``/metrics`` show it.
* **Shared** (optional; backends whose volumes live where several stores reach them,
  rbd). ``shared_volume(vid) -> SharedVolume`` (NotFound when there is none) and
  ``shared_volumes()`` read what the shared place holds; ``has_template(tid)`` says
  whether a template known only by digest is still there; ``claim(ctx, steal=)`` makes
  this store the volume's owner (refused with InUse naming the holder's store and host
  while another store holds it, unless ``steal``), ``unclaim(ctx, previous)`` gives it
  back; ``take_over(ctx)`` fences the store that holds the volume (its clients can no
  longer write) and clears its hold. The store's ``adopt_volume`` and ``restore(steal=)``
  call them, each through its own operation.
* **Size.** A volume's device is ``ctx.volume_size`` bytes: the template's size, or more
  on a backend with ``larger_volumes`` (the bytes past the template read as zeros; the
  store grows the filesystem). Copies (restore as, fork) keep their source's size.
* **Held templates** (optional; dm-thin). A backend declaring ``HoldsTemplates`` flattens
  without copying: ``flatten_held(ctx, descriptor, attached=)`` writes a small descriptor
  file and returns the content's sha256; the store publishes the descriptor as the
  template's file (``disk.thin``) and calls ``publish_held``, or ``drop_held`` when that
  content is a template already or the flatten is undone; ``held_size`` and
  ``held_digest`` answer for the template's size and ``template verify``
  (store/templates.py, ``Holder``).
* **Lazy origin** (optional; dm-thin, dm-snapshot). A backend declaring ``LazyOrigin``
  makes volumes over a lazy template (``TemplateRef.serve`` is set): it maps the template
  through one read-only device per template (``dm_common.hold_lazy_origin``): a loop over
  the cache's data file when the cache is whole (``TemplateRef.whole``), else an nbd device
  connected to the server. The store refuses such a template on the others.
* **Declared.** Each optional feature is a protocol below (``OpenCount``, ``Shared``, ...)
  that the backend class names among its bases; the store asks ``isinstance``.
* **Scan.** ``scan()`` lists this store's kernel objects on the host (by the store's
  tag or name prefix), never another store's; ``release`` frees one of them.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Callable, ClassVar, ContextManager, Iterator, Mapping, Protocol, Self, runtime_checkable

from ..errors import InvalidArgument
from ..model import SharedVolume as SharedVolume, Space as Space, SpaceEvent as SpaceEvent, Usage as Usage  # the callers' types
from ..progress import Progress


def _no_lock() -> ContextManager[None]:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class TemplateRef:
    """What a backend knows of a template: its id, its (read-only) image and size.
    ``path`` is "" for a template this store knows only by digest, from a backend that
    keeps templates where several stores reach them (rbd: the cluster)."""

    id: str
    path: str
    size: int
    digest: str = ""
    serve: Callable[[], str] | None = None
    """A lazy template (docs/remote.md): starts (or finds) the server of its chunk cache and
    returns its unix socket (NBD, read-only); None for every other template. The store
    makes volumes over one only on a backend declaring ``LazyOrigin``."""
    whole: Callable[[], ContextManager[str | None]] | None = None
    """A lazy template: a context giving its cache's data file when the cache holds every
    data chunk (each checked against its SHA-256 when fetched: the file is the template's
    bytes), else None. Inside it no eviction runs, and a loop bound to the file before it
    ends pins the cache: nothing is evicted from it while the loop is bound."""


@dataclass
class VolumeCtx:
    """What a backend needs to know about one volume, and how it reports back."""

    id: str
    template: TemplateRef
    data_dir: str
    tag: str
    """Label prefix for kernel objects of this store (loop labels, dm names)."""
    dm_name: str
    record: Callable[[str, str], None] = lambda kind, name: None
    forget: Callable[[str, str], None] = lambda kind, name: None
    step: Callable[[str], None] = lambda name: None
    template_lock: Callable[[], ContextManager[object]] = field(default=_no_lock)
    progress: Progress | None = None
    op: str = ""
    """The store operation this context serves (``remove``, ``checkpoint``, ...; "" for
    recovery): a backend may skip work the operation's next step makes moot."""
    template_in_use: Callable[[], bool] = lambda: False
    """Whether other volumes of this store (not being removed themselves) use the template,
    asked by ``destroy`` at the moment it would free what the template shares (under the
    template's lock): while they do, a backend need not look for the template's last user."""
    size: int = 0
    """Bytes of the volume's device: the template's size, or more (``create_volume(size=)``,
    on a backend with ``larger_volumes``); 0 means the template's size."""

    @property
    def volume_size(self) -> int:
        """Bytes of the volume's device (``size``, or the template's size when 0)."""
        return self.size or self.template.size


@dataclass(frozen=True)
class BackendEnv:
    """What a backend is opened with: the store's root, its tag and dm name prefix, and
    where it keeps a template's shared kernel object (dm-snapshot's template loop)."""

    root: str
    tag: str
    dm_prefix: str
    options: Mapping[str, str] = field(default_factory=dict)
    """Backend settings recorded with the store when it was made (a cluster's config path,
    a pool's devices); each backend documents the keys it reads and refuses unknown ones."""
    shared_loop_get: Callable[[str], tuple[int, str] | None] = lambda tid: None
    shared_loop_set: Callable[[str, int, str], None] = lambda tid, n, d: None


def check_options(name: str, env: BackendEnv, known: frozenset[str] = frozenset()) -> None:
    """Refuse backend options that backend ``name`` does not read (a typo must not pass)."""
    unknown = sorted(set(env.options) - known)
    if unknown:
        raise InvalidArgument(f"backend {name}: unknown option(s) {', '.join(unknown)}", op="open store",
                              obj=env.root, hint=f"{name} reads {', '.join(sorted(known)) or 'no options'}")


@dataclass(frozen=True)
class KernelObject:
    """A kernel object of this store that a backend found on the host."""

    kind: str  # "dm", "loop"
    name: str  # dm name or loop number
    volume_id: str | None  # the volume it belongs to, if the name tells
    detail: str = ""
    template_id: str | None = None
    """A template's own object (dm-thin's fill device): recovery releases it only while
    that template's lock is free, i.e. while nobody is filling it."""


class Backend(Protocol):
    name: ClassVar[str]
    block_device: ClassVar[bool]
    """True when the device path is a block device (dm), False when it is a file."""
    steps: ClassVar[Mapping[str, tuple[str, ...]]]
    """Method name -> the ``ctx.step`` names it passes, in order (see the module docstring)."""
    larger_volumes: ClassVar[bool]
    """True when a volume may be larger than its template (``ctx.volume_size`` > the
    template's size): the extra space reads as zeros. False: the store refuses a size."""
    data_root: str
    """Where ``templates/`` and ``volumes/`` live (the store root, or the pool's mount)."""

    @classmethod
    def available(cls, root: str) -> tuple[bool, str]:
        """Whether volumes of this kind can be made for a store at ``root``, and why (not)."""
        ...

    @classmethod
    def open(cls, env: BackendEnv) -> Self:
        """The backend for one store, its store-wide resources ready (the pool mounted)."""
        ...

    def create(self, ctx: VolumeCtx) -> str: ...

    def attach(self, ctx: VolumeCtx) -> str: ...

    def detach(self, ctx: VolumeCtx, *, deadline_s: float = 5.0) -> None: ...

    def destroy(self, ctx: VolumeCtx) -> None: ...

    def copy_data(self, src: VolumeCtx, dst: VolumeCtx, *, src_attached: bool,
                  like: VolumeCtx | None = None) -> None:
        """``dst`` made from ``src``'s current data; with ``like`` (a volume this call's
        caller just made from ``src`` and nobody has attached yet), from the same instant
        ``like`` was taken at, without holding ``src`` again (see "Fork")."""
        ...

    def flatten(self, ctx: VolumeCtx, out_path: str, *, attached: bool) -> None: ...

    def usage(self, ctx: VolumeCtx, *, attached: bool) -> Usage: ...

    def is_attached(self, ctx: VolumeCtx) -> bool: ...

    def device_path(self, ctx: VolumeCtx) -> str | None: ...

    def stage(self, ctx: VolumeCtx, device: str, dest: str, *, uid: int | None, gid: int | None) -> str:
        """Make the attached volume ``device`` reachable at ``dest`` inside a jail
        (a device node, or a hard link to the file); replaces a stale ``dest``."""
        ...

    def scan(self) -> Iterator[KernelObject]: ...

    def release(self, obj: KernelObject, *, deadline_s: float = 5.0) -> None: ...

    def destroy_store(self) -> None:
        """Release the store-wide resources (unmount the pool); volumes are gone already."""
        ...


# Optional features (see the module docstring): each a small protocol that a backend class
# declares by naming it among its bases (mypy then checks its methods' signatures); the
# store asks ``isinstance(backend, Feature)``. tests/unit/test_backend_features.py checks
# that each class declares exactly the features it implements.

@runtime_checkable
class CopiesData(Protocol):
    """A new volume allocates its template's bytes at once (copy): admission control counts them."""

    copies_data: ClassVar[bool]


@runtime_checkable
class LazyOrigin(Protocol):
    """"Lazy origin": volumes over a lazy template, whose bytes a server on this host serves
    over NBD (``TemplateRef.serve``): the backend reads the template through a read-only
    ``/dev/nbdN`` (dm-thin's external origin, dm-snapshot's origin), or a read-only loop
    over the cache's data file once the cache is whole (``TemplateRef.whole``); no data
    copied."""

    lazy_origin: ClassVar[bool]


@runtime_checkable
class RecordsAhead(Protocol):
    """"Records ahead": the objects ``create`` will record, known before it runs."""

    def records_ahead(self, ctx: VolumeCtx) -> tuple[tuple[str, str], ...]: ...


@runtime_checkable
class PreparesCopies(Protocol):
    """"Fork": reserve what ``n`` copies of ``src`` need in one step before they are made."""

    def prepare_copies(self, src: VolumeCtx, n: int) -> None: ...


@runtime_checkable
class OpenCount(Protocol):
    """"Open count": the kernel's count of opens of the attached volume's device."""

    def open_count(self, ctx: VolumeCtx) -> int | None: ...


@runtime_checkable
class Thaw(Protocol):
    """"Thaw": resume a device a killed copy left suspended."""

    def thaw(self, ctx: VolumeCtx) -> bool: ...


@runtime_checkable
class OwnSpace(Protocol):
    """"Space": the backend's own areas that fill as volumes write."""

    def space(self) -> list[Space]: ...


@runtime_checkable
class WatchesSpace(Protocol):
    """The backend's space monitor, run in a thread until ``stop`` is set (dm-thin)."""

    def watch_space(self, notify: Callable[[SpaceEvent], None], stop: threading.Event) -> None: ...


@runtime_checkable
class GrowsPool(Protocol):
    """An embedded pool grown by hand to ``size`` bytes (pool); returns its free bytes."""

    def grow_pool(self, size: int) -> int: ...


@runtime_checkable
class HoldsTemplates(Protocol):
    """"Held templates": flatten without copying, the template's data kept by the backend."""

    def flatten_held(self, ctx: VolumeCtx, out: str, *, attached: bool) -> str: ...

    def held_size(self, descriptor: str) -> int: ...

    def held_digest(self, template_id: str, descriptor: str, progress: Progress | None = None) -> str: ...

    def publish_held(self, descriptor: str, template_id: str) -> None: ...

    def drop_held(self, descriptor: str) -> None: ...


@runtime_checkable
class Shared(Protocol):
    """"Shared": volumes where several stores reach them (rbd), claimed, given back, fenced."""

    def shared_volume(self, vid: str) -> SharedVolume: ...

    def shared_volumes(self) -> list[SharedVolume]: ...

    def has_template(self, tid: str) -> bool: ...

    def claim(self, ctx: VolumeCtx, *, steal: bool = False) -> None: ...

    def unclaim(self, ctx: VolumeCtx, previous: str) -> None: ...

    def take_over(self, ctx: VolumeCtx) -> str | None: ...


FEATURES: tuple[type, ...] = (CopiesData, LazyOrigin, RecordsAhead, PreparesCopies, OpenCount, Thaw, OwnSpace, WatchesSpace,
                              GrowsPool, HoldsTemplates, Shared)
"""Every optional feature a backend class may declare."""


def _registry() -> dict[str, type[Backend]]:
    from .dm_snapshot import DmSnapshotBackend
    from .dm_thin import DmThinBackend
    from .files import CopyBackend, ReflinkBackend
    from .pool import PoolBackend
    from .rbd import RbdBackend

    return {c.name: c for c in (DmThinBackend, DmSnapshotBackend, ReflinkBackend, PoolBackend, CopyBackend,
                                RbdBackend)}


BACKENDS: tuple[str, ...] = ("dm-thin", "dm-snapshot", "reflink", "pool", "copy", "rbd")
"""Every backend by name, in the order ``auto`` tries them (those in NOT_AUTO excepted)."""

NOT_AUTO: frozenset[str] = frozenset({"rbd"})
"""Backends ``auto`` never picks: they need settings (a cluster) only the caller gives."""


def backend_class(name: str) -> type[Backend]:
    """The class of backend ``name``; InvalidArgument naming the choices for an unknown one."""
    classes = _registry()
    try:
        return classes[name]
    except KeyError:
        raise InvalidArgument(f"unknown backend {name!r}", op="choose backend", obj=name,
                              hint="one of auto, " + ", ".join(BACKENDS)) from None


def explain(root: str) -> tuple[str, list[str]]:
    """The backend ``auto`` picks for a store at ``root`` and why: each backend in order
    says whether it can work here, the first that can wins."""
    why: list[str] = []
    for name in BACKENDS:
        if name in NOT_AUTO:
            continue
        ok, reason = backend_class(name).available(root)
        why.append(reason)
        if ok:
            return name, why
    raise AssertionError("the copy backend is always available")
