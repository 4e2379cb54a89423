"""The template cache itself: entries, building and publishing them, sweeping debris,
removing entries."""

from __future__ import annotations

import builtins
import json
import logging
import os
import re
import stat
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..errors import CowdiskError, KernelError, NotFound, Unsupported
from ..kernel import fs as kfs
from ..kernel import procfs
from ..locks import FileLock
from ..progress import Progress, stage
from .build import IMAGE_NAME, build_image
from .fscheck import check_same_filesystem
from .mkfs import MkfsInfo, mkfs_fingerprint
from .recipes import FORMAT, KEY_RE, Recipe, cache_key, check_recipe, hash_file, recipe_digest, validate_key
from .tree import remove_tree

log = logging.getLogger(__name__)

META_NAME = "meta.json"
LOCK_DIR = ".locks"
STAGING_PREFIX = ".staging-"
OWNER_NAME = ".owner"  # inside a staging directory only; removed before publishing
DEFAULT_LOCK_TIMEOUT = 600.0

_STAGING_RE = re.compile(r"^\.staging-([0-9a-f]{64})-(\d+)-(.+)$")
# kernel.fs.reflink_support's probe files: .cowdisk-reflink-probe-<pid>[-<tid>-<random>]-a|b
_PROBE_RE = re.compile(r"^\.cowdisk-reflink-probe-(\d+)-(?:[0-9a-f]+-)*[ab]$")


@dataclass(frozen=True)
class CacheEntry:
    """A published cache entry."""

    key: str
    path: str  # the entry directory
    image: str  # <path>/disk.img
    fs: str
    capacity: int
    size: int
    sha256: str
    created: float
    meta: dict[str, Any] = field(compare=False, repr=False)


@dataclass(frozen=True)
class Plan:
    """A recipe hashed: its cache key, content digest, stat signature and mkfs fingerprint."""

    key: str
    digest: str
    sig: str
    mkfs: MkfsInfo


@dataclass(frozen=True)
class CacheResult:
    entry: CacheEntry
    built: bool  # True when this call built it, False when it was reused


@dataclass(frozen=True)
class CleanResult:
    removed: list[str]  # keys removed
    skipped: list[str]  # keys left because a live peer holds their lock
    debris: list[str]  # staging paths removed by the sweep


# staging directories this process is building in right now (a sweep keeps them)
_active_staging: set[str] = set()
_active_lock = threading.Lock()


