"""The store: the facade users call. Owns locking, intents and recovery.

Every multi-step operation writes an *intent* to the registry before it touches the
kernel, records each kernel object as soon as it exists, and ends the intent in the
same transaction that records the final state. A process killed at any point
leaves an intent behind; :meth:`Store.recover` (also run on open) finishes or rolls
back the operation, and removes only true orphans of this store. A running volume
is never torn down by recovery.

Layout of a store root::

    registry.db           SQLite registry (WAL)
    locks/                flock files: volume-<id>, template-<id>
    templates/<id>/disk.img
    volumes/<id>/cow.img | disk.img
    links/<id>/rootfs     the stable link a VMM is given
    pool/                 the embedded xfs pool (pool backend only)
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator

from . import failpoints
from .backends import Backend, KernelObject, Usage, VolumeCtx
from .backends.files import FileBackend
from .backends.pool import Pool
from .errors import (
    CowdiskError,
    InUse,
    InvalidArgument,
    KernelError,
    NotFound,
    StateError,
    TemplateChanged,
    Unsupported,
)
from .kernel import blk, fs, procfs
from .kernel.fs import Progress
from .locks import FileLock
from .registry import (
    ATTACHED,
    CHECKPOINTED,
    CREATING,
    ERROR,
    REMOVING,
    Intent,
    Registry,
    TemplateRow,
    VolumeRow,
    process_alive,
)

DEFAULT_ROOT = "/var/lib/cowdisk"
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+:=@-]*$")
MAX_ID = 64


def default_root() -> str:
    return os.environ.get("COWDISK_ROOT") or DEFAULT_ROOT


def validate_id(vid: str, what: str = "volume id") -> str:
    """Volume ids end up in dm names and paths: allow only a safe charset and length."""
    if not isinstance(vid, str) or not vid:
        raise InvalidArgument(f"invalid {what} {vid!r}: empty", op="validate id", obj=repr(vid))
    if len(vid.encode()) > MAX_ID:
        raise InvalidArgument(f"invalid {what} {vid!r}: longer than {MAX_ID} bytes", op="validate id",
                              obj=vid)
    if not ID_RE.match(vid) or ".." in vid:
        raise InvalidArgument(
            f"invalid {what} {vid!r}: use letters, digits and _ . + : = @ -, starting with a letter or "
            "digit (no '/', '..', whitespace or NUL)", op="validate id", obj=repr(vid))
    return vid


@dataclass(frozen=True)
class Template:
    id: str
    names: tuple[str, ...]
    path: str
    size: int
    digest: str
    source: str
    created: float
    state: str
    users: tuple[str, ...] = ()

    @classmethod
    def of(cls, row: TemplateRow, users: list[str]) -> "Template":
        return cls(row.id, row.names, row.path, row.size, row.digest, row.source, row.created, row.state,
                   tuple(users))

    def as_dict(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["names"] = list(self.names)
        d["users"] = list(self.users)
        return d


@dataclass(frozen=True)
class Volume:
    id: str
    template_id: str
    backend: str
    state: str
    size: int
    device: str | None
    link: str
    data_path: str
    created: float
    parent: str | None
    error: str | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RecoveryReport:
    rolled_back: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    reactivated: list[str] = field(default_factory=list)
    orphans_removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def actions(self) -> int:
        return len(self.rolled_back) + len(self.finished) + len(self.reactivated) + len(self.orphans_removed)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _sha256(path: str, progress: Progress | None = None) -> str:
    h = hashlib.sha256()
    size = os.path.getsize(path)
    done = 0
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        # hash holes as zeros without reading them
        zero = bytes(1 << 20)
        pos = 0
        for off, length in list(fs.data_segments(fd, size)) + [(size, 0)]:
            while pos < off:  # a hole
                n = min(len(zero), off - pos)
                h.update(zero[:n])
                pos += n
                done += n
            end = off + length
            while pos < end:
                data = os.pread(fd, min(8 << 20, end - pos), pos)
                if not data:
                    break
                h.update(data)
                pos += len(data)
                done += len(data)
                if progress:
                    progress(done, size)
    if progress:
        progress(size, size)
    return h.hexdigest()


class Store:
    """One state root on a host: templates, volumes, links, locks and the registry."""

    def __init__(self, root: str | None = None, *, backend: str = "auto", recover: bool = True,
                 lock_timeout: float = 30.0) -> None:
        self.root = os.path.abspath(root or default_root())
        self.lock_timeout = lock_timeout
        for d in ("locks", "links", "staging"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        self.registry = Registry(os.path.join(self.root, "registry.db"))
        self.id = self.registry.set_meta_default("store_id", secrets.token_hex(4))
        self.tag = f"cowdisk:{self.id}"
        self.dm_prefix = f"cowdisk-{self.id}-"
        chosen = self.registry.meta("backend")
        if chosen is None:
            chosen = choose_backend(self.root) if backend == "auto" else backend
            if chosen not in ("dm-snapshot", "reflink", "pool", "copy"):
                raise InvalidArgument(f"unknown backend {chosen!r}", op="open store", obj=self.root,
                                      hint="one of auto, dm-snapshot, reflink, pool, copy")
            chosen = self.registry.set_meta_default("backend", chosen)
        elif backend not in ("auto", chosen):
            raise InvalidArgument(f"store {self.root} uses backend {chosen}, not {backend}",
                                  op="open store", obj=self.root, hint="use another --root for another backend")
        self.backend_name = chosen
        self.pool = Pool(self.root, f"{self.tag}:pool")
        if chosen == "pool":
            self.data_root = self.pool.ensure()
        else:
            self.data_root = self.root
        for d in ("templates", "volumes"):
            os.makedirs(os.path.join(self.data_root, d), exist_ok=True)
        if chosen == "reflink":
            _require_reflink(self.data_root)
        self.backend = self._make_backend(chosen)
        if recover:
            self.recover()

    def _make_backend(self, name: str) -> Backend:
        if name == "dm-snapshot":
            from .backends.dm_snapshot import DmSnapshotBackend

            return DmSnapshotBackend(dm_prefix=self.dm_prefix, data_root=self.data_root,
                                     shared_loop_get=self.registry.template_loop,
                                     shared_loop_set=self.registry.set_template_loop)
        if name in ("reflink", "pool"):
            return FileBackend(name, reflink=True)
        return FileBackend("copy", reflink=False)

    def close(self) -> None:
        self.registry.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- paths and locks -----------------------------------------------------------

    def _vol_dir(self, vid: str) -> str:
        return os.path.join(self.data_root, "volumes", vid)

    def link_path(self, vid: str) -> str:
        return os.path.join(self.root, "links", vid, "rootfs")

    def _lock(self, kind: str, name: str) -> FileLock:
        return FileLock(os.path.join(self.root, "locks", f"{kind}-{name}.lock"), timeout=self.lock_timeout,
                        what=f"{kind} {name}")

    def _ctx(self, v: VolumeRow, t: TemplateRow | None = None, *, op: str = "",
             progress: Progress | None = None) -> VolumeCtx:
        t = t or self.registry.get_template(v.template_id)
        vid = v.id
        return VolumeCtx(
            id=vid, template=t, data_dir=self._vol_dir(vid), tag=self.tag,
            dm_name=self.dm_prefix + vid,
            record=lambda kind, name: self.registry.record_object(vid, kind, name),
            forget=lambda kind, name: self.registry.forget_object(kind, name),
            step=lambda s: failpoints.hit(op, s),
            template_lock=lambda: self._lock("template", t.id),
            progress=progress,
        )

    def _to_volume(self, v: VolumeRow) -> Volume:
        return Volume(v.id, v.template_id, v.backend, v.state, v.size, v.device, self.link_path(v.id),
                      v.data_path, v.created, v.parent, v.error)

    # -- templates -------------------------------------------------------------------

    def import_template(self, src: str, name: str | None = None, *, adopt: bool = False,
                        progress: Progress | None = None) -> Template:
        """Import a raw disk image: copy it in (or adopt it in place), digest it, make it read-only."""
        src = os.path.abspath(src)
        if name is not None:
            validate_id(name, "template name")
        if not os.path.isfile(src):
            raise NotFound(f"import template: {src} is not a file", op="import template", obj=src)
        size = os.path.getsize(src)
        if size < 4096 or size % 512:
            raise InvalidArgument(f"import template {src}: size {size} is not a positive multiple of 512 bytes",
                                  op="import template", obj=src)
        if adopt:
            digest = _sha256(src, progress)
            return self._register_template(src, digest, owned=False, source=src, name=name)
        staging = os.path.join(self.data_root, "templates", f".staging-{os.getpid()}-{secrets.token_hex(4)}")
        os.makedirs(staging)
        try:
            tmp = os.path.join(staging, "disk.img")
            fs.sparse_copy(src, tmp, progress=progress)
            digest = _sha256(tmp)
            return self._register_template(tmp, digest, owned=True, source=src, name=name, staging=staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _register_template(self, path: str, digest: str, *, owned: bool, source: str, name: str | None,
                           staging: str | None = None) -> Template:
        tid = digest[:16]
        existing = self.registry.find_template(tid)
        if existing is not None and existing.digest == digest:
            if name:
                self.registry.add_template_name(tid, name)
            return self.template(tid)
        final = path
        if owned:
            tdir = os.path.join(self.data_root, "templates", tid)
            os.makedirs(tdir, exist_ok=True)
            final = os.path.join(tdir, "disk.img")
            os.chmod(path, 0o444)
            os.rename(path, final)
            fs.set_immutable(final, True)
        st = os.stat(final)
        row = TemplateRow(tid, final, st.st_size, digest, st.st_mtime_ns, st.st_ino, owned, source,
                          time.time(), "ready", (name,) if name else ())
        self.registry.add_template(row)
        return self.template(tid)

    def build_template(self, source: str, name: str | None = None, *, size: int | None = None,
                       fs_type: str = "ext4", progress: Callable[[str], None] | None = None) -> Template:
        """Build a template from a directory tree or a tarball (``mkfs.ext4 -d``, no mount needed).

        The image is built once per recipe in the store's template cache (key: filesystem,
        capacity, mkfs version fingerprint and the content digest of the source), so
        building the same tree again, here or in a concurrent process, reuses it.
        """
        from .cache import TarRecipe, TemplateCache, TreeRecipe

        if name is not None:
            validate_id(name, "template name")
        if os.path.isdir(source):
            if size is None:
                used = sum(os.lstat(os.path.join(d, f)).st_size for d, _, fl in os.walk(source) for f in fl)
                size = max(64 << 20, (used * 2 + (32 << 20) + (1 << 20) - 1) // (1 << 20) * (1 << 20))
            recipe: TreeRecipe | TarRecipe = TreeRecipe(os.path.abspath(source), size, fs=fs_type)
        elif os.path.isfile(source) and ".tar" in os.path.basename(source):
            if size is None:
                size = max(64 << 20, (os.path.getsize(source) * 3 + (32 << 20)) // (1 << 20) * (1 << 20))
            recipe = TarRecipe(os.path.abspath(source), size, fs=fs_type)
        else:
            raise NotFound(f"build template: {source} is neither a directory nor a tarball",
                           op="build template", obj=source)
        cache = TemplateCache(os.path.join(self.root, "cache"))
        res = cache.get_or_build(recipe, progress=progress)
        with cache.hold(res.entry.key) as entry:
            if progress:
                progress("importing")
            return self.import_template(entry.image, name)

    def templates(self) -> list[Template]:
        return [Template.of(t, self.registry.template_users(t.id)) for t in self.registry.templates()]

    def template(self, ref: str) -> Template:
        t = self.registry.get_template(ref)
        return Template.of(t, self.registry.template_users(t.id))

    def check_template(self, t: TemplateRow) -> None:
        """Refuse a template whose file changed since import (size, mtime, inode)."""
        try:
            st = os.stat(t.path)
        except FileNotFoundError:
            raise TemplateChanged(f"template {t.id}: its file {t.path} is gone", op="check template",
                                  obj=t.id) from None
        if (st.st_size, st.st_mtime_ns, st.st_ino) != (t.size, t.mtime_ns, t.ino):
            self.registry.set_template_state(t.id, "changed")
            raise TemplateChanged(
                f"template {t.id}: {t.path} changed on disk since import (size {t.size} -> {st.st_size}, "
                f"mtime or inode differ); attaching it would silently corrupt every volume over it",
                op="check template", obj=t.id, hint="import the new image as a new template")

    def verify_template(self, ref: str, progress: Progress | None = None) -> Template:
        """Check size, mtime and the full content digest; mark the template changed if they differ."""
        t = self.registry.get_template(ref)
        self.check_template(t)
        if _sha256(t.path, progress) != t.digest:
            self.registry.set_template_state(t.id, "changed")
            raise TemplateChanged(f"template {t.id}: content digest differs from import", op="verify template",
                                  obj=t.id)
        return self.template(t.id)

    def remove_template(self, ref: str) -> None:
        t = self.registry.get_template(ref)
        with self._lock("template", t.id):
            users = self.registry.template_users(t.id)
            if users:
                raise InUse(f"remove template {t.id}: used by volumes {', '.join(users)}", op="remove template",
                            obj=t.id, hint="remove or flatten those volumes first")
            if t.owned:
                with contextlib.suppress(OSError):
                    fs.set_immutable(t.path, False)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(t.path)
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.dirname(t.path))
            self.registry.delete_template(t.id)

    # -- volumes ---------------------------------------------------------------------

    def volumes(self) -> list[Volume]:
        return [self._to_volume(v) for v in self.registry.volumes()]

    def volume(self, vid: str) -> Volume:
        return self._to_volume(self.registry.get_volume(vid))

    def create_volume(self, vid: str, template: str, *, progress: Progress | None = None) -> Volume:
        """A new writable copy-on-write volume over ``template``, attached, with its stable link."""
        validate_id(vid)
        t = self.registry.get_template(template)
        self.check_template(t)
        with self._lock("volume", vid), _named_errors("create volume", vid):
            now = time.time()
            row = VolumeRow(vid, t.id, self.backend_name, CREATING, t.size // 512 * 512,
                            self._vol_dir(vid), None, now, now, None, None)
            intent = self.registry.begin_intent("create", volume_id=vid)
            try:
                self.registry.add_volume(row)
            except BaseException:
                self.registry.end_intent(intent)
                raise
            ctx = self._ctx(row, t, op="create", progress=progress)
            try:
                dev = self.backend.create(ctx)
                self._set_link(vid, self.link_path(vid), dev)
                failpoints.hit("create", "link")
                with self.registry.tx():
                    self.registry.update_volume(vid, state=ATTACHED, device=dev)
                    self.registry.end_intent(intent)
            except BaseException as e:
                self._rollback(row, ctx, intent, e)
                raise
        return self.volume(vid)

    def _rollback(self, row: VolumeRow, ctx: VolumeCtx, intent: int, cause: BaseException | None) -> None:
        """Undo everything made for a volume that was being created; re-raise nothing."""
        try:
            self._teardown(row, ctx)
            with self.registry.tx():
                self.registry.delete_volume(row.id)
                self.registry.end_intent(intent)
        except Exception as e:  # keep the intent: recovery will retry
            if cause is not None:
                cause.add_note(f"rollback of volume {row.id} failed too: {e}; `cowdisk recover` retries it")

    def _teardown(self, row: VolumeRow, ctx: VolumeCtx, *, keep_data: bool = False,
                  deadline_s: float = 5.0) -> None:
        """Ordered teardown: device, links, then the data (only once the device let go).

        The device goes first so that a device still held open (EBUSY at the deadline)
        leaves the volume exactly as it was, links included; see :meth:`_detach_or_revert`.
        """
        self.backend.detach(ctx, deadline_s=deadline_s)
        for path, _, _ in self.registry.links(row.id):
            self._drop_link(path)
        if keep_data:
            return
        self.backend.destroy(ctx)
        shutil.rmtree(ctx.data_dir, ignore_errors=True)
        shutil.rmtree(os.path.dirname(self.link_path(row.id)), ignore_errors=True)

    def remove_volume(self, vid: str, *, deadline_s: float = 5.0) -> None:
        """Detach and delete a volume and its data. Retries while the device is briefly busy."""
        with self._lock("volume", vid):
            v = self.registry.get_volume(vid)
            ctx = self._ctx(v, op="remove")
            if v.state == ATTACHED:
                self._check_not_open(v, ctx, deadline_s)
            intent = self.registry.begin_intent("remove", volume_id=vid)
            self.registry.update_volume(vid, state=REMOVING)
            failpoints.hit("remove", "intent")
            self._detach_or_revert(v, ctx, intent, deadline_s)
            self._teardown(v, ctx, deadline_s=deadline_s)
            failpoints.hit("remove", "teardown")
            with self.registry.tx():
                self.registry.delete_volume(vid)
                self.registry.end_intent(intent)

    def _detach_or_revert(self, v: VolumeRow, ctx: VolumeCtx, intent: int, deadline_s: float) -> None:
        """Release the device; if someone opened it after the holder check and it is still
        attached at the deadline, put the volume back as it was and raise InUse."""
        try:
            self.backend.detach(ctx, deadline_s=deadline_s)
        except (KernelError, InUse) as e:
            if v.state != ATTACHED or not self.backend.is_attached(ctx):
                raise
            with self.registry.tx():
                self.registry.update_volume(v.id, state=ATTACHED)
                self.registry.end_intent(intent)
            dev = v.device or ""
            pids = [p for p in procfs.holders(dev)] if dev else []
            raise InUse(f"release volume {v.id}: its device {dev} is still open"
                        + (f" by PID {', '.join(map(str, pids))}" if pids else ""),
                        op="release volume", obj=v.id, hint="stop the VM that uses it first") from e

    def _check_not_open(self, v: VolumeRow, ctx: VolumeCtx, deadline_s: float) -> None:
        """Fail early, with the holder's PIDs, when a VM still has the device (or, for file
        backends, the volume file: same st_dev/st_ino, through any link) open."""
        dev = self.backend.device_path(ctx)
        if dev is None:
            return
        holders = procfs.holders
        what = "device" if self.backend.block_device else "file"
        end = time.monotonic() + deadline_s
        while True:
            # our own process counts for a block device: dm remove would fail on its open too
            pids = [p for p in holders(dev) if p != os.getpid() or self.backend.block_device]
            if not pids:
                return
            if time.monotonic() > end:
                raise InUse(f"remove volume {v.id}: {what} {dev} is still open by PID "
                            f"{', '.join(map(str, pids))}", op="remove volume", obj=v.id,
                            hint="stop the VM that uses it first")
            time.sleep(0.05)

    def checkpoint(self, vid: str, *, deadline_s: float = 5.0) -> Volume:
        """Detach a volume and keep its data (the VM is paused or gone)."""
        with self._lock("volume", vid):
            v = self.registry.get_volume(vid)
            if v.state != ATTACHED:
                raise StateError(f"checkpoint volume {vid}: it is {v.state}, not attached", op="checkpoint",
                                 obj=vid)
            ctx = self._ctx(v, op="checkpoint")
            self._check_not_open(v, ctx, deadline_s)
            intent = self.registry.begin_intent("checkpoint", volume_id=vid)
            self._detach_or_revert(v, ctx, intent, deadline_s)
            self._teardown(v, ctx, keep_data=True, deadline_s=deadline_s)
            failpoints.hit("checkpoint", "detach")
            with self.registry.tx():
                self.registry.update_volume(vid, state=CHECKPOINTED, device=None)
                self.registry.end_intent(intent)
        return self.volume(vid)

    def restore(self, vid: str, new_id: str | None = None, *, retarget_source_link: bool = True,
                progress: Progress | None = None) -> Volume:
        """Attach a checkpointed volume again, in place or as a new volume ``new_id``.

        Restoring under a new id copies the checkpoint's data (sparse, or reflinked
        where the filesystem can), so the checkpoint stays as it was and can be
        restored again. By default the source's stable link is retargeted to the new
        device too: that is the path a VM snapshot recorded.
        """
        if new_id is None or new_id == vid:
            return self._restore_in_place(vid)
        validate_id(new_id)
        with self._lock("volume", vid), self._lock("volume", new_id):
            src = self.registry.get_volume(vid)
            if src.state != CHECKPOINTED:
                raise StateError(f"restore volume {vid}: it is {src.state}, not checkpointed", op="restore",
                                 obj=vid, hint="checkpoint it first, or use fork")
            self._require_data(src)
            t = self.registry.get_template(src.template_id)
            self.check_template(t)
            intent = self.registry.begin_intent("restore", volume_id=new_id, data={"source": vid})
            now = time.time()
            row = VolumeRow(new_id, t.id, src.backend, CREATING, src.size, self._vol_dir(new_id), None, now,
                            now, vid, None)
            try:
                self.registry.add_volume(row)
            except BaseException:
                self.registry.end_intent(intent)
                raise
            ctx = self._ctx(row, t, op="restore", progress=progress)
            try:
                self.backend.copy_data(self._ctx(src, t), ctx, src_attached=False)
                failpoints.hit("restore", "copy")
                dev = self.backend.attach(ctx)
                failpoints.hit("restore", "attach")
                self._set_link(new_id, self.link_path(new_id), dev)
                if retarget_source_link:
                    self._set_link(new_id, self.link_path(vid), dev)
                failpoints.hit("restore", "link")
                with self.registry.tx():
                    self.registry.update_volume(new_id, state=ATTACHED, device=dev)
                    self.registry.end_intent(intent)
            except BaseException as e:
                self._rollback(row, ctx, intent, e)
                raise
        return self.volume(new_id)

    def _require_data(self, v: VolumeRow) -> None:
        """Refuse a restore early and clearly when the checkpoint's data files (the ones the
        registry recorded for the volume) vanished behind cowdisk's back."""
        missing = [name for kind, name, _ in self.registry.objects(v.id)
                   if kind == "file" and not os.path.exists(name)]
        if missing:
            raise NotFound(f"restore volume {v.id}: its checkpointed data is gone ({', '.join(missing)})",
                           op="restore", obj=v.id,
                           hint="it cannot be restored; `cowdisk volume remove` it")

    def _restore_in_place(self, vid: str) -> Volume:
        with self._lock("volume", vid):
            v = self.registry.get_volume(vid)
            if v.state != CHECKPOINTED:
                raise StateError(f"restore volume {vid}: it is {v.state}, not checkpointed", op="restore",
                                 obj=vid)
            self._require_data(v)
            t = self.registry.get_template(v.template_id)
            self.check_template(t)
            ctx = self._ctx(v, t, op="restore")
            intent = self.registry.begin_intent("restore", volume_id=vid, data={"in_place": True})
            try:
                dev = self.backend.attach(ctx)
                failpoints.hit("restore", "attach")
                self._set_link(vid, self.link_path(vid), dev)
                failpoints.hit("restore", "link")
                with self.registry.tx():
                    self.registry.update_volume(vid, state=ATTACHED, device=dev)
                    self.registry.end_intent(intent)
            except BaseException as e:
                try:
                    self._teardown(v, ctx, keep_data=True)
                    self.registry.end_intent(intent)
                except Exception as e2:
                    e.add_note(f"undo of restore {vid} failed too: {e2}")
                raise
        return self.volume(vid)

    def fork(self, vid: str, new_ids: list[str], *, progress: Progress | None = None) -> list[Volume]:
        """New volumes that each start from ``vid``'s current contents."""
        for n in new_ids:
            validate_id(n)
        out = []
        for n in new_ids:
            with self._lock("volume", vid), self._lock("volume", n):
                src = self.registry.get_volume(vid)
                if src.state not in (ATTACHED, CHECKPOINTED):
                    raise StateError(f"fork volume {vid}: it is {src.state}", op="fork", obj=vid)
                t = self.registry.get_template(src.template_id)
                intent = self.registry.begin_intent("create", volume_id=n, data={"fork_of": vid})
                now = time.time()
                row = VolumeRow(n, t.id, src.backend, CREATING, src.size, self._vol_dir(n), None, now, now,
                                vid, None)
                try:
                    self.registry.add_volume(row)
                except BaseException:
                    self.registry.end_intent(intent)
                    raise
                ctx = self._ctx(row, t, op="fork", progress=progress)
                try:
                    self.backend.copy_data(self._ctx(src, t), ctx, src_attached=src.state == ATTACHED)
                    dev = self.backend.attach(ctx)
                    self._set_link(n, self.link_path(n), dev)
                    with self.registry.tx():
                        self.registry.update_volume(n, state=ATTACHED, device=dev)
                        self.registry.end_intent(intent)
                except BaseException as e:
                    self._rollback(row, ctx, intent, e)
                    raise
            out.append(self.volume(n))
        return out

    def flatten(self, vid: str, name: str | None = None, *, progress: Progress | None = None) -> Template:
        """Materialise a volume (template + its changes) as a new template."""
        if name is not None:
            validate_id(name, "template name")
        with self._lock("volume", vid):
            v = self.registry.get_volume(vid)
            if v.state not in (ATTACHED, CHECKPOINTED):
                raise StateError(f"flatten volume {vid}: it is {v.state}", op="flatten", obj=vid)
            t = self.registry.get_template(v.template_id)
            self.check_template(t)
            staging = os.path.join(self.data_root, "templates", f".staging-{os.getpid()}-{secrets.token_hex(4)}")
            intent = self.registry.begin_intent("flatten", volume_id=vid, data={"staging": staging})
            try:
                os.makedirs(staging)
                out = os.path.join(staging, "disk.img")
                ctx = self._ctx(v, t, op="flatten", progress=progress)
                self.backend.flatten(ctx, out, attached=v.state == ATTACHED)
                failpoints.hit("flatten", "data")
                digest = _sha256(out)
                existed = self.registry.find_template(digest[:16]) is not None
                self.registry.update_intent(intent, {"staging": staging, "template_id": digest[:16],
                                                     "existed": existed})
                tpl = self._register_template(out, digest, owned=True, source=f"flatten:{vid}", name=name)
                failpoints.hit("flatten", "register")
                self.registry.end_intent(intent)
                return tpl
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def usage(self, vid: str) -> Usage:
        v = self.registry.get_volume(vid)
        return self.backend.usage(self._ctx(v), attached=v.state == ATTACHED)

    def template_usage(self, ref: str) -> int:
        """Bytes the template's file really takes on disk (st_blocks)."""
        return fs.disk_usage(self.registry.get_template(ref).path)

    def jail(self, vid: str, jail_dir: str, name: str = "rootfs", *, uid: int | None = None,
             gid: int | None = None) -> str:
        """Stage the volume inside a jail directory: a device node (block) or a hard link (file)."""
        v = self.registry.get_volume(vid)
        if v.state != ATTACHED or not v.device:
            raise StateError(f"jail volume {vid}: it is {v.state}, not attached", op="jail", obj=vid)
        if not os.path.isdir(jail_dir):
            raise NotFound(f"jail volume {vid}: jail directory {jail_dir} does not exist", op="jail", obj=jail_dir)
        dest = os.path.join(jail_dir, name)
        if self.backend.block_device:
            ma, mi = blk.devno(v.device)
            blk.make_node(dest, ma, mi, uid=uid, gid=gid)
            return dest
        if os.stat(jail_dir).st_dev != os.stat(v.device).st_dev:
            raise Unsupported(f"jail volume {vid}: {jail_dir} is on another filesystem than the volume file",
                              op="jail", obj=vid,
                              hint="put the jail on the store's filesystem, so that a hard link can be used")
        tmp = dest + f".cowdisk-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        try:
            os.link(v.device, tmp)
            os.replace(tmp, dest)
            # rename(2) of two links to one inode (a re-jail) does nothing: drop the temporary
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise KernelError.from_oserror("jail: hard link", dest, e) from None
        if uid is not None or gid is not None:
            os.chown(dest, -1 if uid is None else uid, -1 if gid is None else gid)
        return dest

    # -- links -------------------------------------------------------------------------

    def _set_link(self, owner: str, path: str, target: str) -> None:
        """Point ``path`` at ``target`` atomically (symlink under a temporary name, then rename)."""
        d = os.path.dirname(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            os.makedirs(d, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            os.symlink(target, tmp)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            hint = ("its directory must be writable: not read-only, not immutable (see lsattr -d)"
                    if e.errno in (errno.EPERM, errno.EACCES, errno.EROFS) else "")
            raise KernelError.from_oserror("set stable link", path, e, hint=hint) from None
        self.registry.set_link(path, owner, target)

    def _drop_link(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        d = os.path.dirname(path)
        vdir_owner = os.path.basename(d)
        if self.registry.find_volume(vdir_owner) is None or not os.listdir(d):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        self.registry.drop_link(path)

    # -- recovery --------------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Reconcile registry, kernel and files after a crash or a restart."""
        rep = RecoveryReport()
        for it in self.registry.intents():
            if process_alive(it.pid, it.pid_start):
                continue
            try:
                self._recover_intent(it, rep)
            except CowdiskError as e:
                rep.errors.append(f"{it.op} {it.volume_id}: {e}")
        live = self.registry.live_intent_volumes()
        known = {v.id: v for v in self.registry.volumes()}
        # kernel objects of this store that no volume accounts for
        for obj in list(self.backend.scan(self.tag)):
            vid = obj.volume_id
            if vid in live:
                continue
            v = known.get(vid) if vid else None
            if v is not None and v.state in (ATTACHED, CREATING):
                continue
            if obj.kind == "loop" and vid is None:
                continue  # a template loop: kept alive only by the dm tables that use it
            # another process or thread may be creating this volume right now: look again
            # under its lock (and leave it alone if someone holds that lock)
            with self._idle_volume(vid) if vid else contextlib.nullcontext(True) as idle:
                if not idle or (vid and not self._orphan_now(vid)):
                    continue
                try:
                    self.backend.release(obj)
                    rep.orphans_removed.append(f"{obj.kind} {obj.name}")
                except CowdiskError as e:
                    rep.errors.append(f"release {obj.kind} {obj.name}: {e}")
        # attached volumes whose device is gone (host reboot): attach them again
        for v in known.values():
            if v.state != ATTACHED or v.id in live:
                continue
            with self._idle_volume(v.id) as idle:
                # under the lock, fresh: a concurrent remove may have taken it away meanwhile
                cur = self.registry.find_volume(v.id) if idle else None
                if cur is None or cur.state != ATTACHED or v.id in self.registry.live_intent_volumes():
                    continue
                ctx = self._ctx(cur, op="recover")
                if self.backend.is_attached(ctx):
                    rep.kept.append(v.id)
                    continue
                try:
                    dev = self.backend.attach(ctx)
                    self._set_link(v.id, self.link_path(v.id), dev)
                    self.registry.update_volume(v.id, device=dev)
                    rep.reactivated.append(v.id)
                except (CowdiskError, OSError) as e:
                    self.registry.update_volume(v.id, state=ERROR, error=str(e))
                    rep.errors.append(f"reactivate {v.id}: {e}")
        # files and links of volumes that do not exist
        for base in (os.path.join(self.data_root, "volumes"), os.path.join(self.root, "links")):
            for name in os.listdir(base):
                if name in known or name in live:
                    continue
                with self._idle_volume(name) as idle:  # not a volume being created right now
                    if not idle or not self._orphan_now(name, files=True):
                        continue
                    shutil.rmtree(os.path.join(base, name), ignore_errors=True)
                    rep.orphans_removed.append(os.path.join(base, name))
        for base in (os.path.join(self.data_root, "templates"), os.path.join(self.root, "staging")):
            for name in os.listdir(base):
                if not (name.startswith(".staging-") or name.startswith("build-")):
                    continue
                pid = _pid_of(name)
                if pid and os.path.exists(f"/proc/{pid}"):
                    continue
                shutil.rmtree(os.path.join(base, name), ignore_errors=True)
                rep.orphans_removed.append(os.path.join(base, name))
        return rep

    @contextlib.contextmanager
    def _idle_volume(self, vid: str) -> Iterator[bool]:
        """Hold volume ``vid``'s lock if nobody else does; yield False (and hold nothing) when
        another process or thread is working on that volume: recovery then leaves it alone."""
        lk = FileLock(os.path.join(self.root, "locks", f"volume-{vid}.lock"), timeout=0, what=f"volume {vid}")
        try:
            lk.acquire()
        except CowdiskError:
            yield False
            return
        try:
            yield True
        finally:
            lk.release()

    def _orphan_now(self, vid: str, *, files: bool = False) -> bool:
        """Looked up again (under the volume's lock): nothing of ``vid`` is in use.
        Kernel objects are orphans unless the volume is attached or being created; files
        and links are orphans only when no volume ``vid`` exists at all."""
        if vid in self.registry.live_intent_volumes():
            return False
        v = self.registry.find_volume(vid)
        if files:
            return v is None
        return v is None or v.state not in (ATTACHED, CREATING)

    def _recover_intent(self, it: Intent, rep: RecoveryReport) -> None:
        vid = it.volume_id
        label = f"{it.op} {vid}"
        v = self.registry.find_volume(vid) if vid else None
        if it.op == "flatten":
            shutil.rmtree(it.data.get("staging", ""), ignore_errors=True)
            tid = it.data.get("template_id")
            if tid and not it.data.get("existed") and self.registry.find_template(tid) is not None:
                self.remove_template(tid)  # registered, but the flatten never returned it
            self.registry.end_intent(it.id)
            rep.rolled_back.append(label)
            return
        if v is None:
            # nothing registered: only files or kernel objects may remain; the orphan scan takes them
            self.registry.end_intent(it.id)
            rep.rolled_back.append(label)
            return
        ctx = self._ctx(v, op="recover")
        with self._lock("volume", v.id):
            if it.op == "create" or (it.op == "restore" and not it.data.get("in_place")):
                self._teardown(v, ctx)
                with self.registry.tx():
                    self.registry.delete_volume(v.id)
                    self.registry.end_intent(it.id)
                rep.rolled_back.append(label)
            elif it.op == "restore":
                self._teardown(v, ctx, keep_data=True)
                with self.registry.tx():
                    self.registry.update_volume(v.id, state=CHECKPOINTED, device=None)
                    self.registry.end_intent(it.id)
                rep.rolled_back.append(label)
            elif it.op == "remove":
                self._teardown(v, ctx)
                with self.registry.tx():
                    self.registry.delete_volume(v.id)
                    self.registry.end_intent(it.id)
                rep.finished.append(label)
            elif it.op == "checkpoint":
                self._teardown(v, ctx, keep_data=True)
                with self.registry.tx():
                    self.registry.update_volume(v.id, state=CHECKPOINTED, device=None)
                    self.registry.end_intent(it.id)
                rep.finished.append(label)
            else:
                self.registry.end_intent(it.id)

    def gc(self) -> RecoveryReport:
        """Recovery, then remove templates no volume uses and that have no name."""
        rep = self.recover()
        for t in self.registry.templates():
            if not t.names and not self.registry.template_users(t.id):
                self.remove_template(t.id)
                rep.orphans_removed.append(f"template {t.id}")
        return rep

    def grow_pool(self, size: int) -> int:
        """Grow the embedded pool to ``size`` bytes (pool backend); returns its free bytes."""
        if self.backend_name != "pool":
            raise StateError(f"grow pool: store {self.root} uses the {self.backend_name} backend, not pool",
                             op="grow pool", obj=self.root)
        self.pool.grow(size)
        return fs.statfs(self.pool.mnt).free_bytes

    def destroy(self) -> None:
        """Remove every volume and template, unmount the pool. For tests and teardown."""
        for v in self.registry.volumes():
            self.remove_volume(v.id)
        for t in self.registry.templates():
            self.remove_template(t.id)
        if os.path.isdir(os.path.join(self.root, "cache")):
            from .cache import TemplateCache

            TemplateCache(os.path.join(self.root, "cache")).clean_all()
        if self.backend_name == "pool":
            self.pool.destroy()


@contextlib.contextmanager
def _named_errors(op: str, obj: str) -> Iterator[None]:
    """Turn a bare OSError or SQLite error (ENOSPC, "database or disk is full") into a
    cowdisk error that names the operation and the object."""
    try:
        yield
    except CowdiskError:
        raise
    except OSError as e:
        raise KernelError(op, obj, e.errno or 0, detail=e.filename or "") from e
    except sqlite3.Error as e:
        raise CowdiskError(f"{op} {obj}: registry {e}", op=op, obj=obj,
                           hint="free space on the store's filesystem" if "full" in str(e) else "") from e


def _pid_of(name: str) -> int | None:
    m = re.search(r"-(\d+)-[0-9a-f]+$", name)
    return int(m.group(1)) if m else None


def _require_reflink(path: str) -> None:
    st = fs.fs_type(path)
    if not st.reflink_capable and not fs.probe_reflink(fs.nearest_existing(path)):
        raise Unsupported(
            f"reflink backend: {st.path} is on {st.name}, which cannot reflink", op="open store", obj=path,
            hint="put the store on btrfs or xfs (reflink=1), or use --backend pool or copy")


def choose_backend(root: str) -> str:
    """dm-snapshot where device-mapper and its snapshot target exist, else reflink, else pool, else copy."""
    return explain_backend(root)[0]


def explain_backend(root: str) -> tuple[str, list[str]]:
    """The backend ``auto`` picks for ``root`` and why."""
    why: list[str] = []
    from .backends.dm_snapshot import snapshot_supported

    ok, reason = snapshot_supported()
    if ok:
        why.append("device-mapper with the snapshot target is available")
        return "dm-snapshot", why
    why.append(f"dm-snapshot: {reason}")
    st = fs.fs_type(root)
    if st.reflink_capable:
        why.append(f"{st.path} is on {st.name}, which can reflink")
        return "reflink", why
    why.append(f"reflink: {st.path} is on {st.name}, which cannot reflink")
    if os.path.exists("/dev/loop-control") and shutil.which("mkfs.xfs"):
        why.append("pool: loop devices and mkfs.xfs are here: an embedded xfs pool under the store")
        return "pool", why
    why.append("pool: needs /dev/loop-control and mkfs.xfs")
    why.append("copy: always works, one full sparse copy per volume")
    return "copy", why
