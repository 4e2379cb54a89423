"""dm-snapshot volumes: one shared read-only template loop, a sparse COW file per volume.

Table: ``0 <sectors> snapshot <template loop> <cow loop> P <chunk>`` (persistent).
Both loops are configured with autoclear and closed once the table holds them, so the
kernel frees them when the dm device goes, even if cowdisk is killed.

The I/O path (issue 15; bench/README.md "dm-snapshot chunk size and direct I/O" has
the measurements): chunks of 64 KiB (``P 128``) by default, since 4 KiB chunks split
every request into 4 KiB pieces and cap sequential I/O near 170 MB/s; both loops with
direct I/O where the backing filesystem allows it (the kernel falls back to buffered
I/O by itself otherwise), since buffered loops copy every request through the page
cache twice. Store options: ``chunk_kib`` (4..512, a power of two) and ``direct_io``
(``yes``/``no``). An existing COW keeps the chunk size in its header (the kernel reads
it from there), so changing the option affects new volumes only.

The COW file is sized with the persistent store's overhead (one metadata chunk per
256 data chunks, a header, and the next area that a full area needs), so a guest that
rewrites its whole disk never turns the snapshot Invalid
(docs/reference/dm-snapshot-cow-format.md section 2, "Capacity"). The file is sparse: the margin
costs nothing.
"""

from __future__ import annotations

import errno
import os
import time
from typing import Callable, ClassVar, Iterator, Mapping

from ..errors import InUse, InvalidArgument, KernelError
from ..kernel import dm, dm_status, fs, loop
from . import BackendEnv, KernelObject, Usage, VolumeCtx, check_options
from .dm_common import (DmVolumeBase, TemplateLoops, dm_available, hold_lazy_origin, lazy_origins, release_lazy_origin,
                        template_label)

COW = "cow.img"
CHUNK_SECTORS = 128
"""The default chunk: 64 KiB (``P 128``); was 4 KiB (``P 8``) before issue 15. 256 KiB
chunks were faster still in the lab's fio runs (1M read 0.34x vs 0.17x, 1M write 0.66x
vs 0.22x of a raw direct-I/O loop; a tie on 4k randread) but a fresh volume's COW holds two
whole chunks (the header and the first metadata area): 128 KiB at 64 KiB, 512 KiB at
256 KiB. Volumes are meant to cost kilobytes, so 256 KiB is the ``chunk_kib=256`` option
for stores whose guests stream, not the default. dm-thin, whose fresh volume costs no
data block, defaults to 256 KiB blocks."""
CHUNK = CHUNK_SECTORS * 512
EXCEPTIONS_PER_AREA = CHUNK // 16
OPTIONS = frozenset({"chunk_kib", "direct_io"})


