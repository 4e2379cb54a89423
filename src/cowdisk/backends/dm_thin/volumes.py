"""The dm-thin backend's volumes: a template is a thin filled once, a volume a thin snapshot
of it (create, attach, detach, destroy, copies, flatten and templates held in the pool,
usage, recovery), over :class:`~cowdisk.backends.dm_thin.pool.ThinPool`."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import time
from typing import Callable, ClassVar, Iterator, Mapping

from ...errors import CowdiskError, KernelError, StateError
from ...kernel import blk, dm, dm_status, fs, loop, procfs
from ...progress import Progress
from .. import (BackendEnv, HoldsTemplates, KernelObject, OwnSpace, PreparesCopies, Usage, VolumeCtx, WatchesSpace,
               check_options)
from ..dm_common import (DmVolumeBase, TemplateLoops, check_lazy_size, copy_device, hold_lazy_origin, lazy_origins,
                         release_lazy_origin)
from .pool import (FLAT_PREFIX, OPTIONS, THIN_ID_FILE, MiB, ThinPool, _fsync_dir, _read_id, _wait_loops_gone,
                   _write_durable, thin_supported)

log = logging.getLogger("cowdisk.backends.dm_thin")


class DmThinBackend(ThinPool, DmVolumeBase, PreparesCopies, OwnSpace, WatchesSpace, HoldsTemplates):
    name: ClassVar[str] = "dm-thin"
    larger_volumes: ClassVar[bool] = True
    """A thin device may be longer than its origin: the blocks past it are unprovisioned."""
    # HoldsTemplates: flatten makes the template a thin snapshot of the volume in the pool (no
    # data copied): the store keeps a small descriptor file for it (``flatten_held`` and after).
    steps: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "create": ("template", "thin", "dm"),
        "attach": ("dm",),
        "copy_data": ("snapped", "thin"),  # snapped: an attached source still suspended
        "flatten": ("flat_thin", "flat_digest"),  # the store calls flatten_held: this backend holds templates
    }

    @classmethod
    def available(cls, root: str) -> tuple[bool, str]:
        ok, reason = thin_supported()
        if ok and shutil.which("thin_check") is None:
            reason += " (thin_check missing: install thin-provisioning-tools to check metadata after a crash)"
        return ok, (reason if ok else f"dm-thin: {reason}")

    @classmethod
    def open(cls, env: BackendEnv) -> "DmThinBackend":
        check_options(cls.name, env, OPTIONS)
        ok, reason = thin_supported()
        if not ok:
            raise StateError(f"open store {env.root}: dm-thin: {reason}", op="open store", obj=env.root,
                             hint="use backend dm-snapshot or auto")
        b = cls(env)
        b.open_pool()
        return b

    def __init__(self, env: BackendEnv) -> None:
        super().__init__(env)
        self.template_loops = TemplateLoops(env.shared_loop_get, env.shared_loop_set)
        """A whole lazy template's loop (its external origin, ``hold_lazy_origin``)."""

    # -- the template's thin device -----------------------------------------------------

    def _template_thin(self, ctx: VolumeCtx) -> int:
        """The thin id of ``ctx.template``, filled from the template file the first time."""
        t = ctx.template
        final = os.path.join(self.tdir, t.id)
        partial = final + ".partial"
        tid = _read_id(final)
        if tid is not None:  # published whole (os.replace) once filled: read without the lock,
            return tid       # so that creates at once of one template do not queue on its flock
        with ctx.template_lock():
            tid = _read_id(final)
            if tid is not None:
                return tid
            if os.path.basename(t.path) == "disk.thin":  # a flattened template: its thin is its data
                raise KernelError("use template", t.id, errno.ENOENT,
                                  detail=f"its thin is not named in {self.tdir} (deleted behind cowdisk's back?)",
                                  hint="remove the template; flatten a volume again")
            tmp_name = f"{self.dm_prefix}.t-{t.id}"
            dm.control().remove(tmp_name, deadline_s=5.0, missing_ok=True)  # a killed fill's device
            old = _read_id(partial)
            if old is not None:
                self._delete_thin(old)
            tid = self._alloc_id()
            _write_durable(partial, f"{tid} {t.path}\n")
            self._message(f"create_thin {tid}")
            info = dm.control().create_device(tmp_name, self._thin_table(tid, t.size))
            try:
                _fill(t.path, dm.device_node(info), t.size, ctx)
            finally:
                dm.control().remove(tmp_name, deadline_s=10.0, missing_ok=True)
            os.replace(partial, final)
            _fsync_dir(self.tdir)
            log.info("thin pool %s: template %s filled as thin %d", self.pool_name, t.id, tid)
            return tid

    # -- lifecycle ---------------------------------------------------------------------

    def _id_path(self, ctx: VolumeCtx) -> str:
        return os.path.join(ctx.data_dir, THIN_ID_FILE)

    def _new_thin(self, ctx: VolumeCtx) -> int:
        """Allocate a thin id for ``ctx`` and name it durably before it exists."""
        fs.makedirs_mode(ctx.data_dir, 0o700)
        path = self._id_path(ctx)
        tid = self._take_id()
        ctx.record("file", path)
        _write_durable(path, f"{tid}\n")
        return tid

    def create(self, ctx: VolumeCtx) -> str:
        """A thin snapshot of the template's thin; over a lazy template, a new empty thin
        whose external origin is the template's nbd device (no template thin, no data
        copied: what the volume has not written is read from the template's server)."""
        self.ensure_room()
        if ctx.template.serve is not None:
            check_lazy_size(ctx, self.block_sectors * 512, self.name)
            ctx.step("template")
            tid = self._new_thin(ctx)
            self._message(f"create_thin {tid}")
            ctx.step("thin")
            return self._activate(ctx, tid)
        origin = self._template_thin(ctx)
        ctx.step("template")
        tid = self._new_thin(ctx)
        self._message(f"create_snap {tid} {origin}")
        ctx.step("thin")
        return self._activate(ctx, tid)

    @contextlib.contextmanager
    def _origin(self, ctx: VolumeCtx) -> Iterator[str | None]:
        """The external origin a table of ``ctx``'s thin names: a lazy template's loop over its
        whole cache or its nbd device (held open, under the template's lock, until the table
        holds it), else None."""
        if ctx.template.serve is None:
            yield None
            return
        with ctx.template_lock():
            fd, devno = hold_lazy_origin(ctx, self.template_loops, direct_io=True)  # (as the pool's data loop)
            try:
                yield devno
            finally:
                os.close(fd)

    def attach(self, ctx: VolumeCtx) -> str:
        tid = _read_id(self._id_path(ctx))
        if tid is None:
            raise KernelError("attach volume", self._id_path(ctx), errno.ENOENT, detail="the thin id file is missing")
        self.ensure_room()
        return self._activate(ctx, tid)

    def _activate(self, ctx: VolumeCtx, tid: int) -> str:
        ctx.record("dm", ctx.dm_name)
        with self._origin(ctx) as origin:
            info = dm.control().create_device(ctx.dm_name, self._thin_table(tid, ctx.volume_size, origin))
        ctx.step("dm")
        return dm.device_node(info)

    def detach(self, ctx: VolumeCtx, *, deadline_s: float = 5.0) -> None:
        dm.control().remove(ctx.dm_name, deadline_s=deadline_s, missing_ok=True)
        ctx.forget("dm", ctx.dm_name)

    def destroy(self, ctx: VolumeCtx) -> None:
        """Discard the thin device's blocks (back to the host when the pool sits on files),
        delete the thin, then its id file. Called only after :meth:`detach`."""
        path = self._id_path(ctx)
        tid = _read_id(path)
        if tid is not None:
            if self.discard_on_remove:
                self._discard(ctx, tid)
            self._delete_thin(tid)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        ctx.forget("file", path)

    def _discard(self, ctx: VolumeCtx, tid: int) -> None:
        ctx.record("dm", ctx.dm_name)
        try:
            info = dm.control().create_device(ctx.dm_name, self._thin_table(tid, ctx.volume_size))
        except KernelError as e:
            if e.errno in (errno.ENODATA, errno.ENOENT, errno.EINVAL):
                return  # the thin is gone already (a remove killed after delete)
            raise
        try:
            fd = os.open(dm.device_node(info), os.O_WRONLY | os.O_CLOEXEC)
            try:
                blk.discard(fd, 0, ctx.volume_size)
            finally:
                os.close(fd)
        finally:
            dm.control().remove(ctx.dm_name, deadline_s=10.0, missing_ok=True)
            ctx.forget("dm", ctx.dm_name)

    def copy_data(self, src: VolumeCtx, dst: VolumeCtx, *, src_attached: bool,
                  like: VolumeCtx | None = None) -> None:
        """A thin snapshot of the source: no data copied; an attached source is suspended
        (its I/O waits, flushed) for the instant of the snapshot. With ``like``, a thin
        snapshot of ``like`` (inactive: nothing suspended), the same instant."""
        origin_of = like or src
        origin = _read_id(self._id_path(origin_of))
        if origin is None:
            raise KernelError("snapshot volume", self._id_path(origin_of), errno.ENOENT,
                              detail="the thin id file is missing")
        if like is None:  # a snapshot allocates no data block: the batch's first copy checked the pool
            self.ensure_room()
        tid = self._new_thin(dst)
        if src_attached and like is None:
            dm.control().suspend(src.dm_name)
            try:
                self._message(f"create_snap {tid} {origin}")
                dst.step("snapped")  # a kill here leaves the source suspended: recovery thaws it
            finally:
                dm.control().resume(src.dm_name)
        else:
            self._message(f"create_snap {tid} {origin}")
            dst.step("snapped")
        dst.step("thin")

    def flatten(self, ctx: VolumeCtx, out_path: str, *, attached: bool) -> None:
        if attached:
            self.copy_attached(ctx, out_path)
            return
        tid = _read_id(self._id_path(ctx))
        if tid is None:
            raise KernelError("flatten volume", self._id_path(ctx), errno.ENOENT, detail="the thin id file is missing")
        ctx.record("dm", ctx.dm_name)
        with self._origin(ctx) as origin:
            info = dm.control().create_device(ctx.dm_name, self._thin_table(tid, ctx.volume_size, origin),
                                              readonly=True)
        try:
            copy_device(dm.device_node(info), out_path, ctx.volume_size, ctx.progress)
        finally:
            dm.control().remove(ctx.dm_name, deadline_s=10.0, missing_ok=True)
            ctx.forget("dm", ctx.dm_name)

    # -- templates held in the pool (flatten without copying) ---------------------------------

    def flatten_held(self, ctx: VolumeCtx, out: str, *, attached: bool) -> str:
        """(Not for a volume over a lazy template: its thin alone is not its content; the
        store flattens those by copying, :meth:`flatten`.) Make the volume's current contents a template without copying: a thin snapshot of
        it (an attached volume suspended for that instant), named by the descriptor ``out``
        (JSON: thin id, size, the flat entry) and, until it is published, by a flat entry
        in ``thin/templates`` that names this process. Returns the content's sha256, read
        from the snapshot (unprovisioned blocks read as zeros, without I/O)."""
        origin = _read_id(self._id_path(ctx))
        if origin is None:
            raise KernelError("flatten volume", self._id_path(ctx), errno.ENOENT, detail="the thin id file is missing")
        self.ensure_room()
        pid = os.getpid()
        name = f"{FLAT_PREFIX}{pid}-{procfs.process_start(pid)}-{secrets.token_hex(4)}"
        tid = self._alloc_id()
        _write_durable(out, json.dumps({"backend": self.name, "thin": tid, "size": ctx.volume_size,
                                        "flat": name, "volume": ctx.id}) + "\n")
        _write_durable(os.path.join(self.tdir, name), f"{tid} {out}\n")
        if attached:
            dm.control().suspend(ctx.dm_name)
            try:
                self._message(f"create_snap {tid} {origin}")
            finally:
                dm.control().resume(ctx.dm_name)
        else:
            self._message(f"create_snap {tid} {origin}")
        ctx.step("flat_thin")
        return self._digest_thin(tid, ctx.volume_size, self.dm_prefix + ".t-" + name, ctx.progress,
                                 active=lambda: ctx.step("flat_digest"))

    def _digest_thin(self, tid: int, size: int, dm_name: str, progress: Progress | None,
                     active: Callable[[], None] = lambda: None) -> str:
        """sha256 of thin ``tid``'s first ``size`` bytes, through a read-only device ``dm_name``
        (``active`` is called once it exists: a crash point)."""
        info = dm.control().create_device(dm_name, self._thin_table(tid, size), readonly=True)
        try:
            active()
            h = hashlib.sha256()
            fd = os.open(dm.device_node(info), os.O_RDONLY | os.O_CLOEXEC)
            try:
                pos = 0
                while pos < size:
                    data = os.pread(fd, min(8 * MiB, size - pos), pos)
                    if not data:
                        raise KernelError("digest thin", dm_name, errno.EIO, detail=f"short read at {pos} of {size}")
                    h.update(data)
                    pos += len(data)
                    if progress:
                        progress(pos, size)
            finally:
                os.close(fd)
            return h.hexdigest()
        finally:
            dm.control().remove(dm_name, deadline_s=10.0, missing_ok=True)

    @staticmethod
    def _held(descriptor: str) -> tuple[int, int, str]:
        """(thin id, size, flat entry name) from a held template's descriptor."""
        try:
            with open(descriptor) as f:
                d = json.load(f)
            return int(d["thin"]), int(d["size"]), str(d["flat"])
        except (ValueError, KeyError, TypeError):
            raise KernelError("read held template", descriptor, errno.EBADMSG,
                              detail="not a dm-thin template descriptor") from None

    def publish_held(self, descriptor: str, template_id: str) -> None:
        """The descriptor was published as template ``template_id``: name its thin under that
        id (as a filled template's) and drop the flat entry. Call with the template's lock."""
        tid, _, flat = self._held(descriptor)
        _write_durable(os.path.join(self.tdir, template_id), f"{tid} {descriptor}\n")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.tdir, flat))
        _fsync_dir(self.tdir)

    def drop_held(self, descriptor: str) -> None:
        """Delete the thin of an unpublished descriptor (a template with that content exists
        already, or the flatten is undone) and its flat entry."""
        try:
            tid, _, flat = self._held(descriptor)
        except FileNotFoundError:
            return
        # the flatten's digest device (a flatten killed while it read the thin) holds the thin open
        dm.control().remove(f"{self.dm_prefix}.t-{flat}", deadline_s=5.0, missing_ok=True)
        self._delete_thin(tid)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.tdir, flat))

    def held_size(self, descriptor: str) -> int:
        return self._held(descriptor)[1]

    def held_digest(self, template_id: str, descriptor: str, progress: Progress | None = None) -> str:
        """sha256 of a held template's content (verify); call with the template's lock (the
        read-only device is named like a fill: recovery leaves it alone while the lock is held)."""
        tid, size, _ = self._held(descriptor)
        named = _read_id(os.path.join(self.tdir, template_id))
        if named != tid:
            raise KernelError("verify template", template_id, errno.ENOENT,
                              detail=f"its thin {tid} is not named in {self.tdir}")
        return self._digest_thin(tid, size, f"{self.dm_prefix}.t-{template_id}", progress)

    def usage(self, ctx: VolumeCtx, *, attached: bool) -> Usage:
        """The thin device's mapped, exclusive and shared bytes (thin_ls on a metadata
        snapshot: attached or not), the pool's data fill as ``cow_used/total`` and the pool's
        mode as health. Without thin_ls: the mapped bytes from the device's status."""
        tid = _read_id(self._id_path(ctx))
        mapped, excl, shared = 0, None, None
        health = "ok"
        if tid is not None and shutil.which("thin_ls"):
            mapped, excl, shared = self.thin_usage().get(tid, (0, 0, 0))
        elif attached:
            st = dm_status.parse_thin_status(dm.control().status(ctx.dm_name)[0].text)
            mapped = (st.mapped_sectors or 0) * 512
        if attached:
            st = dm_status.parse_thin_status(dm.control().status(ctx.dm_name)[0].text)
            if st.state != "ok":
                health = st.state
        u = self.pool_usage()
        if u.mode != "rw" or u.needs_check:
            health = f"pool {u.mode}{', needs check' if u.needs_check else ''}"
        return Usage(disk_bytes=mapped, apparent_bytes=ctx.volume_size, exclusive_bytes=excl,
                     shared_bytes=shared, cow_used_bytes=u.data_used * u.block_bytes,
                     cow_total_bytes=u.data_total * u.block_bytes, health=health)

    def thin_usage(self) -> dict[int, tuple[int, int, int]]:
        """Thin id -> (mapped, exclusive, shared) bytes of every thin device in the pool, read
        by ``thin_ls`` from a metadata snapshot of the live pool."""
        if self.on_files:
            meta = f"/dev/loop{self._pool_loops()[0]}"
        else:
            assert self.meta_dev is not None
            meta = self.meta_dev
        with self._pool_lock():
            self._message("reserve_metadata_snap")
            try:
                r = subprocess.run(["thin_ls", "--no-headers", "-m", "-o",
                                    "DEV,MAPPED_BYTES,EXCLUSIVE_BYTES,SHARED_BYTES", meta],
                                   capture_output=True, text=True)
            finally:
                self._message("release_metadata_snap")
        if r.returncode != 0:
            raise KernelError("thin_ls", meta, errno.EIO, detail=(r.stderr or r.stdout).strip())
        out = {}
        for line in r.stdout.splitlines():
            w = line.split()
            if len(w) == 4 and all(x.isdigit() for x in w):
                out[int(w[0])] = (int(w[1]), int(w[2]), int(w[3]))
        return out

    # -- recovery ----------------------------------------------------------------------

    def scan(self) -> Iterator[KernelObject]:
        """Volume devices of this store (the pool and template fills are not volumes), and
        template thins whose template file is gone (the template was removed)."""
        fill = self.dm_prefix + ".t-"
        for d in dm.control().list_devices():
            if d.name.startswith(self.dm_prefix) and not d.name.startswith(self.dm_prefix + "."):
                yield KernelObject("dm", d.name, d.name[len(self.dm_prefix):])
            elif d.name.startswith(fill + FLAT_PREFIX):  # a flatten's digest device
                if not _flat_owner_alive(d.name[len(fill):]):
                    yield KernelObject("dm", d.name, None, detail="flatten digest")
            elif d.name.startswith(fill):  # a template fill's device: left by a killed fill
                yield KernelObject("dm", d.name, None, detail="template fill", template_id=d.name[len(fill):])
        yield from lazy_origins(self.tag)
        for name in sorted(os.listdir(self.tdir)) if os.path.isdir(self.tdir) else []:
            if name.endswith((".partial",)) or ".tmp-" in name:
                continue
            if name.startswith(FLAT_PREFIX):  # a flatten's thin: released once its process is gone
                if not _flat_owner_alive(name):
                    yield KernelObject("thin-template", name, None, detail="thin of a killed flatten")
                continue
            path = os.path.join(self.tdir, name)
            try:
                with open(path) as f:
                    words = f.read().split(maxsplit=1)
            except FileNotFoundError:
                continue
            if len(words) == 2 and not os.path.exists(words[1].strip()):
                yield KernelObject("thin-template", name, None, detail=f"thin {words[0]} of {words[1].strip()}")

    def release(self, obj: KernelObject, *, deadline_s: float = 5.0) -> None:
        if self.release_dm(obj, deadline_s=deadline_s) or release_lazy_origin(obj):
            return
        if obj.kind == "thin-template":
            path = os.path.join(self.tdir, obj.name)
            tid = _read_id(path)
            if tid is not None:
                self._delete_thin(tid)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def destroy_store(self) -> None:
        """Every template thin deleted, the pool removed, its files deleted (named block
        devices are left to their owner, with an empty pool on them)."""
        if self._pool_live():
            for d in dm.control().list_devices():
                if d.name.startswith(self.dm_prefix) and d.name != self.pool_name:
                    dm.control().remove(d.name, deadline_s=5.0, missing_ok=True)
            for name in os.listdir(self.tdir) if os.path.isdir(self.tdir) else []:
                with contextlib.suppress(CowdiskError):
                    tid = _read_id(os.path.join(self.tdir, name))
                    if tid is not None:
                        self._delete_thin(tid)
        dm.control().remove(self.pool_name, deadline_s=10.0, missing_ok=True)
        if self.on_files:
            _wait_loops_gone((self.data_file, self.meta_file))
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            shutil.rmtree(self.tdir, ignore_errors=True)


def _flat_owner_alive(name: str) -> bool:
    """Whether the process named in a flat entry (``flat-<pid>-<start>-<hex>``) still runs."""
    parts = name[len(FLAT_PREFIX):].split("-")
    return len(parts) == 3 and parts[0].isdigit() and procfs.process_alive(int(parts[0]), parts[1])


def _fill(src: str, dev: str, size: int, ctx: VolumeCtx) -> None:
    """Copy the template file's data segments into the fresh thin device (its holes stay
    unprovisioned and read as zeros)."""
    bs = 4 * MiB
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dfd = os.open(dev, os.O_WRONLY | os.O_CLOEXEC)
        try:
            done = 0
            for off, length in fs.data_segments(sfd, size):
                end = off + length
                while off < end:
                    n = min(bs, end - off)
                    data = os.pread(sfd, n, off)
                    if not data:
                        break
                    os.pwrite(dfd, data, off)
                    off += len(data)
                    done += len(data)
                    if ctx.progress:
                        ctx.progress(min(done, size), size)
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
