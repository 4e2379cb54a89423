"""The rbd backend: the store-wide connection, templates as protected snapshots, volumes as
their clones, copies, flatten, usage, recovery (see the package's docstring)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import weakref
from typing import Any, ClassVar, Iterator, Mapping

from ...errors import InvalidArgument, KernelError, NotFound, Unsupported
from ...kernel import fs
from ...kernel.procfs import process_alive, process_start, read_pid_file
from ...progress import Progress
from .. import BackendEnv, KernelObject, Shared, Usage, VolumeCtx, check_options
from .export import DISK, PIDFILE, QSD, FuseExport, _is_qsd, _mounted, _which
from .lib import _connect, _in_fresh_thread, librbd, named
from .records import DIGEST, HOLDER, OWNER, PARENT_KEY, TEMPLATE_KEY, Records, copy_snap, template_image, \
    template_snap, volume_image

log = logging.getLogger("cowdisk.backends.rbd")

OPTIONS = frozenset({"conf", "pool", "client", "namespace", "map"})
MAPS = ("fuse", "none")


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


class RbdBackend(Records, FuseExport, Shared):
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
            pid = read_pid_file(os.path.join(ctx.data_dir, PIDFILE))
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
                pid = read_pid_file(os.path.join(base, vid, PIDFILE))
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
        for start, length in fs.data_segments(fd, size):
            off, end = start, start + length
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