def cow_size(template_bytes: int, chunk: int = CHUNK) -> int:
    """Bytes a COW of ``chunk``-byte chunks needs so that rewriting every chunk of the
    template still fits: header, one data chunk per template chunk, one metadata chunk per
    ``chunk/16`` exceptions, and the next (empty) area a full area makes the kernel add."""
    d = -(-template_bytes // chunk)
    areas = -(-d // (chunk // 16))
    return (1 + d + areas + 2) * chunk


def _chunk_option(env: BackendEnv) -> int:
    raw = env.options.get("chunk_kib")
    if raw is None:
        return CHUNK_SECTORS
    try:
        kib = int(str(raw))
    except ValueError:
        kib = 0
    if not (4 <= kib <= 512 and kib & (kib - 1) == 0):
        raise InvalidArgument(f"backend dm-snapshot: chunk_kib={raw!r}: use a power of two from 4 to 512",
                              op="open store", obj=env.root)
    return kib * 2


def cow_path(ctx: VolumeCtx) -> str:
    return os.path.join(ctx.data_dir, COW)


class DmSnapshotBackend(DmVolumeBase):
    name: ClassVar[str] = "dm-snapshot"
    larger_volumes: ClassVar[bool] = False
    """The snapshot target maps exactly its origin (the template loop): no larger volumes."""
    steps: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "create": ("cow_file", "template_loop", "cow_loop", "dm"),
        "attach": ("template_loop", "cow_loop", "dm"),
        "copy_data": ("copied",),  # with an attached source: still suspended there
    }

    @classmethod
    def available(cls, root: str) -> tuple[bool, str]:
        ok, reason = snapshot_supported()
        return ok, ("device-mapper with the snapshot target is available" if ok else f"dm-snapshot: {reason}")

    @classmethod
    def open(cls, env: BackendEnv) -> "DmSnapshotBackend":
        check_options(cls.name, env, OPTIONS)
        dio = str(env.options.get("direct_io", "yes"))
        if dio not in ("yes", "no"):
            raise InvalidArgument(f"backend dm-snapshot: direct_io={dio!r}: use yes or no", op="open store",
                                  obj=env.root)
        return cls(dm_prefix=env.dm_prefix, data_root=env.root, shared_loop_get=env.shared_loop_get,
                   shared_loop_set=env.shared_loop_set, chunk_sectors=_chunk_option(env), direct_io=dio == "yes",
                   tag=env.tag)

    def destroy_store(self) -> None:
        return None

    def __init__(self, *, dm_prefix: str, data_root: str,
                 shared_loop_get: Callable[[str], tuple[int, str] | None] = lambda tid: None,
                 shared_loop_set: Callable[[str, int, str], None] = lambda tid, n, d: None,
                 chunk_sectors: int = CHUNK_SECTORS, direct_io: bool = True, tag: str = "") -> None:
        self.dm_prefix = dm_prefix
        self.tag = tag
        self.chunk_sectors = chunk_sectors
        self.direct_io = direct_io
        self.data_root = os.path.abspath(data_root)
        self.template_loops = TemplateLoops(shared_loop_get, shared_loop_set)

    # -- the shared template loop ----------------------------------------------------

    def _hold_template_loop(self, ctx: VolumeCtx) -> tuple[int, str]:
        """An open fd on the template's shared loop (attached if needed) and its major:minor.

        Call with the template lock held; keep the fd until a dm table holds the loop. A
        lazy template's origin is a loop over its whole cache or its nbd device
        (``hold_lazy_origin``).
        """
        t = ctx.template
        if t.serve is not None:
            return hold_lazy_origin(ctx, self.template_loops, direct_io=self.direct_io)
        return self.template_loops.hold(t.id, t.path, template_label(ctx.tag, t.id), direct_io=self.direct_io)

    # -- lifecycle ---------------------------------------------------------------

    def create(self, ctx: VolumeCtx) -> str:
        fs.makedirs_mode(ctx.data_dir, 0o700)
        cow = cow_path(ctx)
        ctx.record("file", cow)
        fs.create_sparse(cow, cow_size(ctx.template.size, self.chunk_sectors * 512))
        ctx.step("cow_file")
        return self._activate(ctx)

    def attach(self, ctx: VolumeCtx) -> str:
        if not os.path.exists(cow_path(ctx)):
            raise KernelError("attach volume", cow_path(ctx), errno.ENOENT, detail="COW file is missing")
        return self._activate(ctx)

    def _activate(self, ctx: VolumeCtx) -> str:
        cow = cow_path(ctx)
        sectors = ctx.template.size // 512
        with ctx.template_lock():
            tfd, tdev = self._hold_template_loop(ctx)
            try:
                ctx.step("template_loop")
                cl = loop.attach(cow, autoclear=True, label=f"{ctx.tag}:v:{ctx.id}", direct_io=self.direct_io)
                try:
                    ctx.record("loop", str(cl.number))
                    ctx.step("cow_loop")
                    ctx.record("dm", ctx.dm_name)
                    table = [dm.Target(0, sectors, "snapshot", f"{tdev} {cl.devno} P {self.chunk_sectors}")]
                    info = dm.control().create_device(ctx.dm_name, table)
                finally:
                    cl.close()  # the dm table holds it now (or, on failure, autoclear frees it)
            finally:
                os.close(tfd)
        ctx.forget("loop", str(cl.number))
        ctx.step("dm")
        return dm.device_node(info)

    def detach(self, ctx: VolumeCtx, *, deadline_s: float = 5.0) -> None:
        cow_loops = self._cow_loops(ctx)
        dm.control().remove(ctx.dm_name, deadline_s=deadline_s, missing_ok=True)
        ctx.forget("dm", ctx.dm_name)
        self._wait_cow_released(ctx, deadline_s, cow_loops)

    def _cow_loops(self, ctx: VolumeCtx) -> list[int] | None:
        """The loops under this volume's dm device that hold its COW (from sysfs slaves),
        or None when the device is gone (then its autoclear COW loop is gone too: only the
        dm table or a process that made it, now dead, ever held it)."""
        try:
            minor = dm.control().info(ctx.dm_name).minor
            slaves = os.listdir(f"/sys/block/dm-{minor}/slaves")
        except FileNotFoundError:
            return None
        except KernelError as e:
            if dm.is_gone(e):
                return None
            raise
        cow = cow_path(ctx)
        out = []
        for s in slaves:
            if s.startswith("loop") and s[4:].isdigit():
                li = loop.info(int(s[4:]))
                if li is not None and li.backing_file.removesuffix(" (deleted)") == cow:
                    out.append(li.number)
        return out

    def _wait_cow_released(self, ctx: VolumeCtx, deadline_s: float, candidates: list[int] | None) -> None:
        """Wait until the COW loops under the removed dm device let go (autoclear).

        Looks only at ``candidates``, so removing one volume costs the same however many
        exist. None (the dm device was already gone, a second pass or recovery) looks at
        nothing: an autoclear COW loop outlives its dm device only while someone else opens
        it, and recovery's scan (every loop, once per recovery) releases such a leftover.
        """
        if not candidates:
            return
        cow = cow_path(ctx)
        end = time.monotonic() + deadline_s
        while True:
            bound = [n for n in candidates
                     if (li := loop.info(n)) is not None and li.backing_file.removesuffix(" (deleted)") == cow]
            if not bound:
                return
            if time.monotonic() > end:
                raise InUse(f"release COW loop of volume {ctx.id}: /dev/loop{bound[0]} still holds {cow}",
                            op="detach volume", obj=ctx.id,
                            hint=f"something still opens /dev/loop{bound[0]}; holders: {loop.holders(bound[0])}")
            time.sleep(0.005)

    def destroy(self, ctx: VolumeCtx) -> None:
        """Delete the COW file. Called only after :meth:`detach` saw its loop released."""
        cow = cow_path(ctx)
        try:
            os.unlink(cow)
        except FileNotFoundError:
            pass
        ctx.forget("file", cow)

    def copy_data(self, src: VolumeCtx, dst: VolumeCtx, *, src_attached: bool,
                  like: VolumeCtx | None = None) -> None:
        """The source's COW file copied (sparse), an attached source suspended for the copy;
        with ``like``, ``like``'s COW file (not attached: nothing suspended)."""
        fs.makedirs_mode(dst.data_dir, 0o700)
        dst.record("file", cow_path(dst))
        if like is not None:
            fs.sparse_copy(cow_path(like), cow_path(dst), progress=dst.progress)
            dst.step("copied")
        elif src_attached:
            dm.control().suspend(src.dm_name)
            try:
                fs.sparse_copy(cow_path(src), cow_path(dst), progress=dst.progress)
                dst.step("copied")  # a kill here leaves the source suspended: recovery thaws it
            finally:
                dm.control().resume(src.dm_name)
        else:
            fs.sparse_copy(cow_path(src), cow_path(dst), progress=dst.progress)
            dst.step("copied")

    def flatten(self, ctx: VolumeCtx, out_path: str, *, attached: bool) -> None:
        if attached:
            self.copy_attached(ctx, out_path)
        elif ctx.template.serve is not None:
            from ..errors import Unsupported

            raise Unsupported(f"flatten volume {ctx.id}: its template {ctx.template.id} is lazy: a checkpointed "
                              "volume over it is flattened offline from the template's file, which this host "
                              "does not have", op="flatten volume", obj=ctx.id,
                              hint=f"`cowdisk volume restore {ctx.id}`, then flatten it (an attached volume is "
                                   "copied through its device)")
        else:
            from ..cowformat import flatten as offline_flatten

            offline_flatten(ctx.template.path, cow_path(ctx), out_path, progress=ctx.progress)

    def usage(self, ctx: VolumeCtx, *, attached: bool) -> Usage:
        cow = cow_path(ctx)
        st = os.stat(cow)
        used = total = None
        health = "ok"
        if attached:
            lines = dm.control().status(ctx.dm_name)
            if lines:
                s = dm_status.parse_snapshot_status(lines[0].text)
                if not s.valid or s.allocated_sectors is None or s.total_sectors is None:
                    health = s.state
                else:
                    used, total = s.allocated_sectors * 512, s.total_sectors * 512
        return Usage(disk_bytes=st.st_blocks * 512, apparent_bytes=st.st_size,
                     cow_used_bytes=used, cow_total_bytes=total, health=health)

    # -- recovery ------------------------------------------------------------------

    def scan(self) -> Iterator[KernelObject]:
        """dm devices with this store's prefix, and loops backed by files of this store."""
        if dm_available():
            for d in dm.control().list_devices():
                if d.name.startswith(self.dm_prefix):
                    yield KernelObject("dm", d.name, d.name[len(self.dm_prefix):])
        yield from lazy_origins(self.tag)
        root = self.data_root + os.sep
        for li in loop.list_loops():
            bf = li.backing_file.removesuffix(" (deleted)")
            if bf.startswith(root):
                rel = bf[len(root):].split(os.sep)
                vid = rel[1] if len(rel) >= 3 and rel[0] == "volumes" else None
                yield KernelObject("loop", str(li.number), vid, detail=bf)

    def release(self, obj: KernelObject, *, deadline_s: float = 5.0) -> None:
        if self.release_dm(obj, deadline_s=deadline_s) or release_lazy_origin(obj):
            return
        if obj.kind == "loop":
            loop.detach(int(obj.name), missing_ok=True)


def snapshot_supported() -> tuple[bool, str]:
    """Whether dm-snapshot volumes can be made here, and if not, why."""
    return dm.target_available("snapshot")
