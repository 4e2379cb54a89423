"""``rbd``: volumes as layered Ceph RBD images, through librbd (the ``rbd`` Python module).

A template is an RBD image ``cowdisk-t-<template id>`` written sparsely from the
template file, with a protected snapshot ``cowdisk-<template id>`` (the id is the first
16 hex digits of the template's sha256). A volume is a clone ``cowdisk-v-<volume id>``
of that snapshot: no data is copied. Fork and restore under a new id snapshot the
source image (``cowdisk-for-<new id>``, protected; a fork into N: one snapshot, named for
the first child, cloned N times) and clone that. Removing a volume
deletes its clone, then unprotects and removes the snapshot it was cloned from once no
other clone uses it (the template's image too). Flatten reads the image (with its
parents) into a new local template file.

Every image lives in the store's pool and RADOS namespace (options below). Images are
named by template digest and volume id, not by store, so that stores on several hosts
sharing a namespace share the templates (imported once into the cluster) and can hand a
checkpointed volume to one another. Two records in each volume image's metadata say which store may do what
(both ``<store tag>@<host>``): the *owner* (``cowdisk.owner``: the store whose registry
governs the volume; set when it is made, moved by :meth:`RbdBackend.claim` when another
store adopts it) and the *holder* (``cowdisk.holder``: the store that has it attached;
set on attach, cleared on detach). Attaching an image another store owns or holds is
refused (InUse naming that store, its host and whether a client of it is still alive);
removing one only forgets it here. :meth:`RbdBackend.take_over` is the explicit fencing
step for a host that died: it blocklists every client watching the image (``osd
blocklist add``: they can no longer write, even if that host comes back), breaks their
exclusive lock and clears the hold. A volume image also records its template's id
(``cowdisk.template``) and a template image its full digest (``cowdisk.digest``), so a
store that never saw the template's file can adopt the volume.

What the device path (and the store's stable link) is, by the ``map`` option:

* ``fuse`` (default): the image is exported as a regular file
  ``volumes/<id>/disk.img`` by a ``qemu-storage-daemon`` (QEMU's own rbd driver and its
  FUSE export, one daemon per attached volume, started detached so it outlives
  cowdisk like a kernel object). Every VMM opens it as a raw file; no kernel module.
* ``none``: nothing is mapped; the device path is QEMU's rbd filename
  ``rbd:<pool>/[<namespace>/]<image>:id=<client>:conf=<conf>``, and the stable link is a
  symlink whose *target text* is that string (it does not resolve: ``readlink`` it).
  For QEMU, which opens RBD itself (``cowdisk volume drive --format qemu``). Fastest.

Options (``Store(root, backend="rbd", backend_options={...})``, recorded with the store):
``conf`` (ceph.conf path, required; put ``keyring`` there for cephx), ``pool``
(required), ``client`` (the client id, default ``admin``), ``namespace`` (RADOS
namespace, default the pool's default one; created on open), ``map`` (``fuse`` or
``none``).
"""

from __future__ import annotations

import contextlib
import errno
import importlib.machinery
import importlib.util
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import time
import weakref
from typing import Any, Callable, ClassVar, Iterator, Mapping

from ..errors import CowdiskError, InUse, InvalidArgument, KernelError, NotFound, Unsupported
from ..kernel import fs
from ..kernel import mount as kmount
from ..kernel.procfs import process_alive, process_start
from ..progress import Progress
from . import BackendEnv, KernelObject, Shared, SharedVolume, Usage, VolumeCtx, check_options

log = logging.getLogger(__name__)

OPTIONS = frozenset({"conf", "pool", "client", "namespace", "map"})
MAPS = ("fuse", "none")
DISK = "disk.img"
PIDFILE = "qsd.pid"
HOLDER = "cowdisk.holder"
OWNER = "cowdisk.owner"
TEMPLATE_KEY = "cowdisk.template"
DIGEST = "cowdisk.digest"
PARENT_KEY = "cowdisk.parent"
"""``<image>@<snapshot>`` a volume was cloned from (destroy drops that snapshot without
opening the image)."""
META_PREFIX = "metadata_"
"""cls_rbd keeps image metadata key K as omap key ``metadata_K`` of the image's header."""
DEBIAN_DIST = "/usr/lib/python3/dist-packages"
QSD = "qemu-storage-daemon"


# -- librbd -----------------------------------------------------------------------------


def librbd() -> tuple[Any, Any]:
    """The ``rados`` and ``rbd`` modules.

    Ceph ships its Python bindings only as Debian's python3-rados and python3-rbd
    (extension modules built for Debian's python3). When they are not importable as is
    (another interpreter of the same version, a virtualenv), exactly these two files are
    loaded from Debian's dist-packages; nothing else of that directory is put on
    ``sys.path``."""
    try:
        import rados
        import rbd

        return rados, rbd
    except ImportError:
        pass
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    mods = []
    for name in ("rados", "rbd"):
        if name in sys.modules:
            mods.append(sys.modules[name])
            continue
        path = os.path.join(DEBIAN_DIST, name + suffix)
        if not os.path.exists(path):
            raise Unsupported(f"rbd backend: the {name} module is not importable and {path} does not exist",
                              op="load librbd", obj=name,
                              hint="install python3-rados and python3-rbd (./install.sh) for this Python "
                                   f"{sys.version_info.major}.{sys.version_info.minor}")
        loader = importlib.machinery.ExtensionFileLoader(name, path)
        spec = importlib.util.spec_from_file_location(name, path, loader=loader)
        assert spec is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            loader.exec_module(mod)
        except ImportError as e:
            del sys.modules[name]
            raise Unsupported(f"rbd backend: cannot load {path}: {e}", op="load librbd", obj=name) from None
        mods.append(mod)
    return mods[0], mods[1]


