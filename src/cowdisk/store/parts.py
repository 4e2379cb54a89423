"""What every part of the store shares: the opened registry and backend, paths, locks,
the context a backend is handed for a volume, the stable links, and the ordered teardown.
:class:`~cowdisk.store.core.Store` (the operations) and :mod:`~cowdisk.store.recovery`
both build on it, so neither reaches into the other."""

from __future__ import annotations

import contextlib
import copy
import errno
import os
import secrets
import json
import logging
import shutil
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Self


from .. import failpoints
from ..contract import check_backend
from ..backends import Backend, BackendEnv, HoldsTemplates, TemplateRef, VolumeCtx, backend_class, explain
from ..errors import CowdiskError, Forbidden, InUse, InvalidArgument, KernelError, NotFound, RegistryDamaged, Unsupported
from ..kernel import procfs
from ..locks import FileLock
from ..progress import Progress
from ..registry import ATTACHED, Registry, TemplateRow, VolumeRow
from . import limits as limits_mod
from . import manifest, modes
from .limits import Limits
from .model import default_root
from .templates import Holder, Templates, is_lazy

if TYPE_CHECKING:
    from .remote import RemoteTemplates


log = logging.getLogger(__name__)

RESERVE = "reserve"
RESERVE_BYTES = 8 << 20
"""Allocated space the store gives back when its filesystem is full (see release_reserve)."""
LINK_TMP = ".tmp-"
"""A file the store replaces atomically is written as ``<name>.tmp-<pid>-<start>`` and renamed
over ``<name>``: a link (``rootfs``), a manifest, the reserve. Recovery removes those of
processes that are gone."""
QUARANTINE = "quarantine"
QUARANTINE_NOTE = "why.json"


def manifest_of_quarantine(path: str) -> dict[str, Any]:
    """The ``why.json`` of a quarantine entry ({} when unreadable)."""
    try:
        with open(os.path.join(path, QUARANTINE_NOTE)) as f:
            note = json.load(f)
        return note if isinstance(note, dict) else {}
    except (OSError, ValueError):
        return {}


DAEMON_LOCK = os.path.join("locks", "daemon.lock")
"""The lock a cowdiskd holds on its store while it serves it (daemon/server.py)."""


def serving_daemon(root: str) -> int | None:
    """The PID of the cowdiskd serving the store at ``root`` (it holds ``locks/daemon.lock``),
    or None when none does."""
    path = os.path.join(root, DAEMON_LOCK)
    if not os.path.exists(path):
        return None
    probe = FileLock(path, timeout=0)
    try:
        if probe.try_acquire():
            return None
    except CowdiskError:
        return None
    finally:
        probe.release()
    holders = [p for p, _ in procfs.lock_holders(path)]
    try:  # the daemon writes its PID into the file (its store workers share the lock)
        with open(path) as f:
            hint = int(f.read().strip() or 0)
    except (OSError, ValueError):
        hint = 0
    return hint if hint in holders or not holders else holders[0]


def refuse_under_daemon(root: str, op: str, daemon: int | None = None) -> None:
    """Raise InUse naming the PID of the cowdiskd serving the store at ``root``: ``op`` would
    pull the store from under it (unless this process is that daemon's, ``daemon``)."""
    pid = serving_daemon(root)
    if pid is not None and pid != daemon:
        raise InUse(f"{op} {root}: cowdiskd (PID {pid}) serves this store", op=op, obj=root,
                    hint="go through the daemon (COWDISK_SOCKET at its socket: it then stops), or stop it first "
                         f"(systemctl stop cowdisk, or kill -TERM {pid})")


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class _VolumeLock(FileLock):
    """A volume's lock: a call that fails with no volume of that id left (an id that never
    existed, a create undone) takes the lock file with it, while it holds it: one lock file per
    volume that exists, not one per id anyone ever named."""

    def __init__(self, path: str, registry: Registry, vid: str, **kw: Any) -> None:
        super().__init__(path, **kw)
        self._registry = registry
        self._vid = vid

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        if t is not None and self.fd >= 0:
            try:
                self._registry.get_volume(self._vid)
            except NotFound:
                self.unlink()
            except Exception:  # the registry unreadable: keep the file (harmless), report the first error
                pass
        super().__exit__(t, v, tb)


