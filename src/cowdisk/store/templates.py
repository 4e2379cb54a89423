"""Templates: import a raw image, build one from a tree or tarball through the cache,
verify, remove. A template is immutable once registered: ``templates/<id>/disk.img``,
mode 0400 (root's alone: see :mod:`.modes`) and chattr +i, known by the sha256 of its bytes (``id`` is its first 16 hex
digits).

A built template is stored once and hashed once: the cache hashes the image when it
publishes it, and the template is a hard link to the cache's image (a sparse copy only
where the cache is on another filesystem), registered with the cache's digest.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import logging
import os
import secrets
import shutil
import time
from typing import TYPE_CHECKING, Any, Callable

from ..backends import HoldsTemplates
from ..digest import sha256_file
from ..errors import (AlreadyExists, CowdiskError, Forbidden, InUse, InvalidArgument, KernelError, NotFound,
                      TemplateChanged, Unsupported)
from ..kernel import fs, procfs
from ..kernel.creds import fs_identity
from ..locks import FileLock
from ..progress import Progress, stage
from ..registry import Registry, TemplateRow
from . import manifest
from .model import Template, template_of, validate_id
from .sources import Caller, open_path

if TYPE_CHECKING:
    from ..backends import VolumeCtx
    from ..cache import TemplateCache
    from ..cache.recipes import Recipe

log = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"
HELD = "disk.thin"
"""A template whose data a backend holds (dm-thin's flatten: a thin in the pool) has this
small descriptor file in place of ``disk.img``; its size and digest come from the backend."""


Holder = HoldsTemplates
"""A backend that holds templates' data itself (dm-thin): ``backends.HoldsTemplates``."""


def is_held(path: str) -> bool:
    return os.path.basename(path) == HELD


LAZY = "disk.lazy"
"""A lazy template (docs/remote.md, "Volumes over a lazy template") has this small
descriptor file in place of ``disk.img`` (JSON: its manifest's digest and the template's
size); its bytes are served from the host's chunk cache of that manifest."""


def is_lazy(path: str) -> bool:
    return os.path.basename(path) == LAZY


def lazy_descriptor(path: str) -> dict[str, Any]:
    """A lazy template's descriptor: ``manifest`` (digest), ``size``, ``source`` (its URL)."""
    import json

    try:
        with open(path) as f:
            d = json.load(f)
        if not isinstance(d, dict):
            raise ValueError("not an object")
        return {"manifest": str(d["manifest"]), "size": int(d["size"]), "source": str(d.get("source", ""))}
    except (ValueError, KeyError, TypeError) as e:
        raise TemplateChanged(f"lazy template file {path}: not a lazy template descriptor ({e})",
                              op="read lazy template", obj=path) from None
TARBALL_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.zst", ".tzst", ".tar.xz", ".txz", ".tar.bz2", ".tbz2")
"""Names ``build`` takes as a tarball (GNU tar detects the compression itself)."""


def staging_name() -> str:
    """A staging directory name that says which process made it (PID and start time), so
    recovery removes it only once that very process is gone."""
    pid = os.getpid()
    return f"{STAGING_PREFIX}{pid}-{procfs.process_start(pid)}-{secrets.token_hex(4)}"


def staging_owner_alive(name: str) -> bool:
    """Whether the process that made staging directory ``name`` still runs."""
    parts = name[len(STAGING_PREFIX):].split("-")
    if len(parts) < 2 or not parts[0].isdigit():
        return False
    start = parts[1] if len(parts) == 3 else None  # older names carry no start time
    return procfs.process_alive(int(parts[0]), start)


class Templates:
    """The templates of one store."""

    def __init__(self, registry: Registry, data_root: str, lock: Callable[[str], FileLock], *,
                 store_id: str = "") -> None:
        self.registry = registry
        self.store_id = store_id
        self.dir = os.path.join(data_root, "templates")
        self.cache_dir = os.path.join(data_root, "cache")
        self._lock = lock
        self.holder: Holder | None = None
        """The backend, when it holds templates' data (set by the store)."""
        self.caller = 0
        """The uid that owns what this view registers."""
        self.viewer: int | None = None
        """The uid whose templates (and the shared ones) this view sees; None: every one."""
        self.stop_lazy: Callable[[str], object] = lambda manifest_digest: None
        """Stops the server of a lazy template's cache (set by the store: store/remote.py)."""

    def as_caller(self, caller: int, viewer: int | None) -> "Templates":
        """These templates as ``caller`` sees and makes them (see :meth:`Store.as_caller`)."""
        view = copy.copy(self)
        view.caller, view.viewer = caller, viewer
        return view

    def _users(self, tid: str) -> list[str]:
        """The volumes over template ``tid`` this view may name."""
        return self.registry.template_users(tid, owner=self.viewer)

    def staging(self) -> str:
        """A new staging directory beside the templates (same filesystem: publishing is a rename)."""
        path = os.path.join(self.dir, staging_name())
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)
        return path

    # -- reading -----------------------------------------------------------------------

    def list(self) -> list[Template]:
        return [template_of(t, self._users(t.id)) for t in self.registry.templates(visible_to=self.viewer)]

    def get(self, ref: str) -> Template:
        t = self.registry.get_template(ref, visible_to=self.viewer)
        return template_of(t, self._users(t.id))

    def row(self, ref: str) -> TemplateRow:
        """The row of template ``ref`` if this view may see it (NotFound otherwise)."""
        return self.registry.get_template(ref, visible_to=self.viewer)

    def usage(self, ref: str) -> int:
        """Bytes the template's file really takes on disk (st_blocks); 0 for a template
        known by digest only (no local file)."""
        t = self.row(ref)
        return fs.disk_usage(t.path) if t.path else 0

    # -- import and build ----------------------------------------------------------------

    def import_image(self, src: str, name: str | None = None, *, adopt: bool = False,
                     progress: Progress | None = None, shared: bool = False,
                     caller: Caller | None = None) -> Template:
        """Import a raw disk image: copy it in (or adopt it in place), digest it, make it read-only.
        The image is opened once, as ``caller`` (:mod:`.sources`), and read through that
        descriptor."""
        src = os.path.abspath(src)
        if name is not None:
            validate_id(name, "template name")
        if adopt and caller is not None and not caller.trusted:
            raise InvalidArgument(f"import template {src}: adopting a file in place is for root only (the store "
                                  "would read it again by its path, with root's rights)", op="import template",
                                  obj=src, hint="import a copy (no --adopt)")
        try:
            opened = open_path(src, "import source", caller)
        except KernelError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                raise NotFound(f"import template: {src} is not a file", op="import template", obj=src) from None
            raise
        with opened:
            if not opened.is_file:
                raise NotFound(f"import template: {src} is not a file", op="import template", obj=src)
            size = opened.st.st_size
            if size < 4096 or size % 512:
                raise InvalidArgument(f"import template {src}: size {size} is not a positive multiple of 512 "
                                      "bytes", op="import template", obj=src)
            if adopt:
                return self.register(src, sha256_file(opened.proc, progress), owned=False, source=src, name=name,
                                     shared=shared)
            staging = self.staging()
            try:
                tmp = os.path.join(staging, "disk.img")
                fs.sparse_copy(opened.proc, tmp, progress=progress)
                return self.register(tmp, sha256_file(tmp), owned=True, source=src, name=name, shared=shared)
            except CowdiskError as e:
                raise opened.named(e) from None
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def build(self, source: str, name: str | None = None, *, size: int | None = None, fs_type: str = "ext4",
              progress: Progress | None = None, shared: bool = False, caller: Caller | None = None) -> Template:
        """Build a template from a directory tree or a tarball (``mkfs.ext4 -d``, no mount needed).

        The image is built once per recipe (key: filesystem, capacity, mkfs version
        fingerprint and the content digest of the source) in the store's template cache,
        which serializes concurrent builders of one recipe. The built image then *moves*
        into ``templates/`` (stored once, never copied) with the digest the cache computed
        (hashed once); building the same recipe again finds the template by its key.

        The source is opened once, as ``caller`` (:mod:`.sources`); the cache reads it
        through that descriptor with the caller's rights (mkfs runs as the caller).
        """
        from ..cache import TarRecipe, TreeRecipe

        if name is not None:
            validate_id(name, "template name")
        not_found = NotFound(f"build template: {source} is neither a directory nor a tarball",
                             op="build template", obj=source)
        try:
            opened = open_path(source, "build source", caller)
        except KernelError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                raise not_found from None
            raise
        reader = caller.identity if caller is not None else None
        with opened:
            origin = os.path.abspath(source)
            if opened.is_dir:
                if size is None:
                    with fs_identity(reader):
                        used = sum(os.lstat(os.path.join(d, f)).st_size for d, _, fl in os.walk(opened.proc)
                                   for f in fl)
                    size = max(64 << 20, (used * 2 + (32 << 20) + (1 << 20) - 1) // (1 << 20) * (1 << 20))
                recipe: TreeRecipe | TarRecipe = TreeRecipe(opened.proc, size, fs=fs_type, reader=reader,
                                                            origin=origin)
            elif opened.is_file and os.path.basename(source).lower().endswith(TARBALL_SUFFIXES):
                if size is None:
                    size = max(64 << 20, (opened.st.st_size * 3 + (32 << 20)) // (1 << 20) * (1 << 20))
                recipe = TarRecipe(opened.proc, size, fs=fs_type, reader=reader, origin=origin)
            else:
                raise not_found
            try:
                return self._build(recipe, name, progress, shared)
            except CowdiskError as e:
                raise opened.named(e) from None

    def _build(self, recipe: "Recipe", name: str | None, progress: Progress | None, shared: bool) -> Template:
        """Build ``recipe`` once in the cache (or find the template it already made, by its
        key) and move the image into templates/."""
        from ..cache import TemplateCache  # noqa: F811 - the runtime import of the type-only name

        cache = TemplateCache(self.cache_dir)
        plan = cache.plan(recipe, progress)
        built_from = f"cache:{plan.key}"
        t = self.registry.find_template_by_source(built_from)
        if t is not None:
            stage(progress, f"cache hit {plan.key}: template {t.id}")
        else:
            cache.get_or_build(recipe, progress=progress, plan=plan)
            with self._lock(f"recipe-{plan.key[:16]}"):  # one mover per recipe
                t = self.registry.find_template_by_source(built_from)
                if t is None:
                    stage(progress, "importing")
                    t = self._adopt_cache_entry(cache, plan.key, built_from, name, shared)
            cache.remove(plan.key)  # its meta, without the image that is now the template
        return self.register(t.path, t.digest, owned=t.owned, source=t.source, name=name, shared=shared)

    def _adopt_cache_entry(self, cache: "TemplateCache", key: str, source: str, name: str | None,
                           shared: bool) -> TemplateRow:
        staging = self.staging()
        try:
            tmp = os.path.join(staging, "disk.img")
            with cache.hold(key) as entry:
                try:
                    os.rename(entry.image, tmp)  # same filesystem: the cache lives in the data root
                except OSError as e:
                    raise KernelError.from_oserror("import built template: move", entry.image, e) from None
            self.register(tmp, entry.sha256, owned=True, source=source, name=name, shared=shared)
            return self.registry.get_template(entry.sha256[:16])
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def build_from_image(self, ref: str, name: str | None = None, *, size: int | None = None,
                         fs_type: str = "ext4", progress: Progress | None = None, shared: bool = False,
                         caller: Caller | None = None) -> Template:
        """Build a template from a container image: an OCI layout directory, an OCI archive or
        a ``docker save`` archive (``ref``: see :mod:`cowdisk.cache.oci`), unpacked with its
        whiteouts, owners, modes, xattrs and hard links. Cached under the image's manifest
        digest (a docker archive: its image id), so the same image is built once; ``size``
        None chooses one from the unpacked content with headroom.

        The image's path is opened once, as ``caller`` (:mod:`.sources`); it is read through
        that descriptor with the caller's rights (skopeo runs as the caller)."""
        from ..cache.oci import parse_ref
        from ..cache.recipes import ImageRecipe

        if name is not None:
            validate_id(name, "template name")
        reader = caller.identity if caller is not None else None
        with fs_identity(reader):  # PATH:TAG is told apart by what exists: looked at as the caller
            src = parse_ref(ref)
        opened = open_path(src.path, "image source", caller)
        with opened:
            pinned = f"{src.transport}:{opened.proc}" + (f":{src.tag}" if src.tag else "")
            try:
                return self._build(ImageRecipe(pinned, size or 0, fs=fs_type, reader=reader, origin=ref), name,
                                   progress, shared)
            except CowdiskError as e:
                raise opened.named(e) from None

    def register(self, path: str, digest: str, *, owned: bool, source: str, name: str | None,
                 shared: bool = False) -> Template:
        """Register the image at ``path`` with content ``digest`` (publishing it into the
        store when ``owned``: moved, made read-only and immutable), owned by this view's
        caller (``shared``: usable by every caller), or name the template that already has
        that content. A template of that content another owner keeps to itself is refused
        (AlreadyExists): a template id is its content's digest, one template per content."""
        from .transition import IMPORT, Transition

        tid = digest[:16]
        existing = self.registry.find_template(tid)
        if existing is None and owned:
            with self._lock(tid):
                existing = self.registry.find_template(tid)
                if existing is None:
                    with Transition(self.registry, IMPORT, tid, data={"template_id": tid},
                                    undo=lambda tr, _e: self.undo_import(tr.intent, tid)) as tr:
                        final = tr.step("publish", self._publish, path, tid)
                        if is_held(final):
                            assert self.holder is not None
                            self.holder.publish_held(final, tid)
                        row = self._row(tid, final, digest, owned, source, name, shared)
                        self._write_manifest(row)
                        tr.finish(commit=lambda: self.registry.add_template(row, visible_to=self.viewer))
                    log.debug("template %s registered: %s", tid, final)
                    return self.get(tid)
        if existing is not None and existing.digest == digest:
            if is_held(path) and self.holder is not None:  # the same content is a template already
                self.holder.drop_held(path)
            if not existing.visible_to(self.viewer):
                raise AlreadyExists(f"register template {tid}: a template of this content belongs to another owner",
                                    op="register template", obj=tid,
                                    hint="root can share it (`cowdisk template share`) or hand it over")
            changed = False
            if name and name not in existing.names:
                if self.viewer is not None and existing.owner != self.caller:
                    raise Forbidden(f"name template {tid} {name!r}: this content is template {tid}, shared by uid "
                                    f"{existing.owner}; only its owner or root names it",
                                    op="name template", obj=tid,
                                    hint=f"use it as {tid}" + (f" or {existing.names[0]!r}" if existing.names else ""))
                self.registry.add_template_name(tid, name, visible_to=self.viewer)
                changed = True
            if shared and not existing.shared and (self.viewer is None or existing.owner == self.caller):
                self.registry.set_template_owner(tid, shared=True)
                changed = True
            if changed:
                self._write_manifest(self.registry.get_template(tid))
            return self.get(tid)
        row = self._row(tid, path, digest, owned, source, name, shared)  # adopted in place
        self._write_manifest(row)
        self.registry.add_template(row, visible_to=self.viewer)
        return self.get(tid)

    def register_shared(self, digest: str, size: int, source: str) -> TemplateRow:
        """The template with content ``digest`` for a volume adopted from a shared place
        (rbd's cluster): the row this store has, or a new one with no local file (``path``
        ""; the backend holds the bytes, and its checks ask the backend)."""
        tid = digest[:16]
        with self._lock(tid):
            t = self.registry.find_template(tid)
            if t is not None:
                if t.digest != digest:
                    raise TemplateChanged(f"template {tid}: this store's digest {t.digest} is not the shared "
                                          f"template's {digest}", op="adopt template", obj=tid)
                return t
            row = TemplateRow(tid, "", size, digest, 0, 0, False, source, time.time(), "ready", (), 0, self.caller)
            self._write_manifest(row)
            self.registry.add_template(row)
            return row

    def chown(self, ref: str, *, owner: int | None = None, shared: bool | None = None) -> Template:
        """Hand template ``ref`` to ``owner`` and/or mark it shared or not (root only)."""
        t = self.row(ref)
        with self._lock(t.id):
            self.registry.set_template_owner(t.id, owner=owner, shared=shared)
            self._write_manifest(self.registry.get_template(t.id))
        return self.get(t.id)

    def _write_manifest(self, t: TemplateRow) -> None:
        tdir = os.path.join(self.dir, t.id)
        fs.makedirs_mode(tdir, 0o700)
        manifest.write(os.path.join(tdir, manifest.MANIFEST), {
            "store": self.store_id, "kind": "template", "id": t.id, "path": t.path, "digest": t.digest,
            "size": t.size, "owned": t.owned, "source": t.source, "names": list(t.names), "created": t.created,
            "owner": t.owner, "shared": t.shared})

    def adopt(self, tid: str) -> TemplateRow | None:
        """Register the template of ``templates/<tid>`` again from its manifest (the registry
        lost it): the file must be there with the recorded size; None when it cannot be."""
        m = manifest.read(os.path.join(self.dir, tid, manifest.MANIFEST))
        if m is None or m.get("store") != self.store_id or m.get("id") != tid:
            return None
        path = str(m["path"])
        if not path:  # known by digest only: its bytes are in the backend
            row = TemplateRow(tid, "", int(m["size"]), str(m["digest"]), 0, 0, False, str(m["source"]),
                              float(m["created"]), "ready", tuple(m.get("names") or ()), 0, int(m.get("owner") or 0),
                              bool(m.get("shared")))
            self.registry.add_template(row)
            return row
        if not os.path.exists(path) or self._size(path) != m["size"]:
            return None
        st = os.stat(path)
        row = TemplateRow(tid, path, self._size(path), str(m["digest"]), st.st_mtime_ns, st.st_ino, bool(m["owned"]),
                          str(m["source"]), float(m["created"]), "ready", tuple(m.get("names") or ()),
                          st.st_ctime_ns, int(m.get("owner") or 0), bool(m.get("shared")))
        self.registry.add_template(row)
        return row

    def _publish(self, path: str, tid: str) -> str:
        tdir = os.path.join(self.dir, tid)
        fs.makedirs_mode(tdir, 0o700)
        final = os.path.join(tdir, os.path.basename(path) if is_held(path) or is_lazy(path) else "disk.img")
        os.chmod(path, 0o400)
        os.rename(path, final)
        fs.set_immutable(final, True)
        return final

    def _size(self, path: str) -> int:
        """The template's size: its file's, or for a held template the backend's."""
        if is_held(path):
            if self.holder is None:
                raise TemplateChanged(f"template file {path}: held by a backend this store does not have",
                                      op="check template", obj=path)
            return self.holder.held_size(path)
        if is_lazy(path):
            return int(lazy_descriptor(path)["size"])
        return os.path.getsize(path)

    def _row(self, tid: str, path: str, digest: str, owned: bool, source: str, name: str | None,
             shared: bool = False) -> TemplateRow:
        st = os.stat(path)  # after chmod and chattr: both change ctime
        return TemplateRow(tid, path, self._size(path), digest, st.st_mtime_ns, st.st_ino, owned, source, time.time(),
                           "ready", (name,) if name else (), st.st_ctime_ns, self.caller, shared)

    def undo_import(self, intent: int, tid: str) -> None:
        """Remove a template file published without its row (immutable flag included) and end
        the import's intent. Call with the template's lock held."""
        if self.registry.find_template(tid) is None:
            tdir = os.path.join(self.dir, tid)
            for f in ("disk.img", HELD, LAZY):
                with contextlib.suppress(FileNotFoundError, OSError):
                    fs.set_immutable(os.path.join(tdir, f), False)
            shutil.rmtree(tdir, ignore_errors=True)
        self.registry.end_intent(intent)

    # -- checks ------------------------------------------------------------------------

    def check(self, t: TemplateRow) -> None:
        """Refuse a template whose file may have changed since import: size, mtime, inode,
        change time (which user space cannot set back) and, for owned files, the immutable
        flag. Once marked changed it stays refused until :meth:`verify` finds the content
        unchanged."""
        hint = "`cowdisk template verify` re-digests it; import the new image as a new template"
        if t.state == "changed":
            raise TemplateChanged(f"template {t.id}: marked as changed on disk since import by an earlier check; "
                                  "attaching it could corrupt every volume over it", op="check template", obj=t.id,
                                  hint=hint)
        try:
            st = os.stat(t.path)
        except FileNotFoundError:
            raise TemplateChanged(f"template {t.id}: its file {t.path} is gone", op="check template",
                                  obj=t.id) from None
        why = []
        size = self._size(t.path) if is_held(t.path) or is_lazy(t.path) else st.st_size
        if (size, st.st_mtime_ns, st.st_ino) != (t.size, t.mtime_ns, t.ino):
            why.append(f"size {t.size} -> {size}, mtime or inode differ")
        if t.ctime_ns and st.st_ctime_ns != t.ctime_ns:
            why.append("its change time moved")
        if t.owned and not fs.is_immutable(t.path):
            why.append("it is no longer immutable")
        if why:
            self.registry.set_template_state(t.id, "changed")
            raise TemplateChanged(
                f"template {t.id}: {t.path} changed on disk since import ({'; '.join(why)}); "
                "attaching it could silently corrupt every volume over it", op="check template", obj=t.id,
                hint=hint)

    def verify(self, ref: str, progress: Progress | None = None) -> Template:
        """Re-digest the template. Unchanged content clears a "changed" mark (the quick check's
        record is refreshed, an owned file made immutable again); changed content marks it
        changed and raises."""
        t = self.row(ref)
        if not t.path:
            raise Unsupported(f"verify template {t.id}: this store knows it by digest only (adopted with a "
                              "volume); its bytes are in the backend", op="verify template", obj=t.id,
                              hint="verify it on a store that has its image file")
        if is_lazy(t.path):
            raise Unsupported(f"verify template {t.id}: it is lazy; every chunk is checked against its SHA-256 "
                              "when it is fetched, and the whole image was hashed when it was pushed",
                              op="verify template", obj=t.id,
                              hint="`cowdisk template pull` (without --lazy) fetches it whole and hashes it")
        with self._lock(t.id):
            if not os.path.exists(t.path):
                self.check(t)  # raises: the file is gone
            if is_held(t.path) and self.holder is not None:
                digest = self.holder.held_digest(t.id, t.path, progress)
            else:
                digest = sha256_file(t.path, progress)
            if digest != t.digest:
                self.registry.set_template_state(t.id, "changed")
                raise TemplateChanged(f"template {t.id}: content digest differs from import",
                                      op="verify template", obj=t.id)
            if t.owned and not fs.is_immutable(t.path):
                fs.set_immutable(t.path, True)
            st = os.stat(t.path)
            self.registry.set_template_identity(t.id, self._size(t.path), st.st_mtime_ns, st.st_ino,
                                                st.st_ctime_ns)
        return self.get(t.id)

    # -- removal -----------------------------------------------------------------------

    def remove(self, ref: str) -> None:
        t = self.row(ref)
        if self.viewer is not None and t.owner != self.caller:
            raise Forbidden(f"remove template {t.id}: it is shared by uid {t.owner}; only its owner or root removes it",
                            op="remove template", obj=t.id)
        with self._lock(t.id) as held:
            users = self.registry.template_users(t.id)
            if users:
                seen = self._users(t.id)
                named = ", ".join(seen) + (f" and {len(users) - len(seen)} of other owners" if len(seen) < len(users)
                                           else "")
                raise InUse(f"remove template {t.id}: used by volumes {named}", op="remove template",
                            obj=t.id, hint="remove or flatten those volumes first")
            from .transition import TEMPLATE_REMOVE, Transition

            with Transition(self.registry, TEMPLATE_REMOVE, t.id, data={"template_id": t.id}) as tr:
                tr.step("file", self._remove_files, t)
                tr.finish(commit=lambda: self.registry.delete_template(t.id))
            held.unlink()  # one lock file per template that exists

    def finish_remove(self, intent: int, tid: str) -> None:
        """Finish a killed template removal: the file (if still there) and the row go, unless
        a volume uses the template (then only the intent ends). Call with its lock held."""
        t = self.registry.find_template(tid)
        if t is not None and not self.registry.template_users(tid):
            self._remove_files(t)
            with self.registry.tx():
                self.registry.delete_template(tid)
                self.registry.end_intent(intent)
            return
        self.registry.end_intent(intent)

    def _remove_files(self, t: TemplateRow) -> None:
        """The template's file (when the store owns it) and its manifest and directory; a
        lazy template's server is stopped first (its cache stays: ``gc`` trims it)."""
        if is_lazy(t.path) and os.path.exists(t.path):
            self.stop_lazy(lazy_descriptor(t.path)["manifest"])
        if t.owned:
            with contextlib.suppress(OSError):
                fs.set_immutable(t.path, False)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(t.path)
        tdir = os.path.join(self.dir, t.id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(tdir, manifest.MANIFEST))
        with contextlib.suppress(OSError):
            os.rmdir(tdir)

    def clean_cache(self) -> None:
        """Empty the template cache (store teardown)."""
        if os.path.isdir(self.cache_dir):
            from ..cache import TemplateCache

            TemplateCache(self.cache_dir).clean_all()