class TemplateCache:
    """A directory of built template images, one per key. Safe across processes and threads."""

    def __init__(self, root: str | os.PathLike[str], *, immutable: bool = False,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.immutable = immutable
        self.lock_timeout = lock_timeout

    # paths
    def entry_path(self, key: str) -> str:
        return os.path.join(self.root, validate_key(key))

    def lock_path(self, key: str) -> str:
        return os.path.join(self.root, LOCK_DIR, f"{validate_key(key)}.lock")

    def _ensure_dirs(self) -> None:
        for d in (self.root, os.path.join(self.root, LOCK_DIR)):
            try:
                kfs.makedirs_mode(d, 0o700)
            except OSError as e:
                raise KernelError.from_oserror("create cache directory", d, e) from None
        st = kfs.fs_type(self.root)
        if st.f_type in kfs.REMOTE_LOCK_FS:
            raise Unsupported(f"cache directory {self.root} is on {st.name}, where flock is not a local "
                              "guarantee", op="open cache", obj=self.root,
                              hint="keep the store and its cache on a local filesystem (btrfs, xfs, ext4)")

    def _lock(self, key: str, *, shared: bool = False, timeout: float | None = None,
              progress: Progress | None = None) -> FileLock:
        """The key's lock: exclusive for builders and removers, shared for holders."""
        self._ensure_dirs()
        return FileLock(self.lock_path(key), timeout=self.lock_timeout if timeout is None else timeout,
                        shared=shared, what=f"cache entry {key}", mode=0o600, pid_hint=True,
                        on_wait=None if progress is None else (lambda text: stage(progress, text)))

    # keys
    def key_for(self, recipe: Recipe) -> str:
        """The key ``recipe`` builds under (hashes the recipe's inputs)."""
        return self.plan(recipe).key

    def plan(self, recipe: Recipe, progress: Progress | None = None) -> "Plan":
        """Hash the recipe's inputs once: its key, and what a build needs. Pass it to
        :meth:`get_or_build` so that a caller who looks the key up first hashes once."""
        check_recipe(recipe)
        mk = mkfs_fingerprint(recipe.fs)
        stage(progress, f"hashing {recipe.kind} recipe")
        digest, sig = recipe_digest(recipe)
        return Plan(self._key(recipe, digest, mk), digest, sig, mk)

    @staticmethod
    def _key(recipe: Recipe, digest: str, mk: MkfsInfo) -> str:
        return cache_key(recipe.fs, recipe.capacity, mk.fingerprint, recipe.kind, digest, recipe.mkfs_options)

    # reading
    def lookup(self, key: str) -> CacheEntry | None:
        """The published entry for ``key``, or None (also for an unreadable or damaged one)."""
        path = self.entry_path(key)
        try:
            with open(os.path.join(path, META_NAME)) as f:
                meta = json.load(f)
            size = os.stat(os.path.join(path, IMAGE_NAME)).st_size
        except (OSError, ValueError):
            return None
        try:
            if meta["key"] != key or int(meta["size"]) != size:
                return None
            return CacheEntry(key, path, os.path.join(path, IMAGE_NAME), str(meta["fs"]), int(meta["capacity"]),
                              size, str(meta["sha256"]), float(meta["created"]), meta)
        except (KeyError, TypeError, ValueError):
            return None

    def list(self) -> list[CacheEntry]:
        """All published entries, oldest first."""
        out = [e for n in self._names() if KEY_RE.match(n) and (e := self.lookup(n)) is not None]
        return sorted(out, key=lambda e: (e.created, e.key))

    def _names(self) -> builtins.list[str]:
        try:
            return sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise KernelError.from_oserror("list cache", self.root, e) from None

    def verify(self, key: str, *, progress: Progress | None = None) -> bool:
        """Re-hash the entry's image and compare with the sha256 recorded at build time."""
        e = self.lookup(key)
        if e is None:
            raise NotFound(f"cache entry {key} not found", op="verify cache entry", obj=key)
        stage(progress, "hashing the image")
        return hash_file(e.image, progress) == e.sha256

    @contextmanager
    def hold(self, key: str, *, timeout: float | None = None) -> Iterator[CacheEntry]:
        """Keep ``key``'s entry from being removed (shared lock) while the caller reads it."""
        with self._lock(key, shared=True, timeout=timeout):
            e = self.lookup(key)
            if e is None:
                raise NotFound(f"cache entry {key} not found", op="hold cache entry", obj=key)
            yield e

    # building
    def get_or_build(self, recipe: Recipe, *, progress: Progress | None = None,
                     timeout: float | None = None, plan: "Plan | None" = None) -> CacheResult:
        """Return the entry for ``recipe``, building it unless it is cached.

        Concurrent callers for one key: one builds, the others wait for the key lock (up to
        ``timeout`` seconds, default the cache's ``lock_timeout``) and reuse its entry.
        ``progress`` gets a stage report as each phase begins, and bytes while hashing.
        ``plan`` is :meth:`plan`'s result for this recipe, when the caller has it.
        """
        p = plan or self.plan(recipe, progress)
        key, digest, sig, mk = p.key, p.digest, p.sig, p.mkfs
        hit = self.lookup(key)
        if hit is not None:
            stage(progress, f"cache hit {key}")
            return CacheResult(hit, False)

        def build(staging: str) -> dict[str, Any]:
            return build_image(recipe, mk, key, staging, digest, sig, progress)

        return self._publish(key, recipe.fs, recipe.capacity, mk, build, progress, timeout)

    def import_image(self, image: str | os.PathLike[str], *, fs: str = "raw",
                     progress: Progress | None = None, timeout: float | None = None) -> CacheResult:
        """Cache a ready image under its content digest (key = sha256 of its bytes)."""
        src = os.path.abspath(os.fspath(image))
        if not os.path.isfile(src):
            raise NotFound(f"image {src} is not a file", op="import cache image", obj=src)
        stage(progress, f"hashing {src}")
        key = hash_file(src, progress)
        hit = self.lookup(key)
        if hit is not None:
            return CacheResult(hit, False)
        size = os.stat(src).st_size

        def build(staging: str) -> dict[str, Any]:
            img = os.path.join(staging, IMAGE_NAME)
            stage(progress, f"copying {src}")
            kfs.sparse_copy(src, img, progress=progress)
            stage(progress, "hashing the copy")
            if hash_file(img, progress) != key:
                raise CowdiskError(f"image {src} changed while importing it; not publishing",
                                   op="import cache image", obj=src)
            return {"kind": "image", "source": src}

        return self._publish(key, fs, size, None, build, progress, timeout)

    def _publish(self, key: str, fs: str, capacity: int, mk: MkfsInfo | None,
                 build: Callable[[str], dict[str, Any]], progress: Progress | None,
                 timeout: float | None) -> CacheResult:
        """Under the key's exclusive lock: build in a staging directory, hash, write
        meta.json, and publish with one rename(2)."""
        with self._lock(key, timeout=timeout, progress=progress):
            hit = self.lookup(key)
            if hit is not None:
                stage(progress, f"cache hit {key} (built by a peer)")
                return CacheResult(hit, False)
            self._sweep(only_key=key, locked_key=key)
            final = self.entry_path(key)
            if os.path.lexists(final):
                stage(progress, f"removing damaged entry {final}")
                remove_entry_dir(final, "remove damaged cache entry")
            try:
                staging = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{key}-{os.getpid()}-", dir=self.root)
            except OSError as e:
                raise KernelError.from_oserror("create staging directory", self.root, e) from None
            with _active_lock:
                _active_staging.add(staging)
            try:
                _write_owner(staging)
                check_same_filesystem(staging, self.root)
                t0 = time.time()
                summary = build(staging)
                img = os.path.join(staging, IMAGE_NAME)
                stage(progress, "hashing the image")
                digest = hash_file(img, progress)
                size = os.stat(img).st_size
                os.chmod(img, 0o400)
                _fsync_path(img)
                meta = {
                    "format": FORMAT, "key": key, "fs": fs, "capacity": capacity, "recipe": summary,
                    "mkfs": None if mk is None else {"path": mk.path, "version": mk.version,
                                                     "fingerprint": mk.fingerprint},
                    "size": size, "sha256": digest, "created": time.time(),
                    "created_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "build_seconds": round(time.time() - t0, 3), "builder_pid": os.getpid(),
                }
                mpath = os.path.join(staging, META_NAME)
                with open(mpath, "w") as f:
                    json.dump(meta, f, indent=1, sort_keys=True)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(mpath, 0o400)
                os.unlink(os.path.join(staging, OWNER_NAME))
                os.chmod(staging, 0o700)
                if self.immutable:
                    kfs.set_immutable(img, True)
                _fsync_path(staging, directory=True)
                stage(progress, f"publishing {final}")
                try:
                    os.rename(staging, final)
                except OSError as e:
                    raise KernelError.from_oserror("publish cache entry", f"{staging} -> {final}", e) from None
                _fsync_path(self.root, directory=True)
                log.debug("cache entry %s published: %s", key, final)
            except BaseException:
                try:
                    if os.path.lexists(staging):
                        remove_entry_dir(staging, "remove failed staging directory")
                except CowdiskError:
                    pass
                raise
            finally:
                with _active_lock:
                    _active_staging.discard(staging)
            entry = self.lookup(key)
            if entry is None:
                raise CowdiskError(f"cache entry {key} vanished right after publishing", op="publish cache entry",
                                   obj=final)
            return CacheResult(entry, True)

    # removing
    def remove(self, key: str, *, timeout: float | None = None) -> bool:
        """Remove an entry (waiting for its lock); False when it was not there."""
        path = self.entry_path(key)
        if not os.path.lexists(path):
            return False
        with self._lock(key, timeout=timeout):
            if not os.path.lexists(path):
                return False
            remove_entry_dir(path, "remove cache entry")
            log.debug("cache entry %s removed", key)
            return True

    def sweep(self) -> builtins.list[str]:
        """Remove staging debris whose builder is dead; keep a live peer's. Returns removed paths."""
        return self._sweep()

    def _sweep(self, only_key: str | None = None, locked_key: str | None = None) -> builtins.list[str]:
        removed: builtins.list[str] = []
        for name in self._names():
            path = os.path.join(self.root, name)
            pm = _PROBE_RE.match(name)
            if pm and only_key is None:
                if not procfs.process_alive(int(pm.group(1))):
                    try:
                        os.unlink(path)
                        removed.append(path)
                    except OSError:
                        pass
                continue
            m = _STAGING_RE.match(name)
            if not m:
                continue
            key, pid = m.group(1), int(m.group(2))
            if only_key is not None and key != only_key:
                continue
            if _builder_alive(path, pid):
                continue
            if key == locked_key:
                remove_entry_dir(path, "remove staging debris")
                removed.append(path)
                continue
            lk = self._lock(key)
            if not lk.try_acquire():
                continue  # a builder of this key is running; next sweep
            try:
                if os.path.lexists(path):
                    remove_entry_dir(path, "remove staging debris")
                    removed.append(path)
            finally:
                lk.release()
        return removed

    def clean_all(self) -> CleanResult:
        """Sweep debris, then remove every entry whose key lock is free; skip the others."""
        debris = self.sweep()
        removed: builtins.list[str] = []
        skipped: builtins.list[str] = []
        for name in self._names():
            if not KEY_RE.match(name):
                continue
            lk = self._lock(name)
            if not lk.try_acquire():
                skipped.append(name)
                continue
            try:
                path = os.path.join(self.root, name)
                if os.path.lexists(path):
                    remove_entry_dir(path, "remove cache entry")
                    removed.append(name)
            finally:
                lk.release()
        return CleanResult(removed, skipped, debris)


# --------------------------------------------------------------------------- staging owners


def _write_owner(staging: str) -> None:
    """Record who builds in ``staging``: {"pid", "start", "boot"} (start: clock ticks since
    boot as an int, as every version has written it)."""
    me = os.getpid()
    start = procfs.process_start(me)
    with open(os.path.join(staging, OWNER_NAME), "w") as f:
        json.dump({"pid": me, "start": int(start) if start else None, "boot": procfs.boot_id()}, f)


def _builder_alive(staging: str, pid: int) -> bool:
    """Is the builder of ``staging`` (PID ``pid`` from its name) still building?"""
    if pid == os.getpid():
        with _active_lock:
            return staging in _active_staging
    start = boot = None
    try:
        with open(os.path.join(staging, OWNER_NAME)) as f:
            o = json.load(f)
        if int(o.get("pid", -1)) == pid:
            start, boot = o.get("start"), o.get("boot")
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return procfs.process_alive(pid, start, boot)


# --------------------------------------------------------------------------- files


def _fsync_path(path: str, directory: bool = False) -> None:
    fd = os.open(path, (os.O_RDONLY | os.O_DIRECTORY) if directory else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_entry_dir(path: str, op: str) -> None:
    """Remove an entry or staging directory.

    Its image may be chattr +i, and may be one inode with a file outside the cache (the
    store hard-links an entry's image as a template and makes it immutable). The flag is
    cleared only to unlink our name, then set again through the still open fd when the
    inode keeps another name, so that other file stays immutable.
    """
    img = os.path.join(path, IMAGE_NAME)
    try:
        fd = os.open(img, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        fd = -1  # gone, a symlink, unreadable: the tree removal below deals with it
    if fd >= 0:
        try:
            _unlink_image(fd, img, op)
        finally:
            os.close(fd)
    remove_tree(path, op)


def _unlink_image(fd: int, img: str, op: str) -> None:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return
    try:
        was_immutable = bool(kfs.get_flags(fd) & kfs.FS_IMMUTABLE_FL)
    except OSError:
        was_immutable = False  # no inode flags on this filesystem
    if was_immutable:
        kfs.set_immutable_fd(fd, False, img)
    try:
        os.unlink(img)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise KernelError.from_oserror(op, img, e) from None
    finally:
        if was_immutable and os.fstat(fd).st_nlink > 0:
            kfs.set_immutable_fd(fd, True, img)
