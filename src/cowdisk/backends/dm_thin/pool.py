"""The thin pool of a dm-thin store and its thin ids: options, the pool's devices (loops over
sparse files or named block devices), its table, metadata checks (thin_check/thin_repair),
usage and space, growth (at operations, and by the space monitor), and the thin ids
(allocated, reserved ahead for a fork, deleted)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ...errors import CowdiskError, InvalidArgument, KernelError
from ...kernel import blk, dm, dm_status, fs, loop
from ...locks import FileLock
from .. import BackendEnv, Space, SpaceEvent, VolumeCtx

log = logging.getLogger("cowdisk.backends.dm_thin")

GiB = 1 << 30
MiB = 1 << 20
THIN_ID_FILE = "thin"
MAX_THIN_ID = (1 << 24) - 1
OPTIONS = frozenset({"data_dev", "metadata_dev", "data_size", "metadata_size", "block_kib", "grow_at_pct",
                     "discard_on_remove", "no_space", "max_data_size", "no_space_timeout"})
FLAT_PREFIX = "flat-"
"""``thin/templates/flat-<pid>-<start>-<hex>``: the thin of a flatten in progress (its
process named, so recovery releases it only once that process is gone)."""
DEFAULTS = {"data_size": 8 * GiB, "metadata_size": 256 * MiB, "block_kib": 256, "grow_at_pct": 80,
            "max_data_size": 0, "no_space_timeout": 30}
"""256 KiB blocks by default (64 KiB before): in two lab runs of bench/dm_paths.py they beat
64 KiB on every fio column (1M read 0.48x vs 0.14x, 1M write 0.58x vs 0.24x, 4k randwrite
0.40x vs 0.23x of a raw direct-I/O loop); the price is that a guest's first small write
to a shared block copies 256 KiB. A pool keeps the block size it was made with (read from
its table or its metadata's superblock), whatever the default is later."""

THIN_SB_MAGIC = 27022010
"""The thin-pool metadata superblock's magic (drivers/md/dm-thin-metadata.c)."""


@dataclass(frozen=True)
class PoolUsage:
    """The pool's fill: data in pool blocks, metadata in 4 KiB blocks (from its status)."""

    mode: str
    needs_check: bool
    data_used: int
    data_total: int
    meta_used: int
    meta_total: int
    block_bytes: int

    @property
    def data_pct(self) -> float:
        return 100.0 * self.data_used / self.data_total if self.data_total else 0.0

    @property
    def meta_pct(self) -> float:
        return 100.0 * self.meta_used / self.meta_total if self.meta_total else 0.0


def thin_supported() -> tuple[bool, str]:
    """Whether dm-thin volumes can be made here, and if not, why."""
    return dm.target_available("thin-pool")


def _int_option(env: BackendEnv, key: str, lo: int, hi: int) -> int:
    raw = env.options.get(key)
    if raw is None:
        return int(DEFAULTS[key])
    try:
        v = int(str(raw))
    except ValueError:
        v = lo - 1
    if not lo <= v <= hi:
        raise InvalidArgument(f"backend dm-thin: option {key}={raw!r} is not an integer in {lo}..{hi}",
                              op="open store", obj=env.root)
    return v


ID_BLOCK = 8
"""Thin ids a process reserves at once for its next new thins (see DmThinBackend._take_id)."""


def _write_durable(path: str, text: str) -> None:
    """Write ``path`` through a temporary name, fsync it and its directory."""
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _superblock_block_sectors(meta: str) -> int | None:
    """The data block size (in 512-byte sectors) recorded in the thin-pool metadata
    superblock at the start of ``meta``, or None when it holds none (never formatted).
    ``struct thin_disk_superblock``: ``magic`` (le64) at byte 32, ``data_block_size``
    (le32, sectors) at byte 336."""
    try:
        with open(meta, "rb") as f:
            sb = f.read(512)
    except FileNotFoundError:
        return None
    if len(sb) < 340 or int.from_bytes(sb[32:40], "little") != THIN_SB_MAGIC:
        return None
    return int.from_bytes(sb[336:340], "little") or None


def _never_formatted(meta: str) -> bool:
    """No metadata file, or one whose superblock is still all zeros (a store killed between
    making the files and the pool's first table load): the kernel formats it."""
    try:
        with open(meta, "rb") as f:
            return f.read(4096).count(0) == 4096
    except FileNotFoundError:
        return True


def _read_id(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except FileNotFoundError:
        return None
    except (ValueError, IndexError):
        raise KernelError("read thin id", path, errno.EBADMSG, detail="not a thin id") from None


class ThinPool:
    """The pool part of :class:`~cowdisk.backends.dm_thin.DmThinBackend` (its base): the
    store's options, the pool device and the thin ids."""

    def __init__(self, env: BackendEnv) -> None:
        self.root = os.path.abspath(env.root)
        self.data_root = self.root
        self.dm_prefix = env.dm_prefix
        self.tag = env.tag
        self.dir = os.path.join(self.root, "thin")
        self.tdir = os.path.join(self.dir, "templates")
        self.pool_name = env.dm_prefix + ".pool"
        self.data_dev = env.options.get("data_dev") or None
        self.meta_dev = env.options.get("metadata_dev") or None
        if (self.data_dev is None) != (self.meta_dev is None):
            raise InvalidArgument("backend dm-thin: name both data_dev and metadata_dev, or neither",
                                  op="open store", obj=env.root)
        self.data_size = _int_option(env, "data_size", 16 * MiB, 1 << 50)
        self.meta_size = _int_option(env, "metadata_size", 2 * MiB, 16 * GiB)
        kib = _int_option(env, "block_kib", 64, 1 << 20)
        if kib % 64:
            raise InvalidArgument(f"backend dm-thin: block_kib={kib} is not a multiple of 64", op="open store",
                                  obj=env.root)
        self.block_sectors = kib * 2
        self.block_explicit = "block_kib" in env.options
        """False: the default, which an existing pool's own block size overrides (open_pool)."""
        self.grow_at = _int_option(env, "grow_at_pct", 1, 99)
        self.discard_on_remove = env.options.get("discard_on_remove", "yes") not in ("no", "false", "0")
        self.no_space = env.options.get("no_space", "queue")
        if self.no_space not in ("queue", "error"):
            raise InvalidArgument(f"backend dm-thin: no_space={self.no_space!r}: use queue or error",
                                  op="open store", obj=env.root)
        self.max_data = _int_option(env, "max_data_size", 0, 1 << 50)
        """The most the data file may grow to (0: as far as its filesystem has room)."""
        self.no_space_timeout = _int_option(env, "no_space_timeout", 0, 3600)
        """Seconds writes to a full pool that cannot grow wait before they fail (the monitor)."""
        self.checked: str | None = None
        """What the last open found and did about the metadata (thin_check/thin_repair)."""
        self._reserved: list[int] = []
        """Thin ids reserved ahead by :meth:`prepare_copies`, taken by the next new thins."""
        self._reserved_lock = threading.Lock()
        self.cannot_grow = ""
        """Why the last growth asked for could not happen ("" when it could)."""
        self.failing_io = False
        """The monitor switched the pool to error_if_no_space (its table differs from the options)."""

    # -- the pool --------------------------------------------------------------------

    @property
    def on_files(self) -> bool:
        return self.data_dev is None

    @property
    def data_file(self) -> str:
        return os.path.join(self.dir, "data.img")

    @property
    def meta_file(self) -> str:
        return os.path.join(self.dir, "meta.img")

    def _pool_lock(self) -> FileLock:
        return FileLock(os.path.join(self.dir, "pool.lock"), timeout=60, what="thin pool")

    def open_pool(self) -> None:
        """The pool active: reused when it is, else made (after a metadata check when its
        metadata existed before: an unclean stop). Idempotent; safe from several processes."""
        fs.makedirs_mode(self.tdir, 0o700)
        if self._pool_live():
            self._use_block_size(int(dm.control().table(self.pool_name)[0].text.split()[2]), "its table")
            dm.resume_if_suspended(self.pool_name)  # a kill inside grow's suspend/resume
            return
        with self._pool_lock():
            if self._pool_live():
                self._use_block_size(int(dm.control().table(self.pool_name)[0].text.split()[2]), "its table")
                return
            made = _superblock_block_sectors(self.meta_file if self.on_files else str(self.meta_dev))
            if made is not None:
                self._use_block_size(made, "its metadata")
            dm.control().remove(self.pool_name, deadline_s=2.0, missing_ok=True)  # a tableless leftover
            if self.on_files:
                fresh = _never_formatted(self.meta_file)
                if fresh:
                    fs.create_sparse(self.data_file, self.data_size, exclusive=False)
                    fs.create_sparse(self.meta_file, self.meta_size, exclusive=False)
                else:
                    self._check_metadata(self.meta_file)
                data = loop.attach(self.data_file, autoclear=True, direct_io=True, label=f"{self.pool_name}:data")
                meta = loop.attach(self.meta_file, autoclear=True, label=f"{self.pool_name}:meta")
                try:
                    self._make_pool(meta.devno, data.devno, blk.size_sectors(data.path))
                finally:  # the pool's table holds them now (or autoclear frees them)
                    data.close()
                    meta.close()
            else:
                assert self.meta_dev is not None and self.data_dev is not None
                self._make_pool(blk.devno_str(self.meta_dev), blk.devno_str(self.data_dev),
                                blk.size_sectors(self.data_dev))

    def _use_block_size(self, sectors: int, source: str) -> None:
        """An existing pool keeps its block size: taken over when the store did not name
        one (a pool made under an older default), refused when it named another."""
        if sectors == self.block_sectors:
            return
        if self.block_explicit:
            raise InvalidArgument(f"open store {self.root}: its thin pool {self.pool_name} has "
                                  f"{sectors // 2} KiB blocks ({source}), not block_kib={self.block_sectors // 2}",
                                  op="open store", obj=self.root,
                                  hint="a pool's block size is fixed when it is made; open the store without "
                                       "block_kib or with the pool's")
        log.info("thin pool %s: %d KiB blocks (%s), not the default %d KiB", self.pool_name, sectors // 2,
                 source, self.block_sectors // 2)
        self.block_sectors = sectors

    def _pool_live(self) -> bool:
        try:
            return dm.control().info(self.pool_name).active_table
        except KernelError as e:
            if dm.is_gone(e):
                return False
            raise

    def _pool_table(self, meta: str, data: str, sectors: int, *, error_if_no_space: bool = False) -> list[dm.Target]:
        sectors -= sectors % self.block_sectors
        low_water = max(1, (sectors // self.block_sectors) * (100 - self.grow_at) // 100)
        features = ["error_if_no_space"] if self.no_space == "error" or error_if_no_space else []
        args = f"{meta} {data} {self.block_sectors} {low_water} {len(features)} {' '.join(features)}".strip()
        return [dm.Target(0, sectors, "thin-pool", args)]

    def _make_pool(self, meta: str, data: str, sectors: int) -> None:
        dm.control().create_device(self.pool_name, self._pool_table(meta, data, sectors))
        log.info("thin pool %s: active over %s (data) and %s (metadata)", self.pool_name, data, meta)

    def _check_metadata(self, meta_path: str) -> None:
        """thin_check the metadata of a pool that was not active (unclean stop or reboot);
        on failure thin_repair into a new file and keep the old one as ``meta.img.bad-<time>``."""
        if shutil.which("thin_check") is None:
            self.checked = "not checked: thin_check is missing (install thin-provisioning-tools)"
            log.warning("thin pool %s: %s", self.pool_name, self.checked)
            return
        r = subprocess.run(["thin_check", "-q", meta_path], capture_output=True, text=True)
        if r.returncode == 0:
            self.checked = "thin_check: clean"
            return
        log.warning("thin pool %s: thin_check failed (%s); repairing", self.pool_name,
                    (r.stderr or r.stdout).strip())
        new = meta_path + ".repair"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(new)
        fs.create_sparse(new, os.path.getsize(meta_path))
        rr = subprocess.run(["thin_repair", "-i", meta_path, "-o", new], capture_output=True, text=True)
        if rr.returncode != 0:
            os.unlink(new)
            raise KernelError("repair thin metadata", meta_path, errno.EIO,
                              detail=f"thin_check: {(r.stderr or r.stdout).strip()}; "
                                     f"thin_repair: {(rr.stderr or rr.stdout).strip()}",
                              hint="the metadata is kept as it is; see docs/dm-thin.md, 'Repair'")
        os.rename(meta_path, f"{meta_path}.bad-{int(time.time())}")
        os.rename(new, meta_path)
        self.checked = f"thin_check failed ({(r.stderr or r.stdout).strip()}); repaired with thin_repair"
        log.warning("thin pool %s: %s", self.pool_name, self.checked)

    def pool_devno(self) -> str:
        i = dm.control().info(self.pool_name)
        return f"{i.major}:{i.minor}"

    def pool_usage(self) -> PoolUsage:
        """Data and metadata fill, mode and needs_check (status without a metadata commit)."""
        lines = dm.control().status(self.pool_name, noflush=True)
        s = dm_status.parse_thin_pool_status(lines[0].text)
        if s.state != "ok":
            return PoolUsage(s.state, True, 0, 0, 0, 0, self.block_sectors * 512)
        assert s.used_data_blocks is not None and s.total_data_blocks is not None
        assert s.used_metadata_blocks is not None and s.total_metadata_blocks is not None
        return PoolUsage(s.mode or "?", s.needs_check, s.used_data_blocks, s.total_data_blocks,
                         s.used_metadata_blocks, s.total_metadata_blocks, self.block_sectors * 512)

    def space(self) -> list[Space]:
        """The pool's data and metadata fill, with its mode (``rw``, ``out_of_data_space``,
        ``read_only``, ``fail``; ``needs_check`` when the kernel flagged the metadata)."""
        u = self.pool_usage()
        state = "ok" if u.mode == "rw" and not u.needs_check else \
            (u.mode + (", needs_check" if u.needs_check else ""))
        grow = f"grown at {self.grow_at}%" if self.on_files else f"on {self.data_dev}: grow it by hand"
        return [Space("thin pool data", u.data_used * u.block_bytes, u.data_total * u.block_bytes, state,
                      f"{self.pool_name}, {u.block_bytes // 1024} KiB blocks, {grow}", grows=self.on_files),
                Space("thin pool metadata", u.meta_used * 4096, u.meta_total * 4096, state,
                      f"{self.pool_name}, {grow}", grows=self.on_files)]

    def ensure_room(self) -> PoolUsage:
        """Grow the pool's files (and reload its table) when data or metadata passed
        ``grow_at_pct``; refuse a pool that is read-only, failed or out of space."""
        u = self.pool_usage()
        if u.mode not in ("rw", "out_of_data_space"):
            raise KernelError("use thin pool", self.pool_name, errno.EIO,
                              detail=f"pool is {u.mode}{' and needs a check' if u.needs_check else ''}",
                              hint="see docs/dm-thin.md, 'When the pool fills or fails'")
        if not self.on_files:
            if u.data_pct >= self.grow_at or u.mode == "out_of_data_space":
                self.cannot_grow = f"the pool is on {self.data_dev}: grow that device and reload"
                log.warning("thin pool %s: data %.0f%% full on %s; grow that device and reload",
                            self.pool_name, u.data_pct, self.data_dev)
            return u
        if u.data_pct >= self.grow_at or u.meta_pct >= self.grow_at or u.mode == "out_of_data_space":
            with self._pool_lock():
                u = self.pool_usage()
                if u.data_pct >= self.grow_at or u.mode == "out_of_data_space":
                    want, self.cannot_grow = self._data_growth(u)
                    if want:
                        self.grow(data_bytes=want)
                    else:
                        log.warning("thin pool %s: data %.0f%% full (%s), cannot grow: %s", self.pool_name,
                                    u.data_pct, u.mode, self.cannot_grow)
                if u.meta_pct >= self.grow_at:
                    self.grow(meta_bytes=min(16 * GiB, 2 * u.meta_total * 4096))
                u = self.pool_usage()
        return u

    def _data_growth(self, u: PoolUsage) -> tuple[int, str]:
        """The size to grow the data file to (twice its size, at most ``max_data_size`` and
        what its filesystem can hold, less 1% of that filesystem), or 0 and why not."""
        cur = os.path.getsize(self.data_file)
        want = 2 * max(cur, u.data_total * u.block_bytes)
        capped = bool(self.max_data) and want > self.max_data
        if capped:
            want = self.max_data
        st = os.statvfs(self.dir)
        free = st.f_bavail * st.f_frsize
        room = os.stat(self.data_file).st_blocks * 512 + free - st.f_blocks * st.f_frsize // 100
        short = room < want
        want = min(want, room)
        want -= want % (self.block_sectors * 512)
        if want > cur:
            return want, ""
        if short:
            return 0, f"the filesystem of {self.data_file} has {free} bytes free"
        return 0, f"max_data_size {self.max_data} reached"

    def grow(self, *, data_bytes: int = 0, meta_bytes: int = 0) -> None:
        """Extend the pool's files to these sizes and reload its table (files only).
        The pool is suspended for the reload: I/O of the thin devices waits, none fails."""
        meta_n, data_n = self._pool_loops()
        if meta_bytes > os.path.getsize(self.meta_file):
            os.truncate(self.meta_file, meta_bytes)
            loop.set_capacity(meta_n)
        if data_bytes > os.path.getsize(self.data_file):
            os.truncate(self.data_file, data_bytes)
            loop.set_capacity(data_n)
        self._reload(error_if_no_space=False)
        log.info("thin pool %s: grown to %d bytes of data, %d of metadata", self.pool_name,
                 os.path.getsize(self.data_file), os.path.getsize(self.meta_file))

    def _reload(self, *, error_if_no_space: bool) -> None:
        """Load the pool's table again at its devices' sizes now, with or without
        ``error_if_no_space`` (suspend, resume: thin I/O waits for the instant of the swap;
        writes held for space are then retried, or failed with it)."""
        meta_n, data_n = self._pool_loops() if self.on_files else (-1, -1)
        if self.on_files:
            meta, data, sectors = (_devno_of_loop(meta_n), _devno_of_loop(data_n),
                                   blk.size_sectors(f"/dev/loop{data_n}"))
        else:
            assert self.meta_dev is not None and self.data_dev is not None
            meta, data, sectors = (blk.devno_str(self.meta_dev), blk.devno_str(self.data_dev),
                                   blk.size_sectors(self.data_dev))
        ctl = dm.control()
        ctl.load_table(self.pool_name, self._pool_table(meta, data, sectors, error_if_no_space=error_if_no_space))
        ctl.suspend(self.pool_name)
        ctl.resume(self.pool_name)
        self.failing_io = error_if_no_space and self.no_space != "error"

    def _attached(self) -> tuple[str, ...]:
        """The volumes with a thin device active in this pool (their dm names, prefix off)."""
        skip = (self.pool_name, f"{self.dm_prefix}.")
        return tuple(sorted(d.name[len(self.dm_prefix):] for d in dm.control().list_devices()
                            if d.name.startswith(self.dm_prefix) and not d.name.startswith(skip)))

    def watch_space(self, notify: Callable[[SpaceEvent], None], stop: threading.Event) -> None:
        """The pool's monitor (the daemon runs it in a thread): wait on the pool's dm event
        (DM_DEV_WAIT: the kernel raises one past the low-water mark, which is
        ``grow_at_pct``, and at every mode change), then grow the pool as the operations do
        (:meth:`ensure_room`). When it is out of data space and cannot grow (its
        ``max_data_size``, or its filesystem full), writes wait at most ``no_space_timeout``
        seconds for space (a volume removed, discards) and then the pool's table is loaded
        with ``error_if_no_space``: every waiting and later write fails (ENOSPC/EIO) instead
        of hanging. Space again (it grew, or blocks were freed) loads the usual table back.
        Ends when ``stop`` is set (at the next event) or the pool is removed."""
        ctl = dm.control()
        area = "thin pool data"
        full_since: float | None = None
        timer: threading.Timer | None = None

        def event(name: str, u: PoolUsage, reason: str = "") -> None:
            try:
                vols = self._attached()
            except KernelError:
                vols = ()
            notify(SpaceEvent(area, self.pool_name, name, u.data_used * u.block_bytes, u.data_total * u.block_bytes, reason, vols))

        def full(u: PoolUsage) -> bool:
            # a table load puts the pool in rw mode even with no free block (and the next
            # write that needs one back in out_of_data_space): full is no free block as well
            return u.mode == "out_of_data_space" or (u.mode == "rw" and u.data_used >= u.data_total > 0)

        def fail_io() -> None:
            try:
                with self._pool_lock():
                    u = self.pool_usage()
                    if not full(u) or self.failing_io:
                        return
                    self._reload(error_if_no_space=True)
                log.warning("thin pool %s: out of data space for %d s and cannot grow (%s): writes fail now",
                            self.pool_name, self.no_space_timeout, self.cannot_grow)
                event("failing_io", u, self.cannot_grow)
            except CowdiskError as e:
                log.error("thin pool %s: switching to failing writes: %s", self.pool_name, e)

        try:
            ev = ctl.info(self.pool_name).event_nr
            while not stop.is_set():
                try:
                    before = self.pool_usage()
                    u = self.ensure_room()
                except CowdiskError as e:  # a pool read-only or failed: said, and waited on
                    log.error("thin pool %s: %s", self.pool_name, e)
                    u = self.pool_usage()
                    before = u
                if u.data_total > before.data_total:
                    event("grown", u)
                if full(u) and full_since is None:
                    full_since = time.monotonic()
                    log.warning("thin pool %s: out of data space, cannot grow (%s): writes wait up to %d s",
                                self.pool_name, self.cannot_grow, self.no_space_timeout)
                    event("full", u, self.cannot_grow)
                    timer = threading.Timer(self.no_space_timeout, fail_io)
                    timer.daemon = True
                    timer.start()
                elif not full(u) and full_since is not None:
                    full_since = None
                    if timer is not None:
                        timer.cancel()
                    if self.failing_io:
                        with self._pool_lock():
                            self._reload(error_if_no_space=False)
                    log.info("thin pool %s: space again (%s): writes go through", self.pool_name, u.mode)
                    event("ok", u)
                ev = ctl.wait_event(self.pool_name, ev).event_nr
        except KernelError as e:
            if not dm.is_gone(e):
                raise
            log.info("thin pool %s: removed; its monitor ends", self.pool_name)
            notify(SpaceEvent(area, self.pool_name, "gone", 0, 0))
        finally:
            if timer is not None:
                timer.cancel()

    def _pool_loops(self) -> tuple[int, int]:
        """The loop numbers under the pool (metadata, data), from its live table."""
        words = dm.control().table(self.pool_name)[0].text.split()
        out = []
        for devno in words[:2]:
            name = os.path.basename(os.path.realpath(f"/sys/dev/block/{devno}"))
            if not name.startswith("loop"):
                raise KernelError("grow thin pool", self.pool_name, errno.ENOTBLK,
                                  detail=f"{devno} ({name}) is not a loop of this store")
            out.append(int(name[4:]))
        return out[0], out[1]

    def _message(self, text: str) -> str | None:
        return dm.control().message(self.pool_name, 0, text)

    def prepare_copies(self, src: VolumeCtx, n: int) -> None:
        """Reserve the thin ids of ``n`` copies with one pool message: every pool message
        commits the pool's metadata (a write and a flush), so a fork into N allocating its
        ids one by one paid N commits more. Ids reserved and not used are skipped for good
        (the pool's transaction id only grows); nothing else is made."""
        if n > 1:
            last = self._alloc_id(n)
            with self._reserved_lock:
                self._reserved.extend(range(last - n + 1, last + 1))

    def _take_id(self) -> int:
        """A reserved thin id (:meth:`prepare_copies`), or one of a block of ``ID_BLOCK``
        reserved now: the pool takes its messages one at a time and each commits its
        metadata, so creates at once in one process would otherwise each wait for a
        ``set_transaction_id`` commit of their own (ids left over are skipped for good)."""
        with self._reserved_lock:
            if not self._reserved:
                last = self._alloc_id(ID_BLOCK)
                self._reserved.extend(range(last - ID_BLOCK + 1, last + 1))
            return self._reserved.pop(0)

    def _alloc_id(self, n: int = 1) -> int:
        """``n`` thin ids no one had, the last returned (the others are the ``n - 1`` before
        it): the pool's transaction id, advanced by compare-and-swap."""
        for _ in range(1000):
            s = dm_status.parse_thin_pool_status(dm.control().status(self.pool_name, noflush=True)[0].text)
            if s.transaction_id is None:
                raise KernelError("allocate thin id", self.pool_name, errno.EIO, detail=f"pool is {s.state}")
            new = s.transaction_id + n
            if new > MAX_THIN_ID:
                raise KernelError("allocate thin id", self.pool_name, errno.ENOSPC,
                                  detail=f"all {MAX_THIN_ID} thin ids of this store were used")
            try:
                self._message(f"set_transaction_id {s.transaction_id} {new}")
                return new
            except KernelError as e:
                if e.errno != errno.EINVAL:  # EINVAL: another process advanced it first
                    raise
        raise KernelError("allocate thin id", self.pool_name, errno.EAGAIN, detail="lost the race 1000 times")

    def _delete_thin(self, tid: int) -> None:
        """``delete`` a thin id; already gone is fine."""
        try:
            self._message(f"delete {tid}")
        except KernelError as e:
            if e.errno not in (errno.ENODATA, errno.ENOENT):
                raise

    def _thin_table(self, tid: int, size: int, origin: str | None = None) -> list[dm.Target]:
        """Thin ``tid`` of ``size`` bytes; ``origin``: its external origin's major:minor (a
        lazy template's nbd device: blocks the thin has not written are read from it)."""
        return [dm.Target(0, size // 512, "thin", f"{self.pool_devno()} {tid}" + (f" {origin}" if origin else ""))]


def _devno_of_loop(n: int) -> str:
    with open(f"/sys/block/loop{n}/dev") as f:
        return f.read().strip()


def _wait_loops_gone(paths: tuple[str, ...], deadline_s: float = 5.0) -> None:
    """The pool's autoclear loops are released when its device goes; wait for that
    (only those two files' loops are looked at, by their sysfs backing_file)."""
    end = time.monotonic() + deadline_s
    while True:
        left = [li.number for li in loop.list_loops() if li.backing_file.removesuffix(" (deleted)") in paths]
        if not left or time.monotonic() > end:
            return
        time.sleep(0.01)
