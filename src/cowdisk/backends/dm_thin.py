"""dm-thin volumes: one thin-pool per store, a thin snapshot per volume, no loop per volume.

The pool (``<dm prefix>.pool``) sits on a data and a metadata device: by default two
loops over sparse files the store manages (``<root>/thin/data.img``, ``meta.img``;
two loops whatever the number of volumes), or block devices the user names with the
store options ``data_dev`` and ``metadata_dev`` (an LVM logical volume, a partition).

* A **template** is a thin device filled once from the template file (only its data
  segments: unprovisioned blocks read as zeros) and then deactivated. Its thin id is
  kept in ``<root>/thin/templates/<template id>`` (written only once the fill is
  complete; ``.partial`` while it runs, so a killed fill is deleted and redone).
* A **volume** is ``create_snap`` of its template's thin id: no data copied. Its thin
  id is kept in ``volumes/<id>/thin`` (written and fsynced before the snapshot exists,
  so a kill at any instant leaves the id named). Checkpoint removes the dm device and
  keeps the thin; restore in place activates it again; restore as a new id and fork
  are ``create_snap`` of the source (suspended for that instant when attached).
* Thin ids come from the pool's own transaction id (``set_transaction_id t t+1``, a
  compare-and-swap the kernel commits in the pool's metadata), so they are unique
  across processes and never reused; no file or lock is needed to allocate one.
* Remove discards the whole thin device before ``delete`` (option ``discard_on_remove``,
  on by default) so the blocks it alone held go back to the pool *and*, through
  discard passdown and the loop's hole punching, to the host's filesystem
  (containerd #5691: without it, the space never comes back to the host).
* The pool grows before it fills: each create, fork and restore checks the pool's data
  and metadata use, and at ``grow_at_pct`` (80 by default) extends the file and reloads
  the pool's table (files only; named block devices are grown by their owner).
* After an unclean stop (the pool not active while its files exist: a reboot or a crash
  of the host) the metadata is checked with ``thin_check`` before the pool is made
  again, and repaired with ``thin_repair`` into a new file when the check fails.

See docs/dm-thin.md for the numbers behind the defaults and what happens when the pool
fills.
"""

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
import threading
import time
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator, Mapping

from ..errors import CowdiskError, InvalidArgument, KernelError, StateError
from ..kernel import blk, dm, dm_status, fs, loop, procfs
from ..progress import Progress
from ..locks import FileLock
from . import (BackendEnv, HoldsTemplates, KernelObject, OwnSpace, PreparesCopies, Space, SpaceEvent, Usage, VolumeCtx,
               WatchesSpace, check_options)
from .dm_common import DmVolumeBase, copy_device

log = logging.getLogger(__name__)

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


class DmThinBackend(DmVolumeBase, PreparesCopies, OwnSpace, WatchesSpace, HoldsTemplates):
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
        self.root = os.path.abspath(env.root)
        self.data_root = self.root
        self.dm_prefix = env.dm_prefix
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

    def _thin_table(self, tid: int, size: int) -> list[dm.Target]:
        return [dm.Target(0, size // 512, "thin", f"{self.pool_devno()} {tid}")]

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
        self.ensure_room()
        origin = self._template_thin(ctx)
        ctx.step("template")
        tid = self._new_thin(ctx)
        self._message(f"create_snap {tid} {origin}")
        ctx.step("thin")
        return self._activate(ctx, tid)

    def attach(self, ctx: VolumeCtx) -> str:
        tid = _read_id(self._id_path(ctx))
        if tid is None:
            raise KernelError("attach volume", self._id_path(ctx), errno.ENOENT, detail="the thin id file is missing")
        self.ensure_room()
        return self._activate(ctx, tid)

    def _activate(self, ctx: VolumeCtx, tid: int) -> str:
        ctx.record("dm", ctx.dm_name)
        info = dm.control().create_device(ctx.dm_name, self._thin_table(tid, ctx.volume_size))
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
        info = dm.control().create_device(ctx.dm_name, self._thin_table(tid, ctx.volume_size), readonly=True)
        try:
            copy_device(dm.device_node(info), out_path, ctx.volume_size, ctx.progress)
        finally:
            dm.control().remove(ctx.dm_name, deadline_s=10.0, missing_ok=True)
            ctx.forget("dm", ctx.dm_name)

    # -- templates held in the pool (flatten without copying) ---------------------------------

    def flatten_held(self, ctx: VolumeCtx, out: str, *, attached: bool) -> str:
        """Make the volume's current contents a template without copying: a thin snapshot of
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
        if self.release_dm(obj, deadline_s=deadline_s):
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