@contextlib.contextmanager
def named(op: str, obj: str) -> Iterator[None]:
    """librados/librbd errors as KernelError(op, obj, errno)."""
    rados, rbd = librbd()
    try:
        yield
    except CowdiskError:
        raise
    except (rados.Error, rbd.Error) as e:
        err = getattr(e, "errno", None) or errno.EIO
        raise KernelError(op, obj, abs(err), detail=str(e)) from None


_forked: list[Any] = []  # clusters inherited over fork(): never shut down in the child (librados threads are gone)


def _before_fork() -> None:
    """librados is not fork-safe: a child forked while its threads hold a lock (its own, or
    libc's) can hang in a fresh connection. Connections are closed before os.fork() (not
    before subprocess, which execs at once) and reopened on next use, in the parent (~10 ms)
    and in the child. Forking while another thread uses the same backend is not supported."""
    for b in list(RbdBackend._instances):
        b.close()


def _after_fork() -> None:
    """Anything still connected in a forked child is kept unused and never shut down: its
    librados threads did not survive the fork."""
    for b in list(RbdBackend._instances):
        if b._cluster is not None:
            _forked.append(b._cluster)
            b._cluster = b._ioctx = None


os.register_at_fork(before=_before_fork, after_in_child=_after_fork)


# -- the backend ------------------------------------------------------------------------


def volume_image(vid: str) -> str:
    return f"cowdisk-v-{vid}"


def template_image(tid: str) -> str:
    return f"cowdisk-t-{tid}"


def template_snap(tid: str) -> str:
    return f"cowdisk-{tid}"


def copy_snap(dst: str) -> str:
    return f"cowdisk-for-{dst}"


