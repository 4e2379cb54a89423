"""The store: the facade users call. Owns locking, the volumes' state changes and recovery.

Every state change of a volume is an :class:`~cowdisk.store.transition.Operation` run
through one :class:`~cowdisk.store.transition.Transition`: the intent and the trying
state are committed before the kernel is touched, every kernel object is recorded as
soon as it exists, and the done state is committed in the same transaction that ends
the intent. A process killed at any point leaves an intent behind; :meth:`Store.recover`
(also run on open) finishes or rolls back the operation through the same handlers an
in-process failure uses, and removes only true orphans of this store. A running
volume is never torn down by recovery.

Layout of a store root::

    registry.db           SQLite registry (WAL)
    locks/                flock files: volume-<id>, template-<id>
    templates/<id>/disk.img
    volumes/<id>/cow.img | disk.img
    cache/                the template cache (built images; templates link to them)
    links/<id>/rootfs     the stable link a VMM is given
    pool/                 the embedded xfs pool (pool backend only; then templates/,
                          volumes/ and cache/ live inside its mount)
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import functools
import logging
import os
import shutil
import sqlite3
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, TypeVar

from .. import failpoints
from ..backends import (CopiesData, GrowsPool, LazyOrigin, OpenCount, OwnSpace, PreparesCopies, RecordsAhead, Shared, SharedVolume,
                        Space, SpaceEvent, Usage, VolumeCtx, WatchesSpace, explain)
from ..digest import sha256_file
from ..errors import (
    AlreadyExists,
    CowdiskError,
    InUse,
    InvalidArgument,
    KernelError,
    NotFound,
    StateError,
    TemplateChanged,
    Unsupported,
)
from ..kernel import fs, procfs
from ..kernel.creds import fs_identity
from ..progress import Progress
from ..registry import ATTACHED, CREATING, TemplateRow, VolumeRow, sqlite_kind
from . import growfs, identity, manifest, recovery
from .limits import Limits
from .manifest import store_exists as store_exists  # where it was; the store's callers ask it first
from .model import RecoveryReport, Template, Volume, default_root, fork_ids, hostname_of, validate_id
from .parts import StoreParts, manifest_of_quarantine, refuse_under_daemon
from .remote import RemoteTemplates
from .sources import Caller, open_path
from .templates import HELD, is_lazy
from .transition import (
    ADOPT,
    CHECKPOINT,
    CREATE,
    FLATTEN,
    FORK,
    REMOVE,
    RESTORE,
    RESTORE_AS,
    TAKE_OVER,
    Batch,
    Operation,
    Transition,
)

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
MAX_VOLUME_BYTES = (1 << 63) - 512
"""The largest size a volume may ask for: a file's or block device's length is a signed 64-bit
count of bytes (and so is the registry's INTEGER)."""


def _frees_space(fn: F) -> F:
    """remove and checkpoint free space and must work on a full filesystem: when the store's
    filesystem is (nearly) full they first give back the reserve, so that their registry
    writes have room (a create, which would only use that room up, gets ENOSPC instead)."""
    @functools.wraps(fn)
    def run(self: "Store", *args: Any, **kw: Any) -> Any:
        if not self.read_only and _nearly_full(self.root):
            self.release_reserve()
        return fn(self, *args, **kw)
    return run  # type: ignore[return-value]


def _retried_when_full(fn: F) -> F:
    """recover and gc write only when they have work to do, and may run again: on ENOSPC
    they give back the reserve and run once more."""
    @functools.wraps(fn)
    def run(self: "Store", *args: Any, **kw: Any) -> Any:
        try:
            return fn(self, *args, **kw)
        except KernelError as e:
            if e.errno != errno.ENOSPC or not self.release_reserve():
                raise
            return fn(self, *args, **kw)
    return run  # type: ignore[return-value]


def _nearly_full(path: str) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (2 << 20)


class Store(StoreParts):
    """One state root on a host: templates, volumes, links, locks and the registry."""

    def __init__(self, root: str | None = None, *, backend: str = "auto", recover: bool = True,
                 lock_timeout: float = 30.0, backend_options: Mapping[str, str] | None = None,
                 rebuild: bool = False, limits: Limits | None = None) -> None:
        super().__init__(root, backend=backend, lock_timeout=lock_timeout, backend_options=backend_options,
                         rebuild=rebuild, limits=limits)
        self._reader = threading.local()
        if recover and not self.read_only:
            self.recover()

    @contextlib.contextmanager
    def reading_as(self, caller: Caller | None) -> Iterator[None]:
        """Within the block, on this thread, the paths callers name (import and build sources,
        jail directories) are opened once and read as ``caller`` (:mod:`cowdisk.store.sources`:
        its identity, beneath its roots); outside it (and with None) with the process's own
        rights, anywhere: the library trusts its caller. The daemon wraps each such call in
        it with the peer's identity; the command line under sudo with the sudo user's."""
        before = getattr(self._reader, "caller", None)
        self._reader.caller = caller
        try:
            yield
        finally:
            self._reader.caller = before

    def _caller(self) -> Caller | None:
        return getattr(self._reader, "caller", None)

    @classmethod
    def rebuild_registry(cls, root: str | None = None) -> tuple["Store", RecoveryReport, list[str]]:
        """Rebuild a lost or damaged registry from the manifests: the damaged files are moved
        aside (never deleted), a new registry takes the store's id and backend from
        ``store.json``, and recovery registers every volume and template again from its
        manifest. Returns the open store, the recovery report and where the old files went."""
        root = os.path.abspath(root or default_root())
        refuse_under_daemon(root, "rebuild registry")
        if manifest.read(os.path.join(root, manifest.STORE_FILE)) is None:
            raise NotFound(f"rebuild registry of {root}: no {manifest.STORE_FILE} there to rebuild from",
                           op="rebuild registry", obj=root)
        db = os.path.join(root, "registry.db")
        stamp = time.strftime("%Y%m%dT%H%M%S")
        moved = []
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(db + suffix):
                os.rename(db + suffix, f"{db}.damaged-{stamp}{suffix}")
                moved.append(f"{db}.damaged-{stamp}{suffix}")
        s = cls(root, recover=False, rebuild=True)
        return s, s.recover(), moved

    def _to_volume(self, v: VolumeRow, links: list[str] | None = None) -> Volume:
        """The caller's view of row ``v``; ``links``: its link paths (read from the registry
        when not given), put in order here: its own first, then the others by path."""
        own = self.link_path(v.id)
        if links is None:
            links = [p for p, _, _ in self.registry.links(v.id)]
        ordered = ([own] if own in links else []) + sorted(p for p in links if p != own)
        return Volume(v.id, v.template_id, v.backend, v.state, v.size, v.device, own,
                      v.data_path, v.created, v.parent, v.error, tuple(ordered), owner=v.owner)

    def _new_row(self, vid: str, t: TemplateRow, size: int, parent: str | None) -> VolumeRow:
        now = time.time()
        return VolumeRow(vid, t.id, self.backend_name, CREATING, size, self.vol_dir(vid), None, now, now,
                         parent, None, self.caller)

    def _row(self, vid: str) -> VolumeRow:
        """Volume ``vid`` if this view may see it: NotFound, in the same words as for a missing
        one, for another owner's (ids do not leak)."""
        return self.registry.get_volume(vid, owner=self.viewer)

    # -- templates -------------------------------------------------------------------

    def import_template(self, src: str, name: str | None = None, *, adopt: bool = False,
                        progress: Progress | None = None, shared: bool = False) -> Template:
        """Import a raw disk image: copy it in (or adopt it in place), digest it, make it read-only.
        The caller owns it; ``shared``: every caller may use it. The image is opened and read as
        :meth:`reading_as` says."""
        return self._templates.import_image(src, name, adopt=adopt, progress=progress, shared=shared,
                                            caller=self._caller())

    def build_template(self, source: str, name: str | None = None, *, size: int | None = None,
                       fs_type: str = "ext4", progress: Progress | None = None, shared: bool = False) -> Template:
        """Build a template from a directory tree or a tarball through the template cache,
        the source read as :meth:`reading_as` says."""
        return self._templates.build(source, name, size=size, fs_type=fs_type, progress=progress, shared=shared,
                                     caller=self._caller())

    def build_template_from_image(self, ref: str, name: str | None = None, *, size: int | None = None,
                                  fs_type: str = "ext4", progress: Progress | None = None,
                                  shared: bool = False) -> Template:
        """Build a template from a container image (OCI layout, OCI archive, docker save archive),
        built once per image (keyed on its manifest digest), read as :meth:`reading_as` says."""
        return self._templates.build_from_image(ref, name, size=size, fs_type=fs_type, progress=progress,
                                                shared=shared, caller=self._caller())

    def chown_template(self, ref: str, owner: int | None = None, *, shared: bool | None = None) -> Template:
        """Hand template ``ref`` to uid ``owner`` and/or mark it ``shared`` (usable by every
        caller) or not: root only (Forbidden otherwise)."""
        self._templates.row(ref)  # another's: the same 404 as a missing one
        self.require_admin("chown template", ref)
        if owner is not None:
            _check_uid("chown template", ref, owner)
        return self._templates.chown(ref, owner=owner, shared=shared)

    def push_template(self, ref: str, to: str | None = None, *, progress: Progress | None = None) -> dict[str, Any]:
        """Push a template to the object store as content-addressed chunks (docs/remote.md):
        only the chunks the bucket lacks are uploaded. ``to``: ``s3://BUCKET[/PREFIX]``
        (default: the remote config's). Returns the report (manifest digest and URL...)."""
        return RemoteTemplates(self.root, self._templates).push(ref, to, progress)

    def pull_template(self, source: str, name: str | None = None, *, at: str | None = None,
                      progress: Progress | None = None) -> Template:
        """Pull a template from the object store (a manifest URL, or a digest looked up at
        ``at``), every chunk checked, into this store."""
        return RemoteTemplates(self.root, self._templates).pull(source, name, at=at, progress=progress)

    def lazy_template(self, source: str, name: str | None = None, *, at: str | None = None,
                      bound: float | None = None, prefetch: bool = False,
                      progress: Progress | None = None) -> dict[str, Any]:
        """Serve a template of the object store lazily on this host (docs/remote.md): chunks
        are fetched, checked and cached when first read; returns its document (``url``:
        the NBD URL QEMU opens). ``bound``: seconds a chunk's fetch may take; ``prefetch``:
        fill the cache now, the recorded read order first. The template is the caller's, a
        lazy template of the store (``name`` names it): dm-thin and dm-snapshot make volumes
        over it (``id`` in the document)."""
        return RemoteTemplates(self.root, self._templates).lazy(source, name, at=at, bound=bound,
                                                                prefetch=prefetch, progress=progress)

    def record_read_order(self, manifest_digest: str) -> dict[str, Any]:
        """Upload the order this host fetched a lazy template's chunks in (a first boot's
        reads) as its manifest's sidecar; other hosts' prefetch follows it. Root only."""
        self.require_admin("record read order", manifest_digest)
        return RemoteTemplates(self.root, self._templates).record_order(manifest_digest)

    def lazy_templates(self) -> list[dict[str, Any]]:
        """The lazy templates on this host: cached bytes, served or not, counters."""
        return RemoteTemplates(self.root, self._templates).lazy_templates()

    def stop_lazy_template(self, manifest_digest: str) -> bool:
        """Stop serving a lazy template (its cache stays for the next start). Root only."""
        self.require_admin("stop lazy template", manifest_digest)
        return RemoteTemplates(self.root, self._templates).lazy_stop(manifest_digest)

    def keep_lazy_served(self) -> list[str]:
        """A served lazy template whose keeper was killed (its server ends with it) is served
        again, the nbd devices connected to the dead server reconnected (recovery runs
        this; the daemon every ``lazy_keep_interval`` seconds). Returns what was done. Root only."""
        self.require_admin("keep lazy templates served", self.root)
        return RemoteTemplates(self.root, self._templates).keep_served()

    def remote_templates(self, url: str | None = None) -> list[dict[str, Any]]:
        """The templates in the object store at ``url`` (default: the remote config's)."""
        return RemoteTemplates(self.root, self._templates).listing(url)

    def templates(self) -> list[Template]:
        return self._templates.list()

    def template(self, ref: str) -> Template:
        return self._templates.get(ref)

    def check_template(self, t: TemplateRow) -> None:
        """Refuse a template whose file changed since import (size, mtime, inode); a
        template known by digest only (no local file) must still be in the backend."""
        if t.path:
            self._templates.check(t)
            return
        if not isinstance(self.backend, Shared) or not self.backend.has_template(t.id):
            raise TemplateChanged(f"template {t.id}: this store knows it by digest only and the "
                                  f"{self.backend_name} backend no longer has it", op="check template", obj=t.id,
                                  hint="import the template's image file on this store")

    def verify_template(self, ref: str, progress: Progress | None = None) -> Template:
        """Check size, mtime and the full content digest; mark the template changed if they differ."""
        return self._templates.verify(ref, progress)

    def template_usage(self, ref: str) -> int:
        """Bytes the template's file really takes on disk (st_blocks)."""
        return self._templates.usage(ref)

    def template_doc(self, t: Template) -> dict[str, Any]:
        """The template as the CLI's ``--json`` and the daemon give it: its fields and
        ``disk_bytes`` (:meth:`template_usage`; None when it cannot be read)."""
        d: dict[str, Any] = t.as_dict()
        d["lazy"] = None
        try:
            if is_lazy(t.path):  # its bytes on this host: what its cache holds
                d["lazy"] = self._remote().lazy_summary(t.path)
                d["disk_bytes"] = d["lazy"]["cached_bytes"]
            else:
                d["disk_bytes"] = self.template_usage(t.id)
        except (CowdiskError, OSError):
            d["disk_bytes"] = None
        return d

    # -- volumes: reading ------------------------------------------------------------

    def volumes(self) -> list[Volume]:
        by_volume: dict[str, list[str]] = {}
        for path, owner, _ in self.registry.links():
            by_volume.setdefault(owner, []).append(path)
        return [self._to_volume(v, by_volume.get(v.id, [])) for v in self.registry.volumes(owner=self.viewer)]

    def volume(self, vid: str) -> Volume:
        return self._to_volume(self._row(vid))

    def links(self, vid: str | None = None) -> list[tuple[str, str]]:
        """``(link path, volume id)`` of every stable link (of ``vid``'s only, when given): a
        volume's own link, and a restore-as source's link retargeted to its copy."""
        if vid is not None:
            self._row(vid)
        rows = self.registry.links(vid)
        if self.viewer is not None:
            mine = {v.id for v in self.registry.volumes(owner=self.viewer)}
            rows = [r for r in rows if r[1] in mine]
        return [(p, o) for p, o, _ in rows]

    def usage(self, vid: str) -> Usage:
        v = self._row(vid)
        return self.backend.usage(self.ctx(v), attached=v.state == ATTACHED)

    # -- owners, quotas, admission ------------------------------------------------------

    def chown_volume(self, vid: str, owner: int) -> Volume:
        """Hand volume ``vid`` to uid ``owner`` (root only: Forbidden otherwise). Its data,
        device and links stay as they are; from now on only ``owner`` (and root) sees it."""
        validate_id(vid)
        self._row(vid)  # another's: the same 404 as a missing one
        self.require_admin("chown volume", vid)
        _check_uid("chown volume", vid, owner)
        with self.lock("volume", vid):
            self.registry.get_volume(vid)
            self.registry.set_volume_owner(vid, owner)
            self.write_manifest(vid)
        return self.volume(vid)

    def owner_usage(self, owner: int) -> tuple[int, int]:
        """(volumes, bytes on disk) of ``owner``: the backend's own accounting of each volume
        (:meth:`usage`'s ``own_bytes``)."""
        rows = self.registry.volumes(owner=owner)
        tpls = {t.id: t for t in self.registry.templates()} if rows else {}  # one read, not one per volume
        total = 0
        for v in rows:
            try:
                total += self.backend.usage(self.ctx(v, tpls.get(v.template_id)),
                                            attached=v.state == ATTACHED).own_bytes
            except (CowdiskError, OSError) as e:  # a volume half made or gone: it counts nothing
                log.debug("usage of volume %s for the quota of uid %d: %s", v.id, owner, e)
        return len(rows), total

    def _cost_of_template(self, t: TemplateRow) -> int:
        """Bytes a new volume over ``t`` allocates at once: its template's on a backend that
        copies the data (copy), none where blocks are shared until written."""
        if not isinstance(self.backend, CopiesData) or not t.path:
            return 0
        try:
            return fs.disk_usage(t.path)
        except OSError:
            return t.size

    def _cost_of_copy(self, src: VolumeRow) -> int:
        """Bytes a copy of volume ``src`` allocates at once (fork, restore-as)."""
        if not isinstance(self.backend, CopiesData):
            return 0
        try:
            return self.backend.usage(self.ctx(src), attached=src.state == ATTACHED).disk_bytes
        except (CowdiskError, OSError):
            return src.size

    def _admit(self, op: str, vid: str, needed: int, count: int = 1) -> None:
        """Refuse, before anything is made, an operation that would push an area the store's
        writes fill (its filesystem, the pool, a thin pool that cannot grow) past the
        high-water mark (ENOSPC, naming the mark and the use), or the caller past its byte
        quota (EDQUOT, naming the owner, the limit and the figures). The volume count is
        checked with the new row's commit (:meth:`_count_quota`)."""
        mark = self.limits.high_water

        def over(areas: list[Space]) -> list[Space]:
            return [a for a in areas if a.total_bytes > 0 and a.state != "unreadable" and not a.grows
                    and (a.used_bytes + needed * count) * 100 > mark * a.total_bytes]

        if over(self.space()):
            # before refusing, let the filesystems finish the frees they deferred (xfs and btrfs
            # count a file just unlinked as used until its inode is inactivated) and look again
            for path in {self.root, self.data_root}:
                with contextlib.suppress(CowdiskError, OSError):
                    fs.syncfs(path)
        for area in over(self.space()):
            after = area.used_bytes + needed * count
            more = f", {needed * count} more bytes would make it {100 * after / area.total_bytes:.1f}%" \
                if needed else ""
            raise KernelError(op, vid, errno.ENOSPC, detail=(
                f"the {area.area} ({area.detail}) is {area.pct:.1f}% full ({area.used_bytes} of "
                f"{area.total_bytes} bytes){more}: past the high-water mark of {mark:g}%"),
                hint="free space (remove or checkpoint volumes, `cowdisk gc`), grow the pool, or raise high_water")
        q = self.limits.quota(self.caller)
        if q.bytes is not None:
            n, used = self.owner_usage(self.caller)
            if used >= q.bytes or used + needed * count > q.bytes:
                raise KernelError(op, vid, errno.EDQUOT, detail=(
                    f"owner uid {self.caller} has {n} volumes taking {used} bytes on disk"
                    f"{f', {needed * count} more bytes' if needed else ''}: its quota (bytes) is {q.bytes}"),
                    hint="remove volumes of this owner, or raise quotas.bytes in the config")

    def _count_quota(self, op: str, vid: str, adding: int = 1) -> None:
        """Inside the transaction that adds the new rows (``adding`` of them): refuse (EDQUOT)
        when their owner now has more volumes than its quota; the transaction rolls back,
        nothing was made. In the transaction (BEGIN IMMEDIATE), so creates at once cannot
        pass it together."""
        q = self.limits.quota(self.caller)
        if q.volumes is None:
            return
        n = self.registry.count_volumes(self.caller)
        if n > q.volumes:
            raise KernelError(op, vid, errno.EDQUOT, detail=f"owner uid {self.caller} has {n - adding} volumes"
                              + (f", {adding} more asked" if adding > 1 else "")
                              + f": its quota (volumes) is {q.volumes}",
                              hint="remove volumes of this owner, or raise quotas.volumes in the config")

    # -- volumes: state changes -----------------------------------------------------

    def _transition(self, op: Operation, vid: str, **kw: Any) -> Transition:
        """A transition of volume ``vid`` that keeps its manifest up to date (``on_change``:
        a caller that writes it another way)."""
        kw.setdefault("on_change", self.write_manifest)
        return Transition(self.registry, op, vid, **kw)

    def _undo(self, v: VolumeRow, ctx: VolumeCtx) -> recovery.Undo:
        """The in-process undo of an operation: the handler recovery runs after a crash."""
        handler = recovery.HANDLERS
        return lambda t, _e: handler[t.op.name](self, t.intent, t.data, v, ctx)

    def create_volume(self, vid: str, template: str, *, size: int | None = None, grow_fs: bool = True,
                      progress: Progress | None = None) -> Volume:
        """A new writable copy-on-write volume over ``template``, attached, with its stable link.

        ``size`` (bytes, a multiple of 512, at least the template's size) makes the volume's
        device larger than its template on a backend that can (``larger_volumes``: dm-thin and
        the file backends); with ``grow_fs`` its ext2/3/4 filesystem is grown to fill it
        (resize2fs, before anything can open it; other filesystems are left as they are)."""
        validate_id(vid)
        t = self._templates.row(template)
        self._require_lazy_origin(vid, t)
        nbytes = self._volume_size(vid, t, size)
        self.check_template(t)
        self.check_room("create volume", vid)
        self._admit("create volume", vid, self._cost_of_template(t))
        with self.lock("volume", vid), _named_errors("create volume", vid):
            row = self._new_row(vid, t, nbytes, None)
            ctx = self.ctx(row, t, op=CREATE.name, progress=progress)
            ahead = self.backend.records_ahead(ctx) if isinstance(self.backend, RecordsAhead) else ()
            if ahead:  # recorded with the intent (see Backend "Records ahead")
                record = ctx.record
                ctx = dataclasses.replace(ctx, record=lambda k, n: None if (k, n) in ahead else record(k, n))

            def record_ahead() -> None:
                self._count_quota("create volume", vid)
                for k, n in ahead:
                    self.registry.record_object(vid, k, n)

            link = self.link_path(vid)
            done: list[VolumeRow] = []

            def write_done(_vid: str) -> None:  # the manifest from what was just committed, not read back
                self.write_manifest(vid, known=(done[0], t, [(link, done[0].device or "")]))

            with self._transition(CREATE, vid, row=row, undo=self._undo(row, ctx), on_change=write_done,
                                  begin=record_ahead) as tr:
                dev = tr.step("volume", self._make_volume, ctx, grow_fs and nbytes > t.size // 512 * 512)
                # the link's row is committed with the done state: until then the undo removes
                # the whole link directory (see set_link)
                tr.step("link", self.set_link, vid, link, dev, record=False)
                done.append(dataclasses.replace(row, state=ATTACHED, device=dev))
                tr.finish(lambda: self.registry.set_link(link, vid, dev), device=dev)
        return self._to_volume(done[0], [link])

    def _require_lazy_origin(self, vid: str, t: TemplateRow) -> None:
        """Refuse a lazy template on a backend that cannot read a template through its
        server's block device (docs/remote.md, "Volumes over a lazy template")."""
        if is_lazy(t.path) and not isinstance(self.backend, LazyOrigin):
            name = f"{t.id} ({t.names[0]})" if t.names else t.id
            raise Unsupported(f"create volume {vid}: template {name} is lazy (served from this host's chunk cache "
                              f"over NBD, fetched as it is read); the {self.backend_name} backend makes volumes only "
                              "over a template's image file", op="create volume", obj=vid,
                              hint=f"`cowdisk template pull {t.source}` (without --lazy) fetches it whole (remove "
                                   "the lazy template first), or use a dm-thin or dm-snapshot store")

    def _volume_size(self, vid: str, t: TemplateRow, size: int | None) -> int:
        """The new volume's size in bytes: the template's, or ``size`` once checked."""
        base = t.size // 512 * 512
        if size is None or size == base:
            return base
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 512:
            raise InvalidArgument(f"create volume {vid}: size {size!r} is not a positive multiple of 512 bytes",
                                  op="create volume", obj=vid)
        if size > MAX_VOLUME_BYTES:
            raise InvalidArgument(f"create volume {vid}: size {size} is larger than a file or device can be "
                                  f"({MAX_VOLUME_BYTES} bytes)", op="create volume", obj=vid)
        if size < base:
            raise InvalidArgument(f"create volume {vid}: size {size} is smaller than template {t.id} ({base} bytes)",
                                  op="create volume", obj=vid, hint="a volume is at least its template's size")
        if not self.backend.larger_volumes:
            raise InvalidArgument(f"create volume {vid}: backend {self.backend_name} makes volumes of their "
                                  f"template's size ({base} bytes), not {size}", op="create volume", obj=vid,
                                  hint="build the template with a larger --size, or use a store with backend "
                                       "dm-thin, reflink, pool or copy")
        return size

    def _make_volume(self, ctx: VolumeCtx, grow_fs: bool) -> str:
        """The backend's create, then (a larger volume) its filesystem grown to fill it: one
        step, so a kill in resize2fs is undone with the rest of the create."""
        dev = self.backend.create(ctx)
        if grow_fs:
            growfs.grow(dev, ctx.id)
        return dev

    @_frees_space
    def remove_volume(self, vid: str, *, deadline_s: float = 5.0) -> None:
        """Detach and delete a volume and its data. Retries while the device is briefly busy."""
        validate_id(vid)
        with self.lock("volume", vid) as held:
            v = self._row(vid)
            ctx = self.ctx(v, op=REMOVE.name)
            ctx.template_in_use = lambda: bool(self.registry.template_users(v.template_id, besides=vid))
            if v.state == ATTACHED:
                self._check_not_open(v, ctx, deadline_s, "remove volume")
            with self._transition(REMOVE, vid) as tr:
                tr.step("detach", self._detach_or_revert, tr, v, ctx, deadline_s)
                tr.step("links", self.drop_own_links, vid)
                tr.step("source-links", self.settle_source_links, vid)
                tr.step("data", self.destroy_data, v, ctx)
                tr.finish()
            held.unlink()  # one lock file per volume that exists, not per id ever used

    @_frees_space
    def checkpoint(self, vid: str, *, deadline_s: float = 5.0) -> Volume:
        """Detach a volume and keep its data (the VM is paused or gone); its stable link goes."""
        validate_id(vid)
        with self.lock("volume", vid):
            v = self._row(vid)
            CHECKPOINT.require(v)
            ctx = self.ctx(v, op=CHECKPOINT.name)
            self._check_not_open(v, ctx, deadline_s, "checkpoint volume")
            with self._transition(CHECKPOINT, vid) as tr:
                tr.step("detach", self._detach_or_revert, tr, v, ctx, deadline_s)
                tr.step("links", self.drop_own_links, vid)
                tr.step("source-links", self.settle_source_links, vid)
                tr.finish(device=None)
        return self.volume(vid)

    def restore(self, vid: str, new_id: str | None = None, *, retarget_source_link: bool = True,
                steal: bool = False, adopt: bool = False, progress: Progress | None = None) -> Volume:
        """Attach a checkpointed volume again, in place or as a new volume ``new_id``.

        Restoring under a new id copies the checkpoint's data (sparse, or reflinked
        where the filesystem can), so the checkpoint stays as it was and can be
        restored again. By default the source's stable link is retargeted to the new
        device too: that is the path a VM snapshot recorded.

        On a backend whose volumes several stores reach (rbd), ``adopt`` first registers
        a volume this store does not know (:meth:`adopt_volume`), and ``steal`` is the
        fencing step for a volume another store still holds (its host died): that store's
        clients are cut off for good and its hold cleared (:meth:`take_over`), then the
        volume is attached here. Without ``steal`` such a volume is refused (InUse naming
        the holder's store and host).
        """
        validate_id(vid)
        if adopt and self.registry.find_volume(vid) is None:
            self.adopt_volume(vid, steal=steal)
            steal = False  # adopt fenced the holder already
        if new_id is None or new_id == vid:
            return self._restore_in_place(vid, progress, steal=steal)
        validate_id(new_id)
        self.check_room("restore volume", new_id)
        self._admit("restore volume", new_id, self._cost_of_copy(self._row(vid)))
        return self._copy(RESTORE_AS, vid, new_id, retarget=retarget_source_link, progress=progress,
                          hint="checkpoint it first, or use fork", steal=steal)

    def shared_volumes(self) -> list[SharedVolume]:
        """Every volume in the backend's shared place (rbd: the pool and namespace), whichever
        store made it, with its owner and holder: what :meth:`adopt_volume` can take."""
        if not isinstance(self.backend, Shared):
            raise Unsupported(f"list shared volumes: the {self.backend_name} backend keeps volumes on this host "
                              "only", op="list shared volumes", obj=self.root)
        return list(self.backend.shared_volumes())

    def adopt_volume(self, vid: str, *, steal: bool = False) -> Volume:
        """Register here a checkpointed volume another store made in the backend's shared
        place (rbd: a store on another host using the same pool), without copying its
        data: its template is registered by digest if this store has no file of it, the
        backend records this store as the volume's owner (the other store may then only
        forget it), and the volume is checkpointed here, ready for :meth:`restore`.

        Refused (InUse naming the store and host) while another store holds the volume
        attached; with ``steal`` that store is fenced instead (:meth:`take_over`)."""
        validate_id(vid)
        backend = self.backend
        if not isinstance(backend, Shared):
            raise Unsupported(f"adopt volume {vid}: the {self.backend_name} backend keeps volumes on this host "
                              "only", op="adopt volume", obj=vid, hint="restore it on the store that made it")
        with self.lock("volume", vid), _named_errors("adopt volume", vid):
            if self.registry.find_volume(vid) is not None:
                raise AlreadyExists(f"adopt volume {vid}: this store has a volume {vid} already", op="adopt volume",
                                    obj=vid, hint="restore it, or remove it here first (a volume another store "
                                                  "adopted is only forgotten, never deleted)")
            sv: SharedVolume = backend.shared_volume(vid)
            if not sv.template_id or not sv.template_digest:
                t = self.registry.find_template(sv.template_id) if sv.template_id else None
                if t is None:
                    raise NotFound(f"adopt volume {vid}: the cluster does not record its template's digest",
                                   op="adopt volume", obj=vid,
                                   hint="import the template's image file on this store first")
            else:
                t = self._templates.register_shared(sv.template_digest, sv.template_size,
                                                    f"{self.backend_name}:{sv.owner or 'shared'}")
            self.check_template(t)
            row = self._new_row(vid, t, sv.size, None)
            ctx = self.ctx(row, t, op=ADOPT.name)
            with self._transition(ADOPT, vid, row=row, data={"owner": sv.owner},
                                  undo=self._undo(row, ctx)) as tr:
                tr.step("claim", backend.claim, ctx, steal=steal)
                tr.finish()
            if steal and sv.holder:
                self._take_over(self.registry.get_volume(vid))
        return self.volume(vid)

    def take_over(self, vid: str) -> str | None:
        """Fence whoever holds checkpointed volume ``vid`` in the shared place (a store whose
        host died): its clients can no longer write, even if that host comes back, and its
        hold is cleared so this store can attach the volume. Returns the old holder.
        ``restore(steal=True)`` runs it first."""
        validate_id(vid)
        with self.lock("volume", vid):
            return self._take_over(self._row(vid))

    def _take_over(self, v: VolumeRow) -> str | None:
        if not isinstance(self.backend, Shared):
            raise Unsupported(f"take over volume {v.id}: the {self.backend_name} backend has no holder to fence",
                              op="take over volume", obj=v.id)
        TAKE_OVER.require(v, hint="only a checkpointed volume is taken over")
        ctx = self.ctx(v, op=TAKE_OVER.name)
        with self._transition(TAKE_OVER, v.id) as tr:
            old: str | None = tr.step("fence", self.backend.take_over, ctx)
            tr.finish()
        return old

    def _copy(self, op: Operation, vid: str, new_id: str, *, retarget: bool, progress: Progress | None,
              hint: str = "", steal: bool = False) -> Volume:
        """A new volume ``new_id`` from ``vid``'s data (restore-as): copy, attach, link
        (and, with ``retarget``, the source's link pointed at the copy)."""
        with self.lock("volume", vid), self.lock("volume", new_id), _named_errors(f"{op.verb} volume", new_id):
            src = self._row(vid)
            op.require(src, hint=hint)
            if op is RESTORE_AS:
                self._require_data(src)
            if steal:
                self._take_over(src)
            t = self.registry.get_template(src.template_id)
            self.check_template(t)
            row = self._new_row(new_id, t, src.size, vid)
            ctx = self.ctx(row, t, op=op.name, progress=progress)
            with self._transition(op, new_id, row=row, data={"source": vid}, undo=self._undo(row, ctx),
                                  begin=lambda: self._count_quota(f"{op.verb} volume", new_id)) as tr:
                tr.step("copy", self.backend.copy_data, self.ctx(src, t), ctx, src_attached=src.state == ATTACHED)
                dev = tr.step("device", self.backend.attach, ctx)
                tr.step("link", self.set_link, new_id, self.link_path(new_id), dev)
                if retarget:  # the source's link, the path a VM snapshot of the source recorded
                    tr.step("retarget", self.set_link, new_id, self.link_path(vid), dev,
                            recorded=lambda: failpoints.hit(op.name, "retarget-row"))
                tr.finish(device=dev)
        return self.volume(new_id)

    def _restore_in_place(self, vid: str, progress: Progress | None, *, steal: bool = False) -> Volume:
        with self.lock("volume", vid):
            v = self._row(vid)
            RESTORE.require(v)
            self._require_data(v)
            if steal:
                self._take_over(v)
            t = self.registry.get_template(v.template_id)
            self.check_template(t)
            ctx = self.ctx(v, t, op=RESTORE.name, progress=progress)
            with self._transition(RESTORE, vid, data={"in_place": True}, undo=self._undo(v, ctx)) as tr:
                dev = tr.step("device", self.backend.attach, ctx)
                tr.step("link", self.set_link, vid, self.link_path(vid), dev)
                tr.finish(device=dev)
        return self.volume(vid)

    def fork(self, vid: str, new_ids: list[str] | tuple[str, ...] = (), *, count: int | None = None,
             prefix: str | None = None, reset_identity: bool = False, hostname_prefix: str | None = None,
             progress: Progress | None = None) -> list[Volume]:
        """New volumes that all start from ``vid``'s contents at one instant.

        The source is held once for all of them (an attached dm device suspended for one
        snapshot or copy, a file cloned once: see ``Backend`` "Fork"); the other children
        are made from the first. Pause the VMM first for a disk that matches its memory
        state (docs/vmm.md): the source's writes the VMM made are flushed, the ones still in
        the guest are its memory's. The children are one :class:`Batch`: registered
        together and attached together, or none of them (a kill leaves no half child, and
        recovery resumes a source left suspended).

        The children are ``new_ids``, or ``count`` of them named ``<prefix><n>`` (n from 1;
        the prefix defaults to ``<vid>-``).

        ``reset_identity``: each child gets its own ``/etc/machine-id``, no SSH host keys and
        the hostname ``<hostname_prefix><child id>`` on its ext2/3/4 filesystem, written
        offline before its link exists (store/identity.py). For children that boot from
        their disk, not ones resumed from the source's memory."""
        validate_id(vid)
        ids = fork_ids(vid, new_ids, count, prefix)
        hostnames = {n: hostname_of(hostname_prefix, n) for n in ids} if reset_identity else {}
        self.check_room("fork volume", vid)
        self._admit("fork volume", vid, self._cost_of_copy(self._row(vid)), len(ids))
        with contextlib.ExitStack() as locks, _named_errors("fork volume", vid):
            for n in sorted({vid, *ids}):  # one order for every caller: no deadlock between two forks
                locks.enter_context(self.lock("volume", n))
            src = self._row(vid)
            FORK.require(src)
            t = self.registry.get_template(src.template_id)
            self.check_template(t)
            rows = [self._new_row(n, t, src.size, vid) for n in ids]
            ctxs = [self.ctx(r, t, op=FORK.name, progress=progress) for r in rows]
            by_id = dict(zip(ids, ctxs))

            def undo(row: VolumeRow, intent: int, data: Mapping[str, Any]) -> None:
                recovery.HANDLERS[FORK.name](self, intent, data, row, by_id[row.id])

            done: dict[str, VolumeRow] = {}

            def write_done(n: str) -> None:  # the manifest from what was just committed, not read back
                self.write_manifest(n, known=(done[n], t, [(self.link_path(n), done[n].device or "")]))

            if isinstance(self.backend, PreparesCopies):
                self.backend.prepare_copies(self.ctx(src, t), len(ids))
            with Batch(self.registry, FORK, rows, data={"source": vid, "batch": ids}, undo=undo,
                       on_change=write_done,
                       begin=lambda: self._count_quota("fork volume", vid, len(ids))) as tr:
                tr.step("copy", self.backend.copy_data, self.ctx(src, t), ctxs[0],
                        src_attached=src.state == ATTACHED)
                tr.step("copies", self._copies_like, self.ctx(src, t), ctxs[0], ctxs[1:])
                devs = tr.step("device", lambda: {c.id: self.backend.attach(c) for c in ctxs})
                if reset_identity:
                    tr.step("identity", lambda: [identity.reset(devs[n], n, hostnames[n]) for n in ids])
                # the links' rows are committed with the done states (the undo removes each link directory)
                tr.step("link", self._links, devs, record=False)
                done.update({r.id: dataclasses.replace(r, state=ATTACHED, device=devs[r.id]) for r in rows})
                tr.finish(lambda: self._links(devs, files=False), fields={n: {"device": devs[n]} for n in ids})
        return [self._to_volume(done[n]) for n in ids]

    def _links(self, devs: Mapping[str, str], *, record: bool = True, files: bool = True) -> None:
        """Each new volume's own stable link to its device (``files=False``: only the rows)."""
        for n, dev in devs.items():
            if files:
                self.set_link(n, self.link_path(n), dev, record=record)
            else:
                self.registry.set_link(self.link_path(n), n, dev)

    def _copies_like(self, src: VolumeCtx, first: VolumeCtx, rest: list[VolumeCtx]) -> None:
        """The children after the first, each from the instant the first was taken at."""
        for c in rest:
            self.backend.copy_data(src, c, src_attached=False, like=first)

    def flatten(self, vid: str, name: str | None = None, *, progress: Progress | None = None) -> Template:
        """Materialise a volume (template + its changes) as a new template."""
        validate_id(vid)
        if name is not None:
            validate_id(name, "template name")
        self.check_room("flatten volume", vid)
        with self.lock("volume", vid):
            v = self._row(vid)
            FLATTEN.require(v)
            t = self.registry.get_template(v.template_id)
            self.check_template(t)
            ctx = self.ctx(v, t, op=FLATTEN.name, progress=progress)
            staging = self._templates.staging()
            with self._transition(FLATTEN, vid, data={"staging": staging},
                            undo=self._undo(v, ctx)) as tr:
                if self._templates.holder is not None and not is_lazy(t.path):  # dm-thin: a thin snapshot
                    out = os.path.join(staging, HELD)
                    digest = tr.step("data", self._templates.holder.flatten_held, ctx, out,
                                     attached=v.state == ATTACHED)
                else:
                    out = os.path.join(staging, "disk.img")
                    tr.step("data", self.backend.flatten, ctx, out, attached=v.state == ATTACHED)
                    digest = None
                tpl = tr.step("register", self._register_flat, tr, out, vid, name, digest)
                tr.finish()
            shutil.rmtree(staging, ignore_errors=True)
            return tpl

    def _register_flat(self, tr: Transition, out: str, vid: str, name: str | None, digest: str | None) -> Template:
        digest = digest or sha256_file(out)
        tr.note(template_id=digest[:16], existed=self.registry.find_template(digest[:16]) is not None)
        return self._templates.register(out, digest, owned=True, source=f"flatten:{vid}", name=name)

    # -- the steps -------------------------------------------------------------------

    def _require_data(self, v: VolumeRow) -> None:
        """Refuse a restore early and clearly when the checkpoint's data files (the ones the
        registry recorded for the volume) vanished behind cowdisk's back."""
        missing = [name for kind, name, _ in self.registry.objects(v.id)
                   if kind == "file" and not os.path.exists(name)]
        if missing:
            raise NotFound(f"restore volume {v.id}: its checkpointed data is gone ({', '.join(missing)})",
                           op="restore", obj=v.id,
                           hint="it cannot be restored; `cowdisk volume remove` it")

    def _check_not_open(self, v: VolumeRow, ctx: VolumeCtx, deadline_s: float, op: str) -> None:
        """Fail early, with the holder's PIDs, when a VM still has the device (or, for file
        backends, the volume file: same st_dev/st_ino, through any link) open."""
        if isinstance(self.backend, OpenCount):  # the kernel's own count (0.1 ms); no search of every process
            counter = self.backend.open_count
            end = time.monotonic() + deadline_s
            while (n := counter(ctx)):
                if time.monotonic() > end:
                    node = self.backend.device_path(ctx) or ctx.dm_name
                    pids = procfs.holders(node)  # only to name the holder
                    raise InUse(f"{op} {v.id}: device {node} is still open ({n} open"
                                + (f", by PID {', '.join(map(str, pids))}" if pids else "") + ")",
                                op=op, obj=v.id, hint="stop the VM that uses it first")
                time.sleep(0.05)
            return
        dev = self.backend.device_path(ctx)
        if dev is None:
            return
        what = "device" if self.backend.block_device else "file"
        end = time.monotonic() + deadline_s
        if not self.backend.block_device and fs.open_elsewhere(dev) is False:
            return  # the kernel says nobody else has it open; the search below only names holders
        while True:
            # our own process counts for a block device: dm remove would fail on its open too
            pids = [p for p in procfs.holders(dev) if p != os.getpid() or self.backend.block_device]
            if not pids:
                return
            if time.monotonic() > end:
                raise InUse(f"{op} {v.id}: {what} {dev} is still open by PID "
                            f"{', '.join(map(str, pids))}", op=op, obj=v.id,
                            hint="stop the VM that uses it first")
            time.sleep(0.05)

    def _detach_or_revert(self, tr: Transition, v: VolumeRow, ctx: VolumeCtx, deadline_s: float) -> None:
        """Release the device; if someone opened it after the holder check and it is still
        attached at the deadline, put the volume back as it was and raise InUse."""
        try:
            self.backend.detach(ctx, deadline_s=deadline_s)
        except (KernelError, InUse) as e:
            if v.state != ATTACHED or not self.backend.is_attached(ctx):
                raise
            tr.revert()
            dev = v.device or ""
            pids = procfs.holders(dev) if dev else []
            raise InUse(f"release volume {v.id}: its device {dev} is still open"
                        + (f" by PID {', '.join(map(str, pids))}" if pids else ""),
                        op="release volume", obj=v.id, hint="stop the VM that uses it first") from e

    # -- jails ------------------------------------------------------------------------

    def jail(self, vid: str, jail_dir: str, name: str = "rootfs", *, uid: int | None = None,
             gid: int | None = None) -> str:
        """Stage the volume inside a jail directory the way its backend allows (a device
        node for a block device, a hard link for a file), owned by ``uid``:``gid`` (root
        where not given), mode 0600. The directory is opened once, as :meth:`reading_as`
        says (that caller must be allowed to write in it), and the node is made through that
        descriptor."""
        caller = self._caller()
        if not name or "/" in name or name in (".", "..") or "\0" in name:
            raise InvalidArgument(f"jail volume {vid}: name {name!r} must be one path component inside the jail",
                                  op="jail", obj=repr(name))
        v = self._row(vid)
        if v.state != ATTACHED or not v.device:
            raise StateError(f"jail volume {vid}: it is {v.state}, not attached", op="jail", obj=vid)
        try:
            jd = open_path(jail_dir, "jail directory", caller, directory=True)
        except KernelError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                raise NotFound(f"jail volume {vid}: jail directory {jail_dir} does not exist", op="jail",
                               obj=jail_dir) from None
            raise
        with jd:
            if caller is not None and not caller.trusted:
                with fs_identity(caller.identity):
                    writable = os.access(jd.proc, os.W_OK | os.X_OK, effective_ids=True)
                if not writable:
                    raise KernelError("jail", jail_dir, errno.EACCES,
                                      detail=f"the caller ({caller.identity}) may not write in the jail directory")
            self.backend.stage(self.ctx(v), v.device, os.path.join(jd.proc, name), uid=uid, gid=gid)
        return os.path.join(os.path.abspath(jail_dir), name)

    # -- recovery and maintenance --------------------------------------------------------

    @_retried_when_full
    def recover(self) -> RecoveryReport:
        """Reconcile registry, kernel and files after a crash or a restart (root only: its
        report names every owner's volumes)."""
        self.require_admin("recover", self.root)
        return recovery.recover(self)

    @_retried_when_full
    def gc(self, *, purge: bool = False, older_than_s: float = 86400.0) -> RecoveryReport:
        """Recovery, then remove templates no volume uses and that have no name (a lazy
        template only once its server is stopped); with
        ``purge``, also delete quarantined data older than ``older_than_s`` seconds (the only
        way cowdisk deletes data it did not account for). Root only."""
        rep = self.recover()
        for t in self.registry.templates():
            if is_lazy(t.path) and self._remote().lazy_served(t.path):
                continue  # served: a VMM may read it through its NBD URL (stop it, then gc takes it)
            if not t.names and not self.registry.template_users(t.id):
                self.remove_template(t.id)
                rep.orphans_removed.append(f"template {t.id}")
        rep.orphans_removed.extend(RemoteTemplates(self.root, self._templates).trim_lazy())
        if purge:
            now = time.time()
            for path in list(rep.in_quarantine):
                note = manifest_of_quarantine(path)
                if now - float(note.get("time", os.stat(path).st_mtime)) >= older_than_s:
                    shutil.rmtree(path)
                    rep.in_quarantine.remove(path)
                    rep.orphans_removed.append(f"purged {path}")
        return rep

    def grow_pool(self, size: int) -> int:
        """Grow the embedded pool to ``size`` bytes (pool backend); returns its free bytes."""
        self.require_admin("grow pool", self.root)
        if not isinstance(self.backend, GrowsPool):
            raise StateError(f"grow pool: store {self.root} uses the {self.backend_name} backend, not pool",
                             op="grow pool", obj=self.root)
        return self.backend.grow_pool(size)

    def destroy(self) -> None:
        """Remove every volume and template, empty the cache, release the store-wide
        resources (unmount the pool). For tests and teardown."""
        self.require_admin("destroy", self.root)
        for v in self.registry.volumes():
            self.remove_volume(v.id)
        for t in self.registry.templates():
            self.remove_template(t.id)
        RemoteTemplates(self.root, self._templates).drop_lazy()
        self._templates.clean_cache()
        self.backend.destroy_store()

    def watch_space(self, notify: Callable[[SpaceEvent], None], stop: threading.Event) -> bool:
        """Run the backend's space monitor in this thread until ``stop`` is set or its area is
        gone (dm-thin: wait on the pool's dm event, grow it while guests write, fail writes
        after the bound when it cannot; docs/dm-thin.md). False at once when the backend has
        nothing to watch (its space is a filesystem's)."""
        if not isinstance(self.backend, WatchesSpace):
            return False
        self.backend.watch_space(notify, stop)
        return True

    def space(self) -> list[Space]:
        """How full each area the store's writes fill is: the filesystem holding the store
        (registry, files, a pool's image or a thin pool's files), the one holding the data
        when that is another (the embedded xfs pool), and the backend's own (dm-thin's pool
        data and metadata). Reads only; an area that cannot be read says why in its state."""
        out: list[Space] = []
        seen: set[int] = set()
        for area, path in (("store filesystem", self.root), ("data filesystem", self.data_root)):
            try:
                st = os.statvfs(path)
                dev = os.stat(path).st_dev
            except OSError as e:
                out.append(Space(area, 0, 0, "unreadable", f"{path}: {e.strerror}"))
                continue
            if dev in seen:
                continue
            seen.add(dev)
            out.append(Space(area, (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_blocks * st.f_frsize,
                             "ok", path))
        if isinstance(self.backend, OwnSpace):
            try:
                out.extend(self.backend.space())
            except (CowdiskError, OSError) as e:
                out.append(Space(f"{self.backend_name} backend", 0, 0, "unreadable", str(e)))
        return out

    def info(self) -> dict[str, Any]:
        """What the store is and holds: identity, backend, places, counts, space. A caller
        other than root gets its own counts (its volumes, the templates it may use) and no
        quarantine listing (its entries are named after other owners' volumes)."""
        def free(path: str) -> int:
            st = os.statvfs(path)
            return st.f_bavail * st.f_frsize

        states: dict[str, int] = {}
        for v in self.registry.volumes(owner=self.viewer):
            states[v.state.value] = states.get(v.state.value, 0) + 1
        qdir = os.path.join(self.data_root, "quarantine")
        return {
            "root": self.root, "id": self.id, "backend": self.backend_name,
            "backend_options": json.loads(self.registry.meta("backend_options") or "{}"),
            "data_root": self.data_root, "read_only": self.read_only,
            "registry_schema": self.registry.schema_version,
            "templates": len(self.registry.templates(visible_to=self.viewer)),
            "volumes": states, "intents": len(self.registry.intents()),
            "quarantine": sorted(os.listdir(qdir)) if os.path.isdir(qdir) and self.admin else [],
            "reserve": os.path.exists(os.path.join(self.root, "reserve")),
            "free_bytes": free(self.root), "data_free_bytes": free(self.data_root),
            "space": [s.as_dict() for s in self.space()],
            "caller": self.caller, "limits": self.limits.as_dict(),
        }

    def destroy_store(self, *, force: bool = False) -> list[str]:
        """Delete the whole store: volumes (refused while any is attached, unless ``force``:
        then removed like ``volume rm``, still refused for a device a VM holds open),
        templates, cache, pool, quarantine, registry and every file under the root, chattr +i
        ones included. Returns what was removed."""
        refuse_under_daemon(self.root, "destroy store", self.daemon)
        self.require_admin("destroy store", self.root)
        attached = [v.id for v in self.registry.volumes() if v.state == ATTACHED]
        if attached and not force:
            raise StateError(f"destroy store {self.root}: volumes {', '.join(attached)} are attached",
                             op="destroy store", obj=self.root,
                             hint="checkpoint or remove them first, or --force to remove them too")
        gone = [f"volume {v.id}" for v in self.registry.volumes()] + [f"template {t.id}"
                                                                      for t in self.registry.templates()]
        self.destroy()
        self.close()
        for d, _, files in os.walk(self.root):
            for name in files:
                p = os.path.join(d, name)
                if os.path.isfile(p) and not os.path.islink(p):  # never through a link
                    with contextlib.suppress(OSError):
                        fs.set_immutable(p, False)
        shutil.rmtree(self.root)
        return gone + [self.root]


MAX_UID = (1 << 32) - 2
"""The largest uid (uid_t is 32 bits; (uid_t)-1 means "no uid")."""


def _check_uid(op: str, obj: str, owner: object) -> None:
    """Refuse (InvalidArgument) an owner that is not a uid: a whole number 0 .. MAX_UID."""
    if isinstance(owner, bool) or not isinstance(owner, int) or not 0 <= owner <= MAX_UID:
        raise InvalidArgument(f"{op} {obj}: owner {owner!r} is not a uid (0 to {MAX_UID})", op=op, obj=obj)


@contextlib.contextmanager
def _named_errors(op: str, obj: str) -> Iterator[None]:
    """Turn a bare OSError or SQLite error (ENOSPC, "database or disk is full") into a
    cowdisk error that names the operation and the object; a full or read-only registry
    (KernelError naming the registry file) is said of the object too."""
    try:
        yield
    except KernelError as e:
        if e.errno in (errno.ENOSPC, errno.EROFS) and obj not in str(e):
            raise KernelError(op, obj, e.errno, detail=e.message, hint=e.hint) from e
        raise
    except CowdiskError:
        raise
    except OSError as e:
        raise KernelError(op, obj, e.errno or 0, detail=e.filename or "") from e
    except sqlite3.Error as e:
        if sqlite_kind(e) == "full":  # by its result code: an ENOSPC (HTTP 507), as a full filesystem is
            raise KernelError(op, obj, errno.ENOSPC, detail=f"registry: {e}",
                              hint="free space on the store's filesystem") from e
        raise CowdiskError(f"{op} {obj}: registry {e}", op=op, obj=obj) from e


def choose_backend(root: str) -> str:
    """dm-snapshot where device-mapper and its snapshot target exist, else reflink, else pool, else copy."""
    return explain(root)[0]


def explain_backend(root: str) -> tuple[str, list[str]]:
    """The backend ``auto`` picks for ``root`` and why."""
    return explain(root)


def release_pool(root: str) -> list[str]:
    """Unmount the embedded pool of the store at ``root`` if it is mounted (a store that
    failed to open after mounting it); returns what stays mounted, empty when nothing."""
    from ..backends.pool import Pool
    from ..kernel.mount import mounted_at

    pool = Pool(os.path.abspath(root), "")
    errors = []
    try:
        pool.unmount()
    except (CowdiskError, OSError) as e:
        errors.append(f"unmount pool {pool.mnt}: {e}")
    if mounted_at(pool.mnt):
        errors.append(f"{pool.mnt} is still mounted")
    return errors


if TYPE_CHECKING:
    from ..contract import StoreAPI

    _contract: type[StoreAPI] = Store  # mypy: the library keeps its own contract