class StoreParts:
    """One store root opened: registry, backend (chosen once and recorded), templates."""

    def __init__(self, root: str | None = None, *, backend: str = "auto", lock_timeout: float = 30.0,
                 backend_options: Mapping[str, str] | None = None, rebuild: bool = False,
                 limits: Limits | None = None) -> None:
        self.root = os.path.abspath(root or default_root())
        self.lock_timeout = lock_timeout
        self._scope = threading.local()
        self.daemon: int | None = None
        """The PID of the cowdiskd this Store works for (the daemon sets it on its own stores and
        its workers'): what would pull the store from under a daemon is allowed to that one."""
        self.caller = os.getuid()
        """Whose calls these are: the real uid (under sudo: root; SUDO_UID is not trusted, see
        docs/cli.md), or the uid :meth:`as_caller` scoped this view to (the daemon's peer)."""
        try:
            self.root_uid = os.stat(self.root).st_uid
        except FileNotFoundError:  # a new store: the caller makes its directory and owns it
            self.root_uid = self.caller
        except OSError:
            self.root_uid = 0
        self.admin = self.caller in (0, self.root_uid)
        """Root (or the owner of the store's directory, who owns every file of it anyway): sees
        and does everything. Anyone else sees only its own volumes, and its own and the
        shared templates."""
        self.limits = limits if limits is not None else limits_mod.load(self.root)
        self.read_only = _read_only(self.root)
        """The store's filesystem is mounted read-only: reading commands work, changes fail
        with EROFS, recovery does not run."""
        if not self.read_only:
            for d in ("locks", "links"):
                modes.make_dirs(os.path.join(self.root, d))
        db = os.path.join(self.root, "registry.db")
        known = manifest.read(os.path.join(self.root, manifest.STORE_FILE))
        if known is not None and not os.path.exists(db) and not rebuild:
            raise RegistryDamaged(f"open store {self.root}: its registry {db} is gone", op="open registry",
                                  obj=db, hint="`cowdisk recover --rebuild-registry` rebuilds it from the volumes' "
                                               "and templates' manifests")
        self.registry = self._open_registry(db)
        try:
            self._open(known, backend=backend, backend_options=backend_options, rebuild=rebuild)
        except BaseException:
            self.registry.close()  # a store that cannot open keeps no file of it open
            raise

    def _open(self, known: dict[str, Any] | None, *, backend: str, backend_options: Mapping[str, str] | None,
              rebuild: bool) -> None:
        """The rest of opening, once the registry is open: the store's id, its backend
        (chosen once and recorded), the data directories, the templates."""
        self.id = self.registry.meta("store_id") or self.registry.set_meta_default(
            "store_id", str((known or {}).get("store_id")) if known else secrets.token_hex(4))
        self.tag = f"cowdisk:{self.id}"
        self.dm_prefix = f"cowdisk-{self.id}-"
        recorded = self.registry.meta("backend")
        if recorded is None and known is not None and rebuild:  # the lost registry's choice
            recorded = self.registry.set_meta_default("backend", str(known["backend"]))
            self.registry.set_meta_default("backend_options", json.dumps(known.get("backend_options") or {}))
        if recorded is not None:
            check_backend(self.root, recorded, backend)
        chosen = recorded or (explain(self.root)[0] if backend == "auto" else backend)
        if recorded is None and backend != "auto":  # a new store: refuse what cannot work here
            ok, why = backend_class(chosen).available(self.root)
            if not ok:
                raise Unsupported(f"open store {self.root} with backend {chosen}: {why}", op="open store",
                                  obj=self.root, hint="`cowdisk doctor` says which backends this host has")
        saved = self.registry.meta("backend_options")
        options = dict(json.loads(saved)) if saved else dict(backend_options or {})
        if saved and backend_options and dict(backend_options) != options:
            raise InvalidArgument(f"store {self.root} was made with backend options {options}, not "
                                  f"{dict(backend_options)}", op="open store", obj=self.root)
        # open it before recording it: a backend that cannot work here (reflink on ext4, a pool
        # whose mkfs fails) leaves the store unrecorded, free to be made with another one
        self.backend: Backend = backend_class(chosen).open(BackendEnv(
            root=self.root, tag=self.tag, dm_prefix=self.dm_prefix, options=options,
            shared_loop_get=self.registry.template_loop, shared_loop_set=self.registry.set_template_loop))
        if recorded is None:
            with self.registry.tx():
                in_force = self.registry.set_meta_default("backend", chosen)
                self.registry.set_meta_default("backend_options", json.dumps(options, sort_keys=True))
            if in_force != chosen:  # another process made the store first, with another backend
                raise InvalidArgument(f"store {self.root} was just made with backend {in_force}, not {chosen}",
                                      op="open store", obj=self.root)
        self.backend_name = chosen
        self.data_root = self.backend.data_root
        if not self.read_only:
            for d in ("templates", "volumes"):
                modes.make_dirs(os.path.join(self.data_root, d))
            self._keep_reserve()
        if not self.read_only and (known or {}).get("modes") != modes.VERSION:
            # a store made before the file-mode rules (or a new one): walked once per rules' version
            modes.make_private(self.root, self.data_root, on_immutable=self._template_chmodded)
            doc = {k: v for k, v in (known or {}).items() if k != "format"}
            doc.update(store_id=doc.get("store_id", self.id), backend=doc.get("backend", chosen),
                       backend_options=doc.get("backend_options", options), modes=modes.VERSION)
            manifest.write(os.path.join(self.root, manifest.STORE_FILE), doc)
        self._templates = Templates(self.registry, self.data_root, lambda tid: self.lock("template", tid),
                                    store_id=self.id).as_caller(self.caller, None if self.admin else self.caller)
        if isinstance(self.backend, HoldsTemplates):
            self._templates.holder = self.backend
        self._templates.stop_lazy = lambda manifest_digest: self._remote().lazy_stop(manifest_digest)

    def _remote(self) -> "RemoteTemplates":
        from .remote import RemoteTemplates

        return RemoteTemplates(self.root, self._templates)

    def template_ref(self, t: TemplateRow) -> TemplateRef:
        """What the backend knows of template ``t``: a lazy template's ref starts (or finds)
        its server when the backend asks (``TemplateRef.serve``), and gives its cache's data
        file once the cache is whole (``TemplateRef.whole``)."""
        if not is_lazy(t.path):
            return TemplateRef(t.id, t.path, t.size, t.digest)
        path = t.path
        return TemplateRef(t.id, t.path, t.size, t.digest, serve=lambda: self._remote().serve_template(path),
                           whole=lambda: self._remote().whole_data(path))

    def close(self) -> None:
        self.registry.close()

    # -- owners ---------------------------------------------------------------------------

    def as_caller(self, uid: int) -> Self:
        """This store as caller ``uid`` sees it: the same registry, backend and locks, every
        method with the same signature, but what it lists, finds and changes is what that
        uid may (its own volumes, its own and the shared templates; root: everything), and
        what it makes is that uid's. The daemon runs each request on one (its peer's
        SO_PEERCRED uid)."""
        view = copy.copy(self)
        view.caller = uid
        view.admin = uid in (0, self.root_uid)
        view._templates = self._templates.as_caller(uid, None if view.admin else uid)
        return view

    @property
    def viewer(self) -> int | None:
        """The uid whose volumes this view sees, or None (root's view: every volume)."""
        return None if self.admin else self.caller

    def require_admin(self, op: str, obj: str) -> None:
        """Refuse (Forbidden) an operation only root may do, to anyone else."""
        if not self.admin:
            raise Forbidden(f"{op} {obj}: only root may (the caller is uid {self.caller})", op=op, obj=obj)

    def _template_chmodded(self, path: str) -> None:
        """A template file's mode was narrowed (its change time moved): refresh its record,
        unless it had changed already (then its next check marks it changed, as before)."""
        for t in self.registry.templates():
            if t.path != path:
                continue
            st = os.stat(path)
            if t.state == "ready" and (st.st_size, st.st_mtime_ns, st.st_ino) == (t.size, t.mtime_ns, t.ino):
                self.registry.set_template_identity(t.id, t.size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)

    # -- a full filesystem ----------------------------------------------------------------

    def _open_registry(self, db: str) -> Registry:
        """Open the registry; on a full filesystem give back the reserve and try once more,
        so that the commands that free space (rm, checkpoint, recover, gc) still work."""
        if not self.read_only and not os.path.exists(db):
            # SQLite makes its -wal and -shm with the database's own mode: 0600 from the start
            with contextlib.suppress(OSError):
                os.close(modes.open_private(db, os.O_WRONLY | os.O_CREAT))
        try:
            return Registry(db, read_only=self.read_only)
        except KernelError as e:
            if e.errno != errno.ENOSPC or not self.release_reserve():
                raise
            return Registry(db, read_only=self.read_only)

    def _keep_reserve(self) -> None:
        """Keep ``<root>/reserve`` (RESERVE_BYTES, allocated) while there is room for it: it
        is given back when the filesystem is full, for the registry's own writes."""
        path = os.path.join(self.root, RESERVE)
        if os.path.exists(path):
            return
        try:
            st = os.statvfs(self.root)
            if st.f_bavail * st.f_frsize < 2 * RESERVE_BYTES:
                return
            tmp = f"{path}{LINK_TMP}{os.getpid()}-{procfs.process_start(os.getpid())}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(f"{path}{LINK_TMP}{os.getpid()}-{procfs.process_start(os.getpid())}")

    def check_room(self, op: str, obj: str) -> None:
        """Refuse (ENOSPC) an operation that takes space when the reserve is gone and less
        than its size is free: what is left is kept for remove and checkpoint."""
        if self.read_only or os.path.exists(os.path.join(self.root, RESERVE)):
            return
        try:
            st = os.statvfs(self.root)
        except OSError:
            return
        if st.f_bavail * st.f_frsize < RESERVE_BYTES:
            raise KernelError(op, obj, errno.ENOSPC, detail=f"less than {RESERVE_BYTES >> 20} MiB free on "
                              f"{self.root}, kept for remove and checkpoint",
                              hint="free space: `cowdisk volume rm` or `checkpoint` volumes, `cowdisk gc`")

    def release_reserve(self) -> bool:
        """Give the reserve back to the filesystem; False when there was none."""
        try:
            os.unlink(os.path.join(self.root, RESERVE))
        except FileNotFoundError:
            return False
        log.warning("store %s: its filesystem is full; released the %d MiB reserve", self.root,
                    RESERVE_BYTES >> 20)
        return True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- paths, locks, contexts --------------------------------------------------------

    def vol_dir(self, vid: str) -> str:
        return os.path.join(self.data_root, "volumes", vid)

    def link_path(self, vid: str) -> str:
        return os.path.join(self.root, "links", vid, "rootfs")

    @contextlib.contextmanager
    def scoped(self, *, lock_timeout: float | None = None) -> Iterator[None]:
        """Run the calls this thread makes inside the block for one caller: ``lock_timeout``
        bounds their lock waits (the store's own when None). The daemon runs each request
        inside its caller's scope (a worker serves many callers with one Store)."""
        old = getattr(self._scope, "lock_timeout", None)
        self._scope.lock_timeout = lock_timeout if lock_timeout is not None else old
        try:
            yield
        finally:
            self._scope.lock_timeout = old

    def lock(self, kind: str, name: str) -> FileLock:
        path = os.path.join(self.root, "locks", f"{kind}-{name}.lock")
        timeout = getattr(self._scope, "lock_timeout", None)
        timeout = self.lock_timeout if timeout is None else timeout
        if kind == "volume":
            return _VolumeLock(path, self.registry, name, timeout=timeout, what=f"{kind} {name}")
        return FileLock(path, timeout=timeout, what=f"{kind} {name}")

    def ctx(self, v: VolumeRow, t: TemplateRow | None = None, *, op: str = "",
             progress: Progress | None = None) -> VolumeCtx:
        t = t or self.registry.get_template(v.template_id)
        vid = v.id
        return VolumeCtx(
            id=vid, template=self.template_ref(t), data_dir=self.vol_dir(vid), tag=self.tag,
            dm_name=self.dm_prefix + vid,
            record=lambda kind, name: self.registry.record_object(vid, kind, name),
            forget=lambda kind, name: self.registry.forget_object(kind, name, volume_id=vid),
            step=lambda s: failpoints.hit(op, s),
            op=op,
            template_lock=lambda: self.lock("template", t.id),
            progress=progress,
            size=v.size,
        )

    def write_manifest(self, vid: str, *, known: tuple[VolumeRow, TemplateRow, list[tuple[str, str]]] | None = None
                       ) -> None:
        """Write volume ``vid``'s manifest from its row (nothing when the row is gone).

        ``known``: the committed row, its template and its links ``(path, target)``, as the
        caller that just committed them has them in hand (a create), instead of reading
        them back."""
        t: TemplateRow | None
        if known is not None:
            v, t, links = known
        else:
            found = self.registry.find_volume(vid)
            if found is None:
                return
            v = found
            t = self.registry.find_template(v.template_id)
            links = [(p, t_) for p, _, t_ in self.registry.links(vid)]
        if known is None or not os.path.isdir(self.vol_dir(vid)):
            modes.make_dirs(self.vol_dir(vid))
        manifest.write(os.path.join(self.vol_dir(vid), manifest.MANIFEST), {
            "store": self.id, "kind": "volume", "id": v.id, "template_id": v.template_id,
            "template_digest": t.digest if t else None, "backend": v.backend, "state": v.state.value,
            "size": v.size, "device": v.device, "block_device": self.backend.block_device, "parent": v.parent,
            "created": v.created, "links": [[p, t_] for p, t_ in links], "owner": v.owner})

    @property
    def holder(self) -> Holder | None:
        """The backend, when it holds templates' data itself (dm-thin), else None."""
        return self._templates.holder

    def remove_template(self, ref: str) -> None:
        self._templates.remove(ref)

    def adopt_template(self, tid: str) -> TemplateRow | None:
        return self._templates.adopt(tid)

    def undo_import(self, intent: int, tid: str) -> None:
        self._templates.undo_import(intent, tid)

    def finish_template_remove(self, intent: int, tid: str) -> None:
        self._templates.finish_remove(intent, tid)

    def teardown(self, v: VolumeRow, ctx: VolumeCtx, *, keep_data: bool = False, deadline_s: float = 5.0) -> None:
        """Ordered teardown: device, links, then the data (only once the device let go)."""
        self.backend.detach(ctx, deadline_s=deadline_s)
        self.drop_links(v.id)
        if not keep_data:
            self.destroy_data(v, ctx)

    def destroy_data(self, v: VolumeRow, ctx: VolumeCtx) -> None:
        """Delete the volume's data and its link directory, with the rows of every link in
        that directory (a restore-as retargeted the source's link to its copy: when the
        source goes, that link goes too)."""
        self.backend.destroy(ctx)
        shutil.rmtree(ctx.data_dir, ignore_errors=True)
        ldir = os.path.dirname(self.link_path(v.id))
        for path, owner, _ in self.registry.links_in(ldir):
            self.registry.drop_link(path, volume_id=owner)
        shutil.rmtree(ldir, ignore_errors=True)

    # -- links -------------------------------------------------------------------------

    def set_link(self, owner: str, path: str, target: str, *, record: bool = True,
                 recorded: Callable[[], None] | None = None) -> None:
        """Point ``path`` at ``target`` atomically (symlink under a temporary name, then rename).
        The row is recorded first, so a kill at any point leaves a row recovery acts on
        (it drops the links of volumes that are not attached and makes missing ones again).

        ``record=False``: the caller commits the row later, with its done state. Only for the
        volume's own link in its own directory while the volume is being made (create): its
        undo, in-process or by recovery, removes that whole directory, row or no row.
        ``recorded`` is called once the row is committed, before the file is made (a
        declared crash point inside the caller's step)."""
        d = os.path.dirname(path)
        tmp = f"{path}{LINK_TMP}{os.getpid()}-{procfs.process_start(os.getpid())}"
        prev = self.registry.link(path) if record else None
        if record:
            self.registry.set_link(path, owner, target)
        if recorded is not None:
            recorded()
        try:
            modes.make_dirs(d)
            try:
                os.symlink(target, tmp)
            except FileExistsError:  # left by a killed attempt of this process (same PID and start)
                os.unlink(tmp)
                os.symlink(target, tmp)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if prev is not None:
                self.registry.set_link(*prev)
            elif record:
                self.registry.drop_link(path)
            hint = ("its directory must be writable: not read-only, not immutable (see lsattr -d)"
                    if e.errno in (errno.EPERM, errno.EACCES, errno.EROFS) else "")
            raise KernelError.from_oserror("set stable link", path, e, hint=hint) from None

    def drop_links(self, vid: str) -> None:
        """Drop volume ``vid``'s links (call with its lock held): its own
        (:meth:`drop_own_links`), then a restore-as source's link retargeted to it
        (:meth:`settle_source_links`)."""
        self.drop_own_links(vid)
        self.settle_source_links(vid)

    def drop_own_links(self, vid: str) -> None:
        """Drop the links of volume ``vid`` in its own link directory (its lock held)."""
        own = os.path.dirname(self.link_path(vid))
        for path, _, _ in self.registry.links(vid):
            if os.path.dirname(path) == own:
                self.drop_link(path, owner=vid)

    def settle_source_links(self, vid: str) -> None:
        """Settle the links of volume ``vid`` (its lock held) in other volumes' directories: a
        restore-as source's link retargeted to ``vid`` (the path a VM snapshot of the source
        recorded). Each is that source's path, settled only under the source's lock
        (:meth:`settle_link`), so a concurrent restore of the source keeps the link it just
        made. When that lock is busy the link stays, and recovery settles it the same way
        once ``vid`` is detached. The checkpoint's and remove's declared step
        ``source-links``; recovery's teardown runs the same."""
        own = os.path.dirname(self.link_path(vid))
        listed = self.registry.links(vid)
        failpoints.hit("drop-links", "listed")  # a race test widens the window here
        for path, _, _ in listed:
            source = os.path.basename(os.path.dirname(path))
            if os.path.dirname(path) == own or source == vid:
                continue
            with self.lock_if_free("volume", source) as free:
                if free:
                    self.settle_link(path, vid, source)

    def settle_link(self, path: str, owner: str, source: str) -> bool:
        """Take ``owner``'s link at ``path`` (in volume ``source``'s directory, whose lock the
        caller holds) away: the file and the row go, and only while the row is still
        ``owner``'s. A file that is not the row's (a restore-as killed between committing
        its retarget's row and renaming the link into place: the file still points at the
        copy the link had before) goes back to that copy, row and file as they were, when
        it is attached and its lock is free; else it goes too (a link must name an
        attached volume's device). True when the link went (or was not ``owner``'s)."""
        row = self.registry.link(path)
        if row is None or row[1] != owner:
            return True  # someone else's now (the source restored, or another copy retargeted it)
        try:
            cur: str | None = os.readlink(path)
        except OSError:
            cur = None
        if cur is not None and cur != row[2]:
            prev = next((v.id for v in self.registry.volumes()
                         if v.state == ATTACHED and v.device == cur and v.id != owner), None)
            if prev is not None:
                with (contextlib.nullcontext(True) if prev == source
                      else self.lock_if_free("volume", prev)) as free:
                    again = self.registry.find_volume(prev) if free else None
                    if again is not None and again.state == ATTACHED and again.device == cur:
                        self.registry.set_link(path, prev, cur)
                        return False
        self.drop_link(path, owner=owner)
        return True

    @contextlib.contextmanager
    def lock_if_free(self, kind: str, name: str) -> Iterator[bool]:
        """Hold the lock of ``kind`` ``name`` if nobody else (no other process or thread, no
        other lock of this one) does: yield True; else yield False and hold nothing."""
        lk = FileLock(os.path.join(self.root, "locks", f"{kind}-{name}.lock"), timeout=0, what=f"{kind} {name}")
        try:
            lk.acquire()
        except CowdiskError:
            yield False
            return
        try:
            yield True
        finally:
            lk.release()

    def drop_link(self, path: str, *, owner: str | None = None) -> None:
        """Remove a stable link and its row (``owner``'s row only, when named: see
        :meth:`Registry.deferring`); a link or directory already gone (removed by hand, or
        by a killed earlier attempt) is fine. The directory goes when it is empty or its
        volume no longer exists."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        d = os.path.dirname(path)
        try:
            empty = not os.listdir(d)
        except FileNotFoundError:
            empty = False  # nothing left to remove
        if empty or self.registry.find_volume(os.path.basename(d)) is None:
            with contextlib.suppress(OSError):
                os.rmdir(d)
        self.registry.drop_link(path, volume_id=owner)

    # -- quarantine --------------------------------------------------------------------

    def quarantine(self, path: str, reason: str) -> str:
        """Move data the registry does not account for out of the way instead of deleting it:
        ``<data root>/quarantine/<name>-<time>/`` with ``why.json`` saying where it came from
        and why. Only an explicit purge deletes it."""
        qdir = os.path.join(self.data_root, QUARANTINE)
        modes.make_dirs(qdir)
        dest = os.path.join(qdir, f"{os.path.basename(path)}-{time.strftime('%Y%m%dT%H%M%S')}-"
                                  f"{secrets.token_hex(2)}")
        os.rename(path, dest)  # same filesystem: data_root
        with os.fdopen(modes.open_private(os.path.join(dest, QUARANTINE_NOTE)), "w") as f:
            json.dump({"from": path, "reason": reason, "time": time.time(), "store": self.id}, f)
        return dest