class RbdBackend(Shared):
    name: ClassVar[str] = "rbd"
    block_device: ClassVar[bool] = False
    larger_volumes: ClassVar[bool] = False
    """Not yet: a clone would need ``resize`` before its first map (issue 15 left it open)."""
    steps: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "create": ("template", "clone", "hold", "map"),
        "attach": ("hold", "map"),
        "copy_data": ("snapshot", "clone"),
    }
    _instances: ClassVar["weakref.WeakSet[RbdBackend]"]

    def __init__(self, env: BackendEnv) -> None:
        o = dict(env.options)
        missing = [k for k in ("conf", "pool") if not o.get(k)]
        if missing:
            raise InvalidArgument(f"backend rbd: option(s) {', '.join(missing)} missing", op="open store",
                                  obj=env.root, hint="rbd needs conf=<ceph.conf> and pool=<pool> (docs/rbd.md)")
        self.conf = os.path.abspath(o["conf"])
        self.pool = o["pool"]
        self.client = o.get("client") or "admin"
        self.namespace = o.get("namespace") or ""
        self.map = o.get("map") or "fuse"
        if self.map not in MAPS:
            raise InvalidArgument(f"backend rbd: map={self.map!r} is not one of {', '.join(MAPS)}",
                                  op="open store", obj=env.root)
        if not os.path.isfile(self.conf):
            raise NotFound(f"backend rbd: ceph config {self.conf} does not exist", op="open store", obj=self.conf)
        if self.map == "fuse" and not _which(QSD):
            raise Unsupported(f"backend rbd: map=fuse needs {QSD}", op="open store", obj=env.root,
                              hint="install qemu-system-common and qemu-block-extra, or use map=none")
        self.data_root = env.root
        self.tag = env.tag
        self.holder = f"{env.tag}@{socket.gethostname()}"
        self._cluster: Any = None
        self._ioctx: Any = None
        self._ready: set[str] = set()
        """Template ids whose image and protected snapshot this process has seen."""
        RbdBackend._instances.add(self)

    # -- store-wide ---------------------------------------------------------------------

    @classmethod
    def available(cls, root: str) -> tuple[bool, str]:
        try:
            librbd()
        except Unsupported as e:
            return False, f"rbd: {e.message}"
        return True, "rbd: librbd is here; needs a cluster (options conf, pool), never picked by auto"

    @classmethod
    def open(cls, env: BackendEnv) -> "RbdBackend":
        check_options(cls.name, env, OPTIONS)
        b = cls(env)
        b.ioctx()  # connect now: a wrong conf or pool fails the open, before the store is recorded
        return b

    def ioctx(self) -> Any:
        if self._ioctx is not None:
            return self._ioctx
        rados, rbd = librbd()
        with named("connect to ceph", f"{self.conf} (client.{self.client})"):
            c = _in_fresh_thread(lambda: _connect(rados, self.conf, self.client))
        try:
            with named("open pool", self.pool):
                io = c.open_ioctx(self.pool)
            if self.namespace:
                with named("open namespace", f"{self.pool}/{self.namespace}"):
                    if not rbd.RBD().namespace_exists(io, self.namespace):
                        with contextlib.suppress(rbd.ImageExists):
                            rbd.RBD().namespace_create(io, self.namespace)
                    io.set_namespace(self.namespace)
        except BaseException:
            c.shutdown()
            raise
        self._cluster, self._ioctx = c, io
        return io

    def close(self) -> None:
        if self._cluster is not None:
            with contextlib.suppress(Exception):
                self._ioctx.close()
            with contextlib.suppress(Exception):
                self._cluster.shutdown()
        self._cluster = self._ioctx = None

    def destroy_store(self) -> None:
        """Remove the namespace if it is now empty (another store may still use it)."""
        _, rbd = librbd()
        io = self.ioctx()
        if self.namespace:
            left = rbd.RBD().list(io)
            if not left:
                with named("remove namespace", f"{self.pool}/{self.namespace}"):
                    base = self._cluster.open_ioctx(self.pool)
                    try:
                        with contextlib.suppress(rbd.ImageNotFound, rbd.ImageBusy):
                            rbd.RBD().namespace_remove(base, self.namespace)
                    finally:
                        base.close()
        self.close()

    def spec(self, image: str) -> str:
        """QEMU's rbd filename for ``image`` (what map=none hands the VMM)."""
        ns = f"{self.namespace}/" if self.namespace else ""
        return f"rbd:{self.pool}/{ns}{image}:id={self.client}:conf={self.conf}"

    # -- templates ----------------------------------------------------------------------

    def _ensure_template(self, ctx: VolumeCtx) -> None:
        """The template's image and protected snapshot, written from its file once per
        namespace (several stores share it). Written under a staging name and renamed,
        so a half-written image is never taken for the template."""
        _, rbd = librbd()
        io = self.ioctx()
        t = ctx.template
        if t.id in self._ready:
            return  # seen ready by this process; a clone of a template gone since retries here
        name, snap = template_image(t.id), template_snap(t.id)
        for _ in range(3):
            try:
                with rbd.Image(io, name, read_only=True) as im:
                    if any(s["name"] == snap for s in im.list_snaps()) and im.is_protected_snap(snap):
                        self._ready.add(t.id)
                        return
            except rbd.ImageNotFound:
                if not t.path:
                    raise NotFound(f"template {t.id}: its image {self.pool}/{name} is gone from the cluster and "
                                   "this store has no file to write it from", op="import template into ceph",
                                   obj=t.id, hint="import the template's image file on this store") from None
                self._write_template(ctx)
                continue
            # the image exists without its protected snapshot: finish it (idempotent); it
            # may be going away (its last clone removed on another host): then write it again
            with named("snapshot template", name):
                try:
                    with rbd.Image(io, name) as im:
                        with contextlib.suppress(rbd.ImageExists):
                            im.create_snap(snap)
                        with contextlib.suppress(rbd.ImageBusy, rbd.InvalidArgument):
                            im.protect_snap(snap)
                except rbd.ImageNotFound:
                    continue
        raise KernelError("import template into ceph", name, errno.EAGAIN, detail="template image kept vanishing")

    def _write_template(self, ctx: VolumeCtx) -> None:
        rados, rbd = librbd()
        io = self.ioctx()
        t = ctx.template
        final = template_image(t.id)
        staging = f"{final}.tmp-{self.tag.split(':')[-1]}-{os.getpid()}-{process_start(os.getpid())}"
        with named("import template into ceph", final):
            rbd.RBD().create(io, staging, t.size, old_format=False)
            try:
                with rbd.Image(io, staging) as im:
                    _write_sparse(t.path, im, t.size, ctx.progress)
                    if t.digest:
                        im.metadata_set(DIGEST, t.digest)
                    im.create_snap(template_snap(t.id))
                    im.protect_snap(template_snap(t.id))
                try:
                    rbd.RBD().rename(io, staging, final)
                    return
                except rbd.ImageExists:
                    pass  # another store imported it first: use theirs
            except BaseException:
                self._remove_staging(staging)
                raise
            self._remove_staging(staging)

    def _remove_staging(self, name: str) -> None:
        _, rbd = librbd()
        io = self.ioctx()
        with contextlib.suppress(rbd.ImageNotFound):
            with rbd.Image(io, name) as im:
                for s in list(im.list_snaps()):
                    with contextlib.suppress(rbd.InvalidArgument):
                        im.unprotect_snap(s["name"])
                    im.remove_snap(s["name"])
            rbd.RBD().remove(io, name)

    # -- lifecycle ----------------------------------------------------------------------

    def create(self, ctx: VolumeCtx) -> str:
        _, rbd = librbd()
        fs.makedirs_mode(ctx.data_dir, 0o700)
        with ctx.template_lock():
            self._ensure_template(ctx)
        ctx.step("template")
        img = volume_image(ctx.id)
        ctx.record("rbd", img)
        t = ctx.template
        with named("clone template", img):
            for attempt in range(3):
                try:
                    rbd.RBD().clone(self.ioctx(), template_image(t.id), template_snap(t.id), self.ioctx(), img)
                    break
                except (rbd.ImageNotFound, rbd.InvalidArgument):
                    if attempt == 2:  # the template went away under us (its last clone removed elsewhere)
                        raise
                    self._ready.discard(t.id)
                    with ctx.template_lock():
                        self._ensure_template(ctx)
        ctx.step("clone")
        return self._activate(ctx, f"{template_image(t.id)}@{template_snap(t.id)}")

    def attach(self, ctx: VolumeCtx) -> str:
        return self._activate(ctx)  # _hold says NotFound when the image is gone

    def _activate(self, ctx: VolumeCtx, parent: str | None = None) -> str:
        img = volume_image(ctx.id)
        self._hold(ctx.id, img, parent)
        ctx.step("hold")
        if self.map == "none":
            ctx.step("map")
            return self.spec(img)
        dev = self._map(ctx, img)
        ctx.step("map")
        return dev

    # -- the holder record ---------------------------------------------------------------

    def holder_of(self, vid: str) -> str | None:
        """The store (tag@host) that holds volume ``vid`` attached, or None."""
        img = volume_image(vid)
        try:
            hdr = self._header(vid, img, "read holder")
        except NotFound:
            raise KernelError("read holder", img, errno.ENOENT) from None
        return self._records(hdr, img)[0].get(HOLDER) or None

    def watchers(self, vid: str) -> list[str]:
        """Addresses of the clients that have the image open (a VMM, a mapping daemon)."""
        _, rbd = librbd()
        with named("list watchers", volume_image(vid)), rbd.Image(self.ioctx(), volume_image(vid), read_only=True) as im:
            return [w["addr"] for w in im.watchers_list()]

    def _mine(self, record: str) -> bool:
        """Whether an owner or holder record (``<tag>@<host>``) names this store."""
        return record.rpartition("@")[0] == self.tag

    def _held_elsewhere(self, op: str, vid: str, img: str, im: Any, holder: str, hint: str) -> InUse:
        """The InUse for an image another store holds: that store, its host, its live clients."""
        me = self._my_addr()
        live = [w["addr"] for w in im.watchers_list() if w["addr"] != me]
        state = (f"it has {len(live)} live client(s): {', '.join(live)}" if live else
                 "no client of it is alive (a dead host?)")
        return InUse(f"{op} {vid}: {self.pool}/{img} is held by {_who(holder)}; {state}", op=op, obj=vid,
                     hint=hint)

    # The records are image metadata (``rbd image-meta`` lists them), read and written as
    # the omap keys librbd keeps them under in the image's header object (cls_rbd's
    # ``metadata_<key>``, raw value): one round trip each, without opening the image. An
    # open (~12 ms on the test cluster: the header, and a clone's parent too, are read;
    # a watch registered for writing) is what a librbd metadata_set would cost first.

    def _header(self, vid: str, img: str, op: str) -> str:
        """The name of the image's header object (``rbd_header.<image id>``); NotFound when
        the image is gone."""
        rados, _ = librbd()
        try:
            with named(op, img):
                raw = self.ioctx().read(f"rbd_id.{img}")
        except KernelError as e:
            if e.errno != errno.ENOENT:
                raise
            raise NotFound(f"{op} {vid}: its image {self.pool}/{img} is gone", op=op, obj=vid) from None
        n = struct.unpack_from("<I", raw)[0]
        return "rbd_header." + bytes(raw[4:4 + n]).decode()

    def _records(self, header: str, img: str) -> tuple[dict[str, str], int]:
        """This image's cowdisk records (owner, holder, template, parent) in one read, and
        the header object's version they were read at."""
        rados, _ = librbd()
        keys = tuple(META_PREFIX + k for k in (OWNER, HOLDER, TEMPLATE_KEY, PARENT_KEY))
        with named("read records", img), rados.ReadOpCtx() as op:
            it, _ = self.ioctx().get_omap_vals_by_keys(op, keys)
            self.ioctx().operate_read_op(op, header)
            version = int(self.ioctx().get_last_version())
            return {k[len(META_PREFIX):]: bytes(v).decode() for k, v in it}, version

    def _update(self, vid: str, img: str, op: str,
                change: Callable[[dict[str, str]], tuple[dict[str, str], tuple[str, ...]]]) -> dict[str, str]:
        """Read the records, let ``change`` decide what to set and remove (or raise), and
        write that in one operation that asserts the header's version it read (a compare
        and swap: two stores attaching at once cannot both win, and a header removed in
        between is never recreated). Retried when the header changed meanwhile (ERANGE,
        EOVERFLOW); NotFound when the image is gone. Returns the records read."""
        rados, _ = librbd()
        for attempt in range(8):
            hdr = self._header(vid, img, op)
            rec, version = self._records(hdr, img)
            put, drop = change(rec)
            if not put and not drop:
                return rec
            try:
                with named(op, img), rados.WriteOpCtx() as w:
                    w.assert_version(version)
                    if put:
                        self.ioctx().set_omap(w, tuple(META_PREFIX + k for k in put),
                                              tuple(v.encode() for v in put.values()))
                    if drop:
                        self.ioctx().remove_omap_keys(w, tuple(META_PREFIX + k for k in drop))
                    self.ioctx().operate_write_op(w, hdr)
                return rec
            except KernelError as e:
                if e.errno not in (errno.ERANGE, errno.EOVERFLOW) or attempt == 7:
                    raise
        raise AssertionError("unreachable")

    def _held_elsewhere_now(self, op: str, vid: str, img: str, holder: str, hint: str) -> InUse:
        """The InUse for an image another store holds (opened read-only to list its clients)."""
        _, rbd = librbd()
        with named(op, img), rbd.Image(self.ioctx(), img, read_only=True) as im:
            return self._held_elsewhere(op, vid, img, im, holder, hint)

    def _hold(self, vid: str, img: str, parent: str | None) -> None:
        """Record this store as the holder (and, for a new clone, the ``parent`` snapshot it
        was cloned from): one read and one write of the image's records.
        No owner is recorded here: until a store adopts the volume, its owner is the store
        that made it, the only one whose registry has it."""
        def change(rec: dict[str, str]) -> tuple[dict[str, str], tuple[str, ...]]:
            owner, cur = rec.get(OWNER, ""), rec.get(HOLDER, "")
            if owner and not self._mine(owner):
                raise InUse(f"attach volume {vid}: {self.pool}/{img} belongs to {_who(owner)} (adopted there)",
                            op="attach volume", obj=vid,
                            hint=f"`cowdisk volume rm {vid}` forgets it here and leaves it to that store; "
                                 f"`cowdisk volume adopt {vid}` after that takes it back")
            if cur and not self._mine(cur):
                raise self._held_elsewhere_now("attach volume", vid, img, cur,
                                               "checkpoint it there first; if that host is dead, `cowdisk volume "
                                               "restore --steal` takes it over (fencing that host's clients)")
            put = {} if cur == self.holder else {HOLDER: self.holder}
            if parent is not None and PARENT_KEY not in rec:
                put[PARENT_KEY] = parent
            return put, ()

        self._update(vid, img, "attach volume", change)

    def _release_hold(self, img: str, *, deadline_s: float | None = None, vid: str = "", keep: bool = False) -> None:
        """Clear our holder record (``keep``: only wait). With ``deadline_s`` (map=none, where
        a VMM opens the image itself) first wait that long for other clients to close it,
        else InUse."""
        _, rbd = librbd()
        try:
            hdr = self._header(vid, img, "release hold")
        except NotFound:
            return
        if not self._mine(self._records(hdr, img)[0].get(HOLDER, "")):
            return
        if deadline_s is not None:
            with named("release hold", img):
                try:
                    with rbd.Image(self.ioctx(), img, read_only=True) as im:
                        me = self._my_addr()
                        end = time.monotonic() + deadline_s
                        while live := [w["addr"] for w in im.watchers_list() if w["addr"] != me]:
                            if time.monotonic() > end:
                                raise InUse(f"detach volume {vid}: its image is still open by {', '.join(live)}",
                                            op="detach volume", obj=vid, hint="stop the VM that uses it first")
                            time.sleep(0.05)
                except rbd.ImageNotFound:
                    return
        if not keep:
            with contextlib.suppress(NotFound):
                self._update(vid, img, "release hold",
                             lambda rec: ({}, (HOLDER,) if self._mine(rec.get(HOLDER, "")) else ()))

    def _my_addr(self) -> str:
        try:
            return str(self._cluster.get_addrs()) if self._cluster is not None else ""
        except Exception:  # noqa: BLE001 - older bindings
            return ""

    def take_over(self, ctx: VolumeCtx) -> str | None:
        """Fence whoever holds volume ``ctx.id`` and clear the hold: every other client
        watching the image is blocklisted (it can no longer write, even if that host comes
        back), its exclusive lock broken. Returns the old holder. Idempotent. For a host
        known dead (or to be cut off): a live VM there loses its disk."""
        _, rbd = librbd()
        img = volume_image(ctx.id)
        io = self.ioctx()
        with named("take over volume", img):
            try:
                im = rbd.Image(io, img)
            except rbd.ImageNotFound:
                raise NotFound(f"take over volume {ctx.id}: its image {self.pool}/{img} is gone",
                               op="take over volume", obj=ctx.id) from None
            with im:
                old = str(dict(im.metadata_list()).get(HOLDER, "")) or None
                mine = self._my_addr()
                for w in im.watchers_list():
                    if w["addr"] != mine:
                        self._blocklist(w["addr"])
                for o in im.lock_get_owners():
                    with contextlib.suppress(rbd.ImageNotFound):
                        im.lock_break(o["mode"], o["owner"])
                if old is not None:
                    im.metadata_remove(HOLDER)
        log.warning("volume %s: took over from %s (its clients are fenced)", ctx.id, old or "no holder")
        return old

    # -- volumes other stores made --------------------------------------------------------

    def shared_volume(self, vid: str) -> SharedVolume:
        """Volume ``vid`` as the cluster records it (NotFound when it has no image)."""
        _, rbd = librbd()
        img = volume_image(vid)
        io = self.ioctx()
        with named("read volume", img):
            try:
                with rbd.Image(io, img, read_only=True) as im:
                    meta = dict(im.metadata_list())
                    size = im.size()
                    clients = tuple(w["addr"] for w in im.watchers_list())
                    tid = str(meta.get(TEMPLATE_KEY, "")) or self._template_of(im)
            except rbd.ImageNotFound:
                raise NotFound(f"volume {vid}: no image {self.pool}/{img} in the cluster", op="read volume",
                               obj=vid, hint="`cowdisk volume list --shared` lists the volumes there") from None
            digest, tsize = "", 0
            if tid:
                with contextlib.suppress(rbd.ImageNotFound), \
                        rbd.Image(io, template_image(tid), read_only=True) as t:
                    digest = str(dict(t.metadata_list()).get(DIGEST, ""))
                    tsize = t.size()
        return SharedVolume(vid, size, tid, digest, tsize, str(meta.get(OWNER, "")), str(meta.get(HOLDER, "")),
                            clients)

    def _template_of(self, im: Any) -> str:
        """The template id at the root of an image's parent chain ("" when there is none):
        for images made before the template was recorded in their metadata."""
        _, rbd = librbd()
        opened: list[Any] = []
        try:
            for _ in range(64):
                try:
                    parent = im.parent_info()[1]
                except rbd.ImageNotFound:
                    return ""
                if parent.startswith("cowdisk-t-"):
                    return str(parent[len("cowdisk-t-"):])
                if not parent.startswith("cowdisk-v-"):
                    return ""
                im = rbd.Image(self.ioctx(), parent, read_only=True)
                opened.append(im)
            return ""
        finally:
            for o in opened:
                o.close()

    def shared_volumes(self) -> list[SharedVolume]:
        """Every volume image in the store's pool and namespace, whichever store made it."""
        _, rbd = librbd()
        with named("list images", f"{self.pool}/{self.namespace}"):
            names = rbd.RBD().list(self.ioctx())
        out = []
        for n in sorted(names):
            if n.startswith("cowdisk-v-"):
                with contextlib.suppress(NotFound):  # removed meanwhile
                    out.append(self.shared_volume(n[len("cowdisk-v-"):]))
        return out

    def has_template(self, tid: str) -> bool:
        """Whether template ``tid``'s image and protected snapshot are in the cluster."""
        _, rbd = librbd()
        if tid in self._ready:
            return True
        with named("read template", template_image(tid)):
            try:
                with rbd.Image(self.ioctx(), template_image(tid), read_only=True) as im:
                    return any(s["name"] == template_snap(tid) for s in im.list_snaps())
            except rbd.ImageNotFound:
                return False

    def claim(self, ctx: VolumeCtx, *, steal: bool = False) -> None:
        """Make this store the owner of volume ``ctx.id`` (adopt). Refused while another
        store holds it attached, naming that store and host, unless ``steal`` (the store
        then fences it with :meth:`take_over` before attaching)."""
        img = volume_image(ctx.id)

        def change(rec: dict[str, str]) -> tuple[dict[str, str], tuple[str, ...]]:
            holder = rec.get(HOLDER, "")
            if holder and not self._mine(holder) and not steal:
                raise self._held_elsewhere_now("adopt volume", ctx.id, img, holder,
                                               "checkpoint it there first; if that host is dead, adopt it with "
                                               "--steal (fences that host's clients)")
            put = {} if rec.get(OWNER) == self.holder else {OWNER: self.holder}
            if TEMPLATE_KEY not in rec:
                put[TEMPLATE_KEY] = ctx.template.id
            return put, ()

        self._update(ctx.id, img, "adopt volume", change)

    def unclaim(self, ctx: VolumeCtx, previous: str) -> None:
        """Give volume ``ctx.id`` back to its ``previous`` owner (an adopt rolled back);
        nothing when another store claimed it meanwhile or the image is gone."""
        img = volume_image(ctx.id)

        def change(rec: dict[str, str]) -> tuple[dict[str, str], tuple[str, ...]]:
            cur = rec.get(OWNER, "")
            if cur and not self._mine(cur):
                return {}, ()
            if previous:
                return {OWNER: previous}, ()
            return {}, ((OWNER,) if cur else ())

        with contextlib.suppress(NotFound):
            self._update(ctx.id, img, "give volume back", change)

    def _blocklist(self, addr: str) -> None:
        cmd = json.dumps({"prefix": "osd blocklist", "blocklistop": "add", "addr": addr})
        with named("blocklist client", addr):
            ret, _, err = self._cluster.mon_command(cmd, b"", timeout=30)
            if ret != 0:
                raise KernelError("blocklist client", addr, abs(ret), detail=err)

    # -- the fuse mapping -----------------------------------------------------------------

    def _map(self, ctx: VolumeCtx, img: str) -> str:
        fs.makedirs_mode(ctx.data_dir, 0o700)
        mnt = os.path.join(ctx.data_dir, DISK)
        pidfile = os.path.join(ctx.data_dir, PIDFILE)
        ctx.record("fuse", mnt)
        if _mounted(mnt):  # a half-made attempt of a killed process
            self._unmap(mnt, pidfile, 5.0, ctx.id)
        with open(mnt, "a"):
            pass
        os.chmod(mnt, 0o600)
        ns = f",namespace={self.namespace}" if self.namespace else ""
        node = f"driver=rbd,node-name=v,pool={self.pool}{ns},image={img},conf={self.conf},user={self.client}," \
               "cache.direct=on"
        argv = [QSD, "--blockdev", node,
                "--export", f"type=fuse,id=e,node-name=v,mountpoint={mnt},writable=on,growable=off",
                "--pidfile", pidfile, "--daemonize"]
        r = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
        if r.returncode != 0:
            raise KernelError("map volume", ctx.id, errno.EIO, detail=f"{QSD}: {r.stderr.strip()}")
        return mnt

    def _unmap(self, mnt: str, pidfile: str, deadline_s: float, vid: str) -> None:
        pid = _read_pid(pidfile)
        if pid is not None and _is_qsd(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            end = time.monotonic() + max(deadline_s, 5.0)
            while _is_qsd(pid) and time.monotonic() < end:
                time.sleep(0.002)
            if _is_qsd(pid):
                raise InUse(f"unmap volume {vid}: {QSD} PID {pid} does not exit", op="detach volume", obj=vid,
                            hint=f"something still has {mnt} open")
        if _mounted(mnt):  # the daemon died without unmounting (killed): a stale FUSE mount
            with contextlib.suppress(KernelError):
                kmount.umount(mnt, kmount.MNT_DETACH)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pidfile)

    def detach(self, ctx: VolumeCtx, *, deadline_s: float = 5.0) -> None:
        if self.map == "fuse":
            self._unmap(os.path.join(ctx.data_dir, DISK), os.path.join(ctx.data_dir, PIDFILE), deadline_s, ctx.id)
            ctx.forget("fuse", os.path.join(ctx.data_dir, DISK))
            self._release_hold(volume_image(ctx.id))
        else:
            # remove deletes the image next: its holder record need not be cleared first
            self._release_hold(volume_image(ctx.id), deadline_s=deadline_s, vid=ctx.id, keep=ctx.op == "remove")

    def _watchers_or_none(self, vid: str) -> list[str]:
        _, rbd = librbd()
        try:
            return self.watchers(vid)
        except KernelError as e:
            if e.errno == errno.ENOENT:
                return []
            raise

    def destroy(self, ctx: VolumeCtx) -> None:
        """Delete the clone, then the snapshot it came from once no clone uses it (and
        the template's image with it). Clones of this volume (restored or forked from
        it) are flattened first: they keep their data. An image another store owns or
        holds is left alone (the volume moved there): only this store forgets it.

        The image is not opened: its records say who owns and holds it and which snapshot
        it was cloned from (an image without that record is opened read-only for it), and
        a remove refused for snapshots (ENOTEMPTY) is the sign to flatten their clones.
        The template's snapshot is tried only when no other volume of this store uses the
        template (``ctx.template_in_use()``, asked after this image is gone: of volumes
        removed at once, the last to get there tries), whatever this image's parent: the
        store's last volume of a template frees it once no clone is left anywhere
        (unprotecting a snapshot lists its clones in the cluster: a round trip every remove
        would pay)."""
        _, rbd = librbd()
        io = self.ioctx()
        img = volume_image(ctx.id)
        parent: tuple[str, str] | None = None
        try:
            hdr = self._header(ctx.id, img, "remove volume")
            rec, _ = self._records(hdr, img)
            other = next((rec[k] for k in (OWNER, HOLDER) if rec.get(k) and not self._mine(rec[k])), "")
            if other:
                log.warning("volume %s: image belongs to or is held by %s, left in the cluster", ctx.id, other)
                ctx.forget("rbd", img)
                return
            if PARENT_KEY in rec:
                pimg, _, psnap = rec[PARENT_KEY].partition("@")
                parent = (pimg, psnap)
            else:  # made before the record, or killed between its clone and the record
                with named("read parent", img), rbd.Image(io, img, read_only=True) as im:
                    with contextlib.suppress(rbd.ImageNotFound):
                        _, pimg, psnap = im.parent_info()
                        parent = (str(pimg), str(psnap))
            with named("remove volume image", img):
                try:
                    rbd.RBD().remove(io, img)
                except rbd.ImageHasSnapshots:  # forks or restores were made from it
                    with rbd.Image(io, img) as im:
                        self._drop_snaps(im, img)
                    rbd.RBD().remove(io, img)
        except (NotFound, rbd.ImageNotFound):
            pass
        ctx.forget("rbd", img)
        if parent is not None and not parent[0].startswith("cowdisk-t-"):
            self._drop_parent_snap(*parent)  # a fork's or restore-as's snapshot of its source
        # under the template's lock: a create in this store never sees it half-removed
        with ctx.template_lock():
            if not ctx.template_in_use():
                self._drop_parent_snap(template_image(ctx.template.id), template_snap(ctx.template.id))

    def _drop_snaps(self, im: Any, img: str) -> None:
        """Flatten the clones of ``img``'s snapshots, then remove the snapshots."""
        _, rbd = librbd()
        io = self.ioctx()
        for s in list(im.list_snaps()):
            with named("flatten clones of", f"{img}@{s['name']}"):
                im.set_snap(s["name"])
                children = list(im.list_children2()) if hasattr(im, "list_children2") else []
                im.set_snap(None)
                for ch in children:
                    cio = self._cluster.open_ioctx(ch["pool"])
                    try:
                        cio.set_namespace(ch.get("pool_namespace") or "")
                        with rbd.Image(cio, ch["image"]) as c:
                            c.flatten()
                    finally:
                        cio.close()
                with contextlib.suppress(rbd.InvalidArgument):
                    im.unprotect_snap(s["name"])
                im.remove_snap(s["name"])

    def _drop_parent_snap(self, parent: str, snap: str) -> None:
        """Unprotect and remove ``parent@snap`` when no clone is left (EBUSY: one is);
        a template image goes with its snapshot."""
        _, rbd = librbd()
        io = self.ioctx()
        try:
            with rbd.Image(io, parent) as im:
                try:
                    im.unprotect_snap(snap)
                except (rbd.ImageBusy, rbd.InvalidArgument):
                    return  # clones left (or already unprotected by a concurrent removal)
                with named("remove snapshot", f"{parent}@{snap}"):
                    im.remove_snap(snap)
                    others = list(im.list_snaps())
            if parent.startswith("cowdisk-t-") and not others:
                with named("remove template image", parent), contextlib.suppress(rbd.ImageNotFound, rbd.ImageBusy,
                                                                                   rbd.ImageHasSnapshots):
                    rbd.RBD().remove(io, parent)
        except rbd.ImageNotFound:
            pass

    def copy_data(self, src: VolumeCtx, dst: VolumeCtx, *, src_attached: bool,
                  like: VolumeCtx | None = None) -> None:
        """A protected snapshot of the source (crash-consistent if attached: writes are
        acknowledged only once the OSDs have them) and a clone of it: no data copied. With
        ``like``, a clone of the snapshot ``like`` was cloned from (fork into N: one
        snapshot, N clones; the snapshot goes with the last of them)."""
        _, rbd = librbd()
        io = self.ioctx()
        simg, dimg, snap = volume_image(src.id), volume_image(dst.id), copy_snap((like or dst).id)
        fs.makedirs_mode(dst.data_dir, 0o700)
        dst.record("rbd", dimg)
        with named("snapshot volume", f"{simg}@{snap}"), rbd.Image(io, simg) as im:
            if not any(s["name"] == snap for s in im.list_snaps()):
                if like is not None:  # never a second instant under the first one's name
                    raise NotFound(f"fork volume {dst.id}: snapshot {simg}@{snap} of {like.id} is gone",
                                   op="fork volume", obj=f"{simg}@{snap}")
                im.create_snap(snap)
            if not im.is_protected_snap(snap):
                im.protect_snap(snap)
        dst.step("snapshot")
        with named("clone volume", dimg):
            try:
                rbd.RBD().clone(io, simg, snap, io, dimg)
            except rbd.ImageExists:
                pass  # a killed attempt made it; recovery would have removed a bad one
        # its parent is a volume, not the template: say which template, for a store adopting it
        self._update(dst.id, dimg, "clone volume",
                     lambda rec: ({TEMPLATE_KEY: dst.template.id, PARENT_KEY: f"{simg}@{snap}"}, ()))
        dst.step("clone")

    def flatten(self, ctx: VolumeCtx, out_path: str, *, attached: bool) -> None:
        """The image with its parents read into a new sparse file (a new local template)."""
        _, rbd = librbd()
        img = volume_image(ctx.id)
        with named("flatten volume", img), rbd.Image(self.ioctx(), img, read_only=True) as im:
            size = im.size()
            fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size)
                extents: list[tuple[int, int]] = []
                im.diff_iterate(0, size, None, lambda off, n, exists: extents.append((off, n)) if exists else None,
                                include_parent=True, whole_object=False)
                done = 0
                for off, n in extents:
                    pos = off
                    while pos < off + n:
                        data = im.read(pos, min(4 << 20, off + n - pos))
                        if data.strip(b"\0"):
                            os.pwrite(fd, data, pos)
                        pos += len(data)
                    done += n
                    if ctx.progress:
                        ctx.progress(done, size)
                os.fsync(fd)
            finally:
                os.close(fd)

    def usage(self, ctx: VolumeCtx, *, attached: bool) -> Usage:
        """The image's own bytes (fast-diff, whole objects) and the template's shared bytes."""
        _, rbd = librbd()
        img = volume_image(ctx.id)
        with named("usage", img), rbd.Image(self.ioctx(), img, read_only=True) as im:
            size = im.size()
            own = _allocated(im, size, include_parent=False)
            total = _allocated(im, size, include_parent=True)
        return Usage(disk_bytes=own, apparent_bytes=size, exclusive_bytes=own, shared_bytes=max(total - own, 0))

    def is_attached(self, ctx: VolumeCtx) -> bool:
        if self.map == "fuse":
            mnt = os.path.join(ctx.data_dir, DISK)
            pid = _read_pid(os.path.join(ctx.data_dir, PIDFILE))
            return _mounted(mnt) and pid is not None and _is_qsd(pid)
        try:
            return self.holder_of(ctx.id) == self.holder
        except KernelError as e:
            if e.errno == errno.ENOENT:
                return False
            raise

    def device_path(self, ctx: VolumeCtx) -> str | None:
        """The mapped file (map=fuse). None for map=none: no process of this host opens a
        file for it (the VMM opens the image through librbd); detach checks the image's
        watchers instead, so the store's holder search has nothing to look for."""
        if self.map == "none" or not self.is_attached(ctx):
            return None
        return os.path.join(ctx.data_dir, DISK)

    def stage(self, ctx: VolumeCtx, device: str, dest: str, *, uid: int | None, gid: int | None) -> str:
        raise Unsupported(f"jail volume {ctx.id}: the rbd backend cannot stage a volume into a jail yet",
                          op="jail", obj=ctx.id, hint="give the jailed VMM the rbd image through QEMU, or "
                                                      "bind-mount the mapped file")

    # -- recovery -------------------------------------------------------------------------

    def scan(self) -> Iterator[KernelObject]:
        """This store's FUSE mappings (and their daemons), and template images a dead
        process of this store left half-written."""
        base = os.path.join(self.data_root, "volumes")
        with contextlib.suppress(FileNotFoundError):
            for vid in os.listdir(base):
                mnt = os.path.join(base, vid, DISK)
                pid = _read_pid(os.path.join(base, vid, PIDFILE))
                if _mounted(mnt) or (pid is not None and _is_qsd(pid)):
                    yield KernelObject("fuse", mnt, vid, detail=f"{QSD} PID {pid}")
        _, rbd = librbd()
        mine = f".tmp-{self.tag.split(':')[-1]}-"
        with named("list images", f"{self.pool}/{self.namespace}"):
            names = rbd.RBD().list(self.ioctx())
        for n in names:
            if n.startswith("cowdisk-t-") and mine in n:
                pid, _, start = n.split(mine, 1)[1].partition("-")
                if not (pid.isdigit() and process_alive(int(pid), start or None)):
                    yield KernelObject("rbd-staging", n, None)

    def release(self, obj: KernelObject, *, deadline_s: float = 5.0) -> None:
        if obj.kind == "fuse":
            d = os.path.dirname(obj.name)
            self._unmap(obj.name, os.path.join(d, PIDFILE), deadline_s, obj.volume_id or "?")
            if obj.volume_id:
                self._release_hold(volume_image(obj.volume_id))
        elif obj.kind == "rbd-staging":
            with named("remove staging image", obj.name):
                self._remove_staging(obj.name)


RbdBackend._instances = weakref.WeakSet()


# -- helpers ------------------------------------------------------------------------------


def _connect(rados: Any, conf: str, client: str) -> Any:
    c = rados.Rados(conffile=conf, rados_id=client,
                    conf={"rados_mon_op_timeout": "30", "rados_osd_op_timeout": "30",
                          "client_mount_timeout": "20", "rbd_default_clone_format": "1"})
    c.connect(timeout=20)
    return c


def _in_fresh_thread(fn: Any) -> Any:
    """Run ``fn`` in a new thread. librados draws a client's address nonce from a
    thread-local random engine; the main thread of forked processes inherits one state,
    so every forked child would connect as the same client address and the cluster
    would cut their sessions (ops time out). A new thread seeds its own."""
    import threading

    out: list[Any] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            err.append(e)

    t = threading.Thread(target=run, name="cowdisk-rados-connect")
    t.start()
    t.join()
    if err:
        raise err[0]
    return out[0]


def _who(record: str) -> str:
    """``<tag>@<host>`` as words: "store cowdisk:1a2b3c4d on host h1"."""
    tag, _, host = record.rpartition("@")
    return f"store {tag} on host {host}" if tag else f"store {record}"


def _which(name: str) -> bool:
    import shutil

    return shutil.which(name) is not None


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            s = f.read().strip()
        return int(s) if s.isdigit() else None
    except FileNotFoundError:
        return None


def _is_qsd(pid: int) -> bool:
    """``pid`` runs (not a zombie) and is a qemu-storage-daemon."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
    except FileNotFoundError:
        return False
    comm, _, rest = st.partition("(")[2].rpartition(")")
    return rest.split()[0] != "Z" and comm.startswith("qemu-storage-d")


def _mounted(path: str) -> bool:
    return kmount.mounted_at(path) is not None


def _allocated(im: Any, size: int, *, include_parent: bool) -> int:
    total = 0

    def cb(off: int, n: int, exists: bool) -> None:
        nonlocal total
        if exists:
            total += n

    im.diff_iterate(0, size, None, cb, include_parent=include_parent, whole_object=True)
    return total


def _write_sparse(path: str, im: Any, size: int, progress: Progress | None) -> None:
    """Write the file's data extents (SEEK_DATA/SEEK_HOLE) into the image, skipping
    all-zero blocks: a fresh RBD image reads zeros."""
    bs = 4 << 20
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        off = 0
        while off < size:
            try:
                off = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, off, os.SEEK_HOLE)
            while off < end:
                data = os.pread(fd, min(bs, end - off), off)
                if not data:
                    break
                if data.strip(b"\0"):
                    im.write(data, off)
                off += len(data)
                if progress:
                    progress(off, size)
        im.flush()
    finally:
        os.close(fd)
