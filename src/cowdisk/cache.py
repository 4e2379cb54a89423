"""Template cache: disk images built from a recipe, cached by key, built once per key.

Layout under the cache directory (on the store's filesystem, e.g. ``<store>/cache``)::

    <cache>/<key>/disk.img                  the image, mode 0444 (optionally chattr +i)
    <cache>/<key>/meta.json                 key, fs, capacity, recipe summary, mkfs, size, sha256, created
    <cache>/.locks/<key>.lock               per-key flock; holds the last builder's PID as a hint
    <cache>/.staging-<key>-<pid>-<rand>/    a build in progress (or debris of a dead builder)

**Keys** are 64 lowercase hex digits. For a recipe::

    key = sha256(b"cowdisk-cache-key\\0" + canonical_json({
              "v": 1, "fs": fs, "capacity": capacity_bytes,
              "mkfs": mkfs_fingerprint(fs),     # sha256 of `mkfs.<fs> -V` output (LC_ALL=C)
              "options": [extra mkfs args],
              "kind": "tree" | "tar" | "files",
              "digest": recipe content digest}))

where canonical_json is ``json.dumps(sort_keys=True, separators=(",", ":"))`` and the
content digest is :func:`tree_digest` of the directory (paths, types, permission bits,
uid/gid, sizes, sha256 of contents, symlink targets, device numbers, hardlink groups,
xattrs; **not** timestamps), the sha256 of the tarball's bytes, or a digest over the file
list's (destination, tree digest of source) pairs in order. For an imported image the key
is simply the sha256 of the image's bytes (:meth:`TemplateCache.import_image`).

**Publishing**: a build happens in a staging directory inside the cache directory, and
one ``rename(2)`` publishes it, so an entry is either complete or absent. Staging on
another filesystem (or mount) than the cache is refused: a rename across them fails with
EXDEV, and a copy instead would not be atomic.

**Concurrency**: one builder per key, through an exclusive ``flock`` on the key's lock
file taken with a timeout; a waiter re-checks for the entry once it has the lock and
reuses it. :meth:`TemplateCache.hold` takes the lock shared, so that ``clean_all`` and
``remove`` leave an entry alone while a peer is copying out of it. Lock files are never
deleted (deleting a lock file lets two processes lock two different inodes).

ext4 images are reproducible: the filesystem UUID and directory hash seed are derived
from the key and mke2fs runs with a fixed ``E2FSPROGS_FAKE_TIME``, so the same key gives
the same bytes again after a ``clean_all`` (file timestamps still come from the source).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence, Union
from contextlib import contextmanager

from .errors import CowdiskError, InvalidArgument, KernelError, LockTimeout, NotFound, Unsupported
from .kernel import fs as kfs
from .kernel import procfs

Progress = Callable[[str], None]

IMAGE_NAME = "disk.img"
META_NAME = "meta.json"
LOCK_DIR = ".locks"
STAGING_PREFIX = ".staging-"
OWNER_NAME = ".owner"  # inside a staging directory only; removed before publishing
FORMAT = 1
DEFAULT_LOCK_TIMEOUT = 600.0
FAKE_TIME = 1_700_000_000  # mke2fs timestamps, for reproducible ext4 images

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_STAGING_RE = re.compile(r"^\.staging-([0-9a-f]{64})-(\d+)-(.+)$")
_PROBE_RE = re.compile(r"^\.cowdisk-reflink-probe-(\d+)-[ab]$")
_SUPPORTED_FS = ("ext4", "btrfs")
_KEY_DOMAIN = b"cowdisk-cache-key\0"
_TREE_DOMAIN = b"cowdisk-tree-v1\0"
_MKFS_PATH_EXTRA = ("/usr/local/sbin", "/usr/sbin", "/sbin")


# --------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class TreeRecipe:
    """An image of filesystem ``fs`` and ``capacity`` bytes holding the tree under ``source``."""

    source: str
    capacity: int
    fs: str = "ext4"
    mkfs_options: tuple[str, ...] = ()
    kind = "tree"


@dataclass(frozen=True)
class TarRecipe:
    """An image holding the contents of a tarball (any compression GNU tar detects)."""

    tarball: str
    capacity: int
    fs: str = "ext4"
    mkfs_options: tuple[str, ...] = ()
    kind = "tar"


@dataclass(frozen=True)
class FilesRecipe:
    """An image holding a list of ``(source path, destination path in the image)`` entries.

    A source may be a file, a symlink (copied as a link) or a directory (copied whole).
    Entries are applied in order: directories merge, later files replace earlier ones.
    Parent directories that no entry provides are made 0755, owned by the builder.
    """

    files: tuple[tuple[str, str], ...]
    capacity: int
    fs: str = "ext4"
    mkfs_options: tuple[str, ...] = ()
    kind = "files"


Recipe = Union[TreeRecipe, TarRecipe, FilesRecipe]


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
class CacheResult:
    entry: CacheEntry
    built: bool  # True when this call built it, False when it was reused


@dataclass(frozen=True)
class CleanResult:
    removed: list[str]  # keys removed
    skipped: list[str]  # keys left because a live peer holds their lock
    debris: list[str]  # staging paths removed by the sweep


# --------------------------------------------------------------------------- digests


def _field(h: "hashlib._Hash", value: bytes | str | int) -> None:
    if isinstance(value, int):
        value = str(value)
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    h.update(len(value).to_bytes(8, "little"))
    h.update(value)


def _file_sha256(path: str | bytes) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise KernelError.from_oserror("hash", os.fsdecode(path), e) from None


def _xattrs(path: bytes) -> list[tuple[str, bytes]]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return []
        raise KernelError.from_oserror("list xattrs", os.fsdecode(path), e) from None
    out = []
    for n in sorted(names):
        try:
            out.append((n, os.getxattr(path, n, follow_symlinks=False)))
        except OSError as e:
            if e.errno == errno.ENODATA:
                continue
            raise KernelError.from_oserror("read xattr", f"{os.fsdecode(path)} {n}", e) from None
    return out


def _walk(root: str) -> Iterator[tuple[bytes, bytes, os.stat_result]]:
    """(relative path, absolute path, lstat) of ``root`` (followed if a symlink) and below, sorted."""
    top = os.fsencode(os.path.abspath(root))
    try:
        st = os.stat(top)
    except OSError as e:
        raise KernelError.from_oserror("stat recipe source", root, e) from None
    yield b"", top, st
    if stat.S_ISDIR(st.st_mode):
        yield from _walk_dir(b"", top)


def _walk_dir(rel: bytes, path: bytes) -> Iterator[tuple[bytes, bytes, os.stat_result]]:
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        raise KernelError.from_oserror("list recipe directory", os.fsdecode(path), e) from None
    for name in names:
        r = rel + b"/" + name if rel else name
        p = path + b"/" + name
        try:
            st = os.lstat(p)
        except OSError as e:
            raise KernelError.from_oserror("stat recipe file", os.fsdecode(p), e) from None
        yield r, p, st
        if stat.S_ISDIR(st.st_mode):
            yield from _walk_dir(r, p)


def _type_char(mode: int) -> str:
    for test, c in ((stat.S_ISREG, "f"), (stat.S_ISDIR, "d"), (stat.S_ISLNK, "l"), (stat.S_ISCHR, "c"),
                    (stat.S_ISBLK, "b"), (stat.S_ISFIFO, "p"), (stat.S_ISSOCK, "s")):
        if test(mode):
            return c
    return "?"


def _tree_digests(root: str) -> tuple[str, str]:
    """(content digest, stat signature) of a tree. The signature changes when anything
    under it is modified (ctime, size, inode), and is cheap to recompute."""
    h = hashlib.sha256(_TREE_DOMAIN)
    sig = hashlib.sha256()
    first: dict[tuple[int, int], bytes] = {}
    for rel, path, st in _walk(root):
        t = _type_char(st.st_mode)
        _field(h, rel)
        _field(h, t)
        _field(h, stat.S_IMODE(st.st_mode))
        _field(h, st.st_uid)
        _field(h, st.st_gid)
        if t == "f":
            _field(h, st.st_size)
            _field(h, _file_sha256(path))
            if st.st_nlink > 1:
                group = first.setdefault((st.st_dev, st.st_ino), rel)
                _field(h, b"link:" + group)
        elif t == "l":
            try:
                _field(h, os.readlink(path))
            except OSError as e:
                raise KernelError.from_oserror("read symlink", os.fsdecode(path), e) from None
        elif t in "cb":
            _field(h, f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
        for name, value in _xattrs(path) if t != "l" else []:
            _field(h, b"xattr:" + name.encode())
            _field(h, value)
        _field(h, b"\n")
        for v in (rel, st.st_ino, st.st_size, st.st_ctime_ns, st.st_mtime_ns, st.st_mode):
            _field(sig, v)
    return h.hexdigest(), sig.hexdigest()


def tree_digest(root: str | os.PathLike[str]) -> str:
    """Content digest of a file tree (or one file): see the module docstring."""
    return _tree_digests(os.fspath(root))[0]


def _clean_dest(dest: str) -> str:
    parts = [p for p in dest.replace("\\", "/").split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise InvalidArgument(f"file list destination {dest!r} contains '..'", op="cache recipe", obj=dest)
    return "/".join(parts)


def _stat_sig(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError as e:
        raise KernelError.from_oserror("stat recipe source", path, e) from None
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def recipe_digest(recipe: Recipe) -> tuple[str, str]:
    """(content digest, stat signature) of a recipe's inputs."""
    if isinstance(recipe, TreeRecipe):
        if not os.path.isdir(recipe.source):
            raise NotFound(f"recipe source {recipe.source} is not a directory", op="cache recipe", obj=recipe.source)
        return _tree_digests(recipe.source)
    if isinstance(recipe, TarRecipe):
        if not os.path.isfile(recipe.tarball):
            raise NotFound(f"recipe tarball {recipe.tarball} is not a file", op="cache recipe", obj=recipe.tarball)
        sig = _stat_sig(recipe.tarball)
        return _file_sha256(recipe.tarball), sig
    if isinstance(recipe, FilesRecipe):
        if not recipe.files:
            raise InvalidArgument("file list recipe has no entries", op="cache recipe", obj="files")
        h = hashlib.sha256(b"cowdisk-files-v1\0")
        sig = hashlib.sha256()
        _field(h, f"implicit-dirs:0755:{os.geteuid()}:{os.getegid()}")
        for src, dest in recipe.files:
            d = _clean_dest(dest)
            if not os.path.lexists(src):
                raise NotFound(f"file list source {src} does not exist", op="cache recipe", obj=src)
            if os.path.islink(src):
                _field(h, d)
                _field(h, "symlink:" + os.readlink(src))
                _field(sig, src)
                _field(sig, os.readlink(src))
                continue
            c, s = _tree_digests(src)
            _field(h, d)
            _field(h, c)
            _field(sig, s)
        return h.hexdigest(), sig.hexdigest()
    raise InvalidArgument(f"not a cache recipe: {recipe!r}", op="cache recipe", obj=type(recipe).__name__)


def cache_key(fs: str, capacity: int, mkfs_fp: str, kind: str, digest: str,
              options: Sequence[str] = ()) -> str:
    """The cache key of a recipe (see the module docstring). Pure: no I/O."""
    doc = {"v": FORMAT, "fs": fs, "capacity": int(capacity), "mkfs": mkfs_fp,
           "options": list(options), "kind": kind, "digest": digest}
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(_KEY_DOMAIN + blob).hexdigest()


def validate_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise InvalidArgument(f"invalid cache key {key!r}: expected 64 lowercase hex digits",
                              op="cache", obj=str(key))
    return key


# --------------------------------------------------------------------------- mkfs


@dataclass(frozen=True)
class MkfsInfo:
    fs: str
    path: str
    version: str  # first line of the version output
    fingerprint: str  # sha256 hex of the full version output (stdout + stderr)


_mkfs_memo: dict[tuple[str, int, int, int], MkfsInfo] = {}
_mkfs_memo_lock = threading.Lock()


def _c_env() -> dict[str, str]:
    env = dict(os.environ)
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    env["PATH"] = os.pathsep.join([env.get("PATH", "/usr/bin:/bin"), *_MKFS_PATH_EXTRA])
    return env


def find_mkfs(fs: str) -> str:
    name = f"mkfs.{fs}"
    path = shutil.which(name, path=_c_env()["PATH"])
    if not path:
        pkg = {"ext4": "e2fsprogs", "btrfs": "btrfs-progs", "xfs": "xfsprogs"}.get(fs, f"the package providing {name}")
        raise Unsupported(f"{name} not found on PATH", op="find mkfs", obj=name, hint=f"install {pkg}")
    return os.path.realpath(path)


def mkfs_fingerprint(fs: str) -> MkfsInfo:
    """sha256 of ``mkfs.<fs> -V`` output, memoised per binary (path, inode, size, mtime)."""
    path = find_mkfs(fs)
    try:
        st = os.stat(path)
    except OSError as e:
        raise KernelError.from_oserror("stat mkfs", path, e) from None
    memo_key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
    with _mkfs_memo_lock:
        if memo_key in _mkfs_memo:
            return _mkfs_memo[memo_key]
    try:
        r = subprocess.run([path, "-V"], capture_output=True, env=_c_env(), timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CowdiskError(f"run {path} -V for the cache key fingerprint: {e}", op="mkfs fingerprint", obj=path) from None
    out = r.stdout + r.stderr
    if r.returncode != 0 or not out.strip():
        raise CowdiskError(f"{path} -V exited {r.returncode} with output {out[:200]!r}: cannot fingerprint it "
                           "for the cache key", op="mkfs fingerprint", obj=path)
    info = MkfsInfo(fs, path, out.decode(errors="replace").strip().splitlines()[0],
                    hashlib.sha256(out).hexdigest())
    with _mkfs_memo_lock:
        _mkfs_memo[memo_key] = info
    return info


def _check_recipe(recipe: Recipe) -> None:
    if recipe.fs not in _SUPPORTED_FS:
        hint = ""
        if recipe.fs == "xfs":
            hint = "mkfs.xfs of xfsprogs < 6.5 cannot populate an image from a directory without mounting it"
        raise Unsupported(f"cache recipes build {', '.join(_SUPPORTED_FS)} images, not {recipe.fs!r}",
                          op="cache recipe", obj=recipe.fs, hint=hint)
    cap = recipe.capacity
    if not isinstance(cap, int) or isinstance(cap, bool) or cap <= 0 or cap % 512:
        raise InvalidArgument(f"capacity {cap!r} must be a positive multiple of 512 bytes",
                              op="cache recipe", obj=str(cap))
    for o in recipe.mkfs_options:
        if not isinstance(o, str):
            raise InvalidArgument(f"mkfs option {o!r} is not a string", op="cache recipe", obj=str(o))


# --------------------------------------------------------------------------- filesystem checks


def _mount_id(path: str) -> int | None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("mnt_id:"):
                    return int(line.split()[1])
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


def check_same_filesystem(staging_parent: str | os.PathLike[str], cache_dir: str | os.PathLike[str]) -> None:
    """Refuse (KernelError EXDEV) when ``staging_parent`` and ``cache_dir`` are on different
    filesystems or mounts: publishing is one rename(2), which is atomic only within one
    mount and fails with EXDEV across them."""
    a, b = os.fspath(staging_parent), os.fspath(cache_dir)
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError as e:
        raise KernelError.from_oserror("stat for same-filesystem check", e.filename or f"{a} {b}", e) from None
    why = ""
    if sa.st_dev != sb.st_dev:
        why = (f"staging {a} is on device {os.major(sa.st_dev)}:{os.minor(sa.st_dev)} "
               f"({kfs.statfs(a).name}), cache {b} on {os.major(sb.st_dev)}:{os.minor(sb.st_dev)} "
               f"({kfs.statfs(b).name})")
    else:
        ma, mb = _mount_id(a), _mount_id(b)
        if ma is not None and mb is not None and ma != mb:
            why = f"staging {a} is on mount {ma}, cache {b} on mount {mb} (one filesystem, two mounts)"
    if why:
        raise KernelError("publish cache entry", b, errno.EXDEV, detail=why,
                          hint="a rename across filesystems or mounts is not atomic (the kernel refuses it "
                               "with EXDEV); stage inside the cache directory")


def check_reflink(path: str | os.PathLike[str], *, probe: bool = True) -> kfs.StatFs:
    """Return the statfs of ``path`` (or its nearest existing ancestor) when reflinks work
    there; raise Unsupported saying which path was probed, which filesystem it is and what
    to do otherwise.

    statfs f_type decides first (btrfs, xfs). When ``path`` exists as a directory and
    ``probe`` is true, a FICLONE of a probe file inside it is the final word: it catches
    xfs made with reflink=0, and accepts filesystems that pass FICLONE through (overlayfs
    over btrfs). Nothing is written into ancestors of a path that does not exist yet.
    """
    p = os.path.abspath(os.fspath(path))
    probed = kfs.nearest_existing(p)
    st = kfs.statfs(probed)
    where = f"{p}" if probed == p else f"{p} (does not exist yet; probed its nearest existing ancestor {probed})"
    what = "put the store (and its cache) on btrfs, or on xfs made with reflink=1 (the mkfs.xfs default), " \
           "or use the embedded pool or the copy backend"
    can_probe = probe and probed == p and os.path.isdir(p)
    if can_probe:
        if kfs.probe_reflink(p):
            return st
        raise Unsupported(
            f"reflink not supported at {where}: it is {st.name} (statfs f_type 0x{st.f_type:x}) "
            f"and a FICLONE probe there failed"
            + (" (an xfs made with reflink=0?)" if st.f_type == kfs.XFS_MAGIC else ""),
            op="check reflink", obj=p, hint=what)
    if st.reflink_capable:
        return st
    raise Unsupported(f"reflink not supported at {where}: it is {st.name} (statfs f_type 0x{st.f_type:x}), "
                      "not btrfs or xfs", op="check reflink", obj=p, hint=what)


# --------------------------------------------------------------------------- processes and locks


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process, None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return ("?", -1)
    rest = data[data.rindex(b")") + 2:].split()
    return rest[0].decode(), int(rest[19])


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _owner_alive(pid: int, start: int | None = None, boot: str | None = None) -> bool:
    """Is the process that wrote (pid, start, boot) still running? Zombies count as dead,
    a PID reused by a newer process (different start time or boot) counts as dead."""
    if pid <= 0:
        return False
    if boot and boot != _boot_id():
        return False
    ps = _proc_stat(pid)
    if ps is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state, started = ps
    if state in ("Z", "X", "x"):
        return False
    if start is not None and started >= 0 and started != start:
        return False
    return True


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return ""


lock_holders = procfs.lock_holders


def _describe_holders(lock_path: str) -> str:
    holders = lock_holders(lock_path)
    if holders:
        me = os.getpid()
        return ", ".join(f"PID {p}" + (" (this process)" if p == me else f" ({_cmdline(p) or '?'})") + f" {m}"
                         for p, m in holders)
    hint = ""
    try:
        with open(lock_path) as f:
            txt = f.read(32).strip()
        if txt.isdigit():
            hint = f"; the lock file names PID {txt}, a hint that may be stale"
    except OSError:
        pass
    return "a process not visible in /proc (another PID namespace, or no permission)" + hint


class _KeyLock:
    """flock on ``<cache>/.locks/<key>.lock``; exclusive for builders, shared for holders."""

    def __init__(self, path: str, shared: bool) -> None:
        self.path = path
        self.shared = shared
        self.fd = -1

    def try_acquire(self) -> bool:
        if self.fd < 0:
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise KernelError.from_oserror("open cache lock", self.path, e) from None
        op = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        try:
            fcntl.flock(self.fd, op)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            self.release()
            raise KernelError.from_oserror("lock", self.path, e) from None
        if not self.shared:
            try:  # a hint for humans: the holder search in /proc is the proof
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
            except OSError:
                pass
        return True

    def acquire(self, timeout: float, what: str, progress: Progress | None) -> "_KeyLock":
        end = time.monotonic() + max(0.0, timeout)
        delay = 0.002
        told = False
        start = time.monotonic()
        try:
            while not self.try_acquire():
                now = time.monotonic()
                if now >= end:
                    raise LockTimeout(
                        f"{what}: lock {self.path} still held after {timeout:g} s by "
                        f"{_describe_holders(self.path)}",
                        op="lock cache entry", obj=self.path,
                        hint="wait for that process to finish its build, or end it if it hangs")
                if progress and not told and now - start >= 1.0:
                    told = True
                    progress(f"waiting for {what}: held by {_describe_holders(self.path)}")
                time.sleep(min(delay, max(0.0, end - now)))
                delay = min(delay * 2, 0.1)
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "_KeyLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# --------------------------------------------------------------------------- helpers


_active_staging: set[str] = set()
_active_lock = threading.Lock()


def _fsync_path(path: str, directory: bool = False) -> None:
    fd = os.open(path, (os.O_RDONLY | os.O_DIRECTORY) if directory else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rmtree(path: str, op: str) -> None:
    """Remove an entry or staging directory, clearing chattr +i on its image first."""
    img = os.path.join(path, IMAGE_NAME)
    try:
        if os.path.isfile(img) and not os.path.islink(img) and kfs.is_immutable(img):
            kfs.set_immutable(img, False)
    except OSError:
        pass
    errors: list[OSError] = []

    def onerror(func: Any, p: str, exc: Any) -> None:
        e = exc[1]
        if isinstance(e, FileNotFoundError):
            return
        errors.append(e)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=lambda f, p, e: onerror(f, p, (type(e), e, None)))
    else:
        shutil.rmtree(path, onerror=onerror)
    if errors:
        e = errors[0]
        raise KernelError.from_oserror(op, getattr(e, "filename", None) or path, e) from None


def _run(cmd: list[str], op: str, obj: str, env: dict[str, str] | None = None,
         hint: str = "") -> subprocess.CompletedProcess[bytes]:
    try:
        r = subprocess.run(cmd, capture_output=True, env=env or _c_env(), stdin=subprocess.DEVNULL)
    except OSError as e:
        raise KernelError.from_oserror(op, cmd[0], e) from None
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).decode(errors="replace").strip().splitlines()[-6:]
        raise CowdiskError(f"{op} {obj}: {os.path.basename(cmd[0])} exited {r.returncode}: " + " | ".join(tail),
                           op=op, obj=obj, hint=hint)
    return r


def _copy_node(src: str, dst: str, links: dict[tuple[int, int], str]) -> None:
    """Copy one node (recursively for directories) keeping mode, owner, xattrs, times,
    symlinks, device nodes and hardlinks within the copy. Existing directories merge,
    other existing destinations are replaced."""
    st = os.lstat(src)
    m = st.st_mode
    if os.path.lexists(dst) and not (stat.S_ISDIR(m) and os.path.isdir(dst) and not os.path.islink(dst)):
        if os.path.isdir(dst) and not os.path.islink(dst):
            shutil.rmtree(dst)
        else:
            os.unlink(dst)
    if stat.S_ISDIR(m):
        os.makedirs(dst, exist_ok=True)
        for name in sorted(os.listdir(src)):
            _copy_node(os.path.join(src, name), os.path.join(dst, name), links)
    elif stat.S_ISLNK(m):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISREG(m):
        ident = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and ident in links:
            os.link(links[ident], dst)
            return
        kfs.sparse_copy(src, dst)
        if st.st_nlink > 1:
            links[ident] = dst
    elif stat.S_ISFIFO(m):
        os.mkfifo(dst)
    else:  # char, block, socket
        os.mknod(dst, m, st.st_rdev)
    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(m):
        for name, value in _xattrs(os.fsencode(src)):
            try:
                os.setxattr(dst, name, value)
            except OSError:
                pass
        os.chmod(dst, stat.S_IMODE(m))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


# --------------------------------------------------------------------------- the cache


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
                os.makedirs(d, 0o755, exist_ok=True)
            except OSError as e:
                raise KernelError.from_oserror("create cache directory", d, e) from None
        st = kfs.fs_type(self.root)
        if st.f_type in kfs.REMOTE_LOCK_FS:
            raise Unsupported(f"cache directory {self.root} is on {st.name}, where flock is not a local "
                              "guarantee", op="open cache", obj=self.root,
                              hint="keep the store and its cache on a local filesystem (btrfs, xfs, ext4)")

    # keys
    def key_for(self, recipe: Recipe) -> str:
        """The key ``recipe`` builds under (hashes the recipe's inputs)."""
        _check_recipe(recipe)
        return self._key(recipe, recipe_digest(recipe)[0], mkfs_fingerprint(recipe.fs))

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
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise KernelError.from_oserror("list cache", self.root, e) from None
        out = [e for n in names if _KEY_RE.match(n) and (e := self.lookup(n)) is not None]
        return sorted(out, key=lambda e: (e.created, e.key))

    def verify(self, key: str) -> bool:
        """Re-hash the entry's image and compare with the sha256 recorded at build time."""
        e = self.lookup(key)
        if e is None:
            raise NotFound(f"cache entry {key} not found", op="verify cache entry", obj=key)
        return _file_sha256(e.image) == e.sha256

    @contextmanager
    def hold(self, key: str, *, timeout: float | None = None) -> Iterator[CacheEntry]:
        """Keep ``key``'s entry from being removed (shared lock) while the caller reads it."""
        self._ensure_dirs()
        with _KeyLock(self.lock_path(key), shared=True) as lk:
            lk.acquire(self.lock_timeout if timeout is None else timeout, f"cache entry {key}", None)
            e = self.lookup(key)
            if e is None:
                raise NotFound(f"cache entry {key} not found", op="hold cache entry", obj=key)
            yield e

    # building
    def get_or_build(self, recipe: Recipe, *, progress: Progress | None = None,
                     timeout: float | None = None) -> CacheResult:
        """Return the entry for ``recipe``, building it unless it is cached.

        Concurrent callers for one key: one builds, the others wait for the key lock (up to
        ``timeout`` seconds, default the cache's ``lock_timeout``) and reuse its entry.
        """
        _check_recipe(recipe)
        say = progress or (lambda _m: None)
        mk = mkfs_fingerprint(recipe.fs)
        say(f"hashing {recipe.kind} recipe")
        digest, sig = recipe_digest(recipe)
        key = self._key(recipe, digest, mk)
        hit = self.lookup(key)
        if hit is not None:
            say(f"cache hit {key}")
            return CacheResult(hit, False)

        def build(staging: str) -> dict[str, Any]:
            img = os.path.join(staging, IMAGE_NAME)
            tree = self._populate(recipe, staging, say)
            self._mkfs(recipe, mk, key, tree, img, say)
            if tree is not None and tree.startswith(staging + os.sep):
                say("removing the unpacked tree")
                _rmtree(tree, "remove build tree")
            if recipe_signature(recipe) != sig:
                raise CowdiskError(f"recipe inputs changed while building cache entry {key}; not publishing",
                                   op="build cache entry", obj=key, hint="retry once the source is stable")
            return {"kind": recipe.kind, "digest": digest, **_summary(recipe)}

        return self._publish(key, recipe.fs, recipe.capacity, mk, build, say, timeout)

    def import_image(self, image: str | os.PathLike[str], *, fs: str = "raw",
                     progress: Progress | None = None, timeout: float | None = None) -> CacheResult:
        """Cache a ready image under its content digest (key = sha256 of its bytes)."""
        src = os.path.abspath(os.fspath(image))
        say = progress or (lambda _m: None)
        if not os.path.isfile(src):
            raise NotFound(f"image {src} is not a file", op="import cache image", obj=src)
        say(f"hashing {src}")
        key = _file_sha256(src)
        hit = self.lookup(key)
        if hit is not None:
            return CacheResult(hit, False)
        size = os.stat(src).st_size

        def build(staging: str) -> dict[str, Any]:
            img = os.path.join(staging, IMAGE_NAME)
            say(f"copying {src}")
            kfs.sparse_copy(src, img)
            say("hashing the copy")
            if _file_sha256(img) != key:
                raise CowdiskError(f"image {src} changed while importing it; not publishing",
                                   op="import cache image", obj=src)
            return {"kind": "image", "source": src}

        return self._publish(key, fs, size, None, build, say, timeout)

    def _publish(self, key: str, fs: str, capacity: int, mk: MkfsInfo | None,
                 build: Callable[[str], dict[str, Any]], say: Progress, timeout: float | None) -> CacheResult:
        self._ensure_dirs()
        what = f"cache entry {key}"
        with _KeyLock(self.lock_path(key), shared=False) as lk:
            lk.acquire(self.lock_timeout if timeout is None else timeout, what, say)
            hit = self.lookup(key)
            if hit is not None:
                say(f"cache hit {key} (built by a peer)")
                return CacheResult(hit, False)
            self._sweep(only_key=key, locked_key=key)
            final = self.entry_path(key)
            if os.path.lexists(final):
                say(f"removing damaged entry {final}")
                _rmtree(final, "remove damaged cache entry")
            try:
                staging = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{key}-{os.getpid()}-", dir=self.root)
            except OSError as e:
                raise KernelError.from_oserror("create staging directory", self.root, e) from None
            with _active_lock:
                _active_staging.add(staging)
            try:
                ps = _proc_stat(os.getpid())
                with open(os.path.join(staging, OWNER_NAME), "w") as f:
                    json.dump({"pid": os.getpid(), "start": ps[1] if ps else None, "boot": _boot_id()}, f)
                check_same_filesystem(staging, self.root)
                t0 = time.time()
                summary = build(staging)
                img = os.path.join(staging, IMAGE_NAME)
                say("hashing the image")
                digest = _file_sha256(img)
                size = os.stat(img).st_size
                os.chmod(img, 0o444)
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
                os.chmod(mpath, 0o444)
                os.unlink(os.path.join(staging, OWNER_NAME))
                os.chmod(staging, 0o755)
                if self.immutable:
                    kfs.set_immutable(img, True)
                _fsync_path(staging, directory=True)
                say(f"publishing {final}")
                try:
                    os.rename(staging, final)
                except OSError as e:
                    raise KernelError.from_oserror("publish cache entry", f"{staging} -> {final}", e) from None
                _fsync_path(self.root, directory=True)
            except BaseException:
                try:
                    if os.path.lexists(staging):
                        _rmtree(staging, "remove failed staging directory")
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

    def _populate(self, recipe: Recipe, staging: str, say: Progress) -> str | None:
        if isinstance(recipe, TreeRecipe):
            return os.path.abspath(recipe.source)
        tree = os.path.join(staging, "tree")
        os.mkdir(tree, 0o755)
        if os.geteuid() == 0:
            os.chown(tree, 0, 0)
        if isinstance(recipe, TarRecipe):
            say(f"unpacking {recipe.tarball}")
            cmd = ["tar", "-x", "-f", os.path.abspath(recipe.tarball), "-C", tree, "--numeric-owner",
                   "--same-permissions", "--xattrs", "--xattrs-include=*"]
            if os.geteuid() == 0:
                cmd.append("--same-owner")
            _run(cmd, "unpack tarball", recipe.tarball)
            return tree
        say(f"assembling {len(recipe.files)} file list entries")
        links: dict[tuple[int, int], str] = {}
        for src, dest in recipe.files:
            d = _clean_dest(dest)
            target = os.path.join(tree, d) if d else tree
            parent = os.path.dirname(target)
            try:
                _makedirs_owned(parent, tree)
                if not d:  # the root itself
                    if not os.path.isdir(src) or os.path.islink(src):
                        raise InvalidArgument(f"file list source {src} for destination / must be a directory",
                                              op="cache recipe", obj=src)
                    for name in sorted(os.listdir(src)):
                        _copy_node(os.path.join(src, name), os.path.join(tree, name), links)
                    s = os.stat(src)
                    os.chown(tree, s.st_uid, s.st_gid)
                    os.chmod(tree, stat.S_IMODE(s.st_mode))
                else:
                    _copy_node(src, target, links)
            except OSError as e:
                raise KernelError.from_oserror("copy file list entry", f"{src} -> /{d}", e) from None
        return tree

    def _mkfs(self, recipe: Recipe, mk: MkfsInfo, key: str, tree: str | None, img: str, say: Progress) -> None:
        kfs.create_sparse(img, recipe.capacity)
        fsuuid = str(uuid.UUID(key[:32]))
        env = _c_env()
        if recipe.fs == "ext4":
            cmd = [mk.path, "-F", "-q", "-U", fsuuid, "-E", f"hash_seed={fsuuid}", *recipe.mkfs_options]
            if tree is not None:
                cmd += ["-d", tree]
            env["E2FSPROGS_FAKE_TIME"] = str(FAKE_TIME)
        else:  # btrfs
            cmd = [mk.path, "-q", "-f", "-U", fsuuid, *recipe.mkfs_options]
            if tree is not None:
                cmd += ["--rootdir", tree]
        cmd.append(img)
        say(f"formatting {recipe.fs} image of {recipe.capacity} bytes")
        _run(cmd, f"build cache entry {key}: mkfs.{recipe.fs}", img, env=env,
             hint=f"is the capacity ({recipe.capacity} bytes) large enough for the content?")

    # removing
    def remove(self, key: str, *, timeout: float | None = None) -> bool:
        """Remove an entry (waiting for its lock); False when it was not there."""
        path = self.entry_path(key)
        if not os.path.lexists(path):
            return False
        self._ensure_dirs()
        with _KeyLock(self.lock_path(key), shared=False) as lk:
            lk.acquire(self.lock_timeout if timeout is None else timeout, f"cache entry {key}", None)
            if not os.path.lexists(path):
                return False
            _rmtree(path, "remove cache entry")
            return True

    def sweep(self) -> list[str]:
        """Remove staging debris whose builder is dead; keep a live peer's. Returns removed paths."""
        return self._sweep()

    def _sweep(self, only_key: str | None = None, locked_key: str | None = None) -> list[str]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise KernelError.from_oserror("list cache", self.root, e) from None
        removed: list[str] = []
        me = os.getpid()
        for name in sorted(names):
            path = os.path.join(self.root, name)
            pm = _PROBE_RE.match(name)
            if pm and only_key is None:
                if not _owner_alive(int(pm.group(1))):
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
            if pid == me:
                with _active_lock:
                    if path in _active_staging:
                        continue
            else:
                start = boot = None
                try:
                    with open(os.path.join(path, OWNER_NAME)) as f:
                        o = json.load(f)
                    if int(o.get("pid", -1)) == pid:
                        start, boot = o.get("start"), o.get("boot")
                except (OSError, ValueError, TypeError, AttributeError):
                    pass
                if _owner_alive(pid, start, boot):
                    continue
            if key == locked_key:
                _rmtree(path, "remove staging debris")
                removed.append(path)
                continue
            self._ensure_dirs()
            with _KeyLock(self.lock_path(key), shared=False) as lk:
                if not lk.try_acquire():
                    continue  # a builder of this key is running; next sweep
                if os.path.lexists(path):
                    _rmtree(path, "remove staging debris")
                    removed.append(path)
        return removed

    def clean_all(self) -> CleanResult:
        """Sweep debris, then remove every entry whose key lock is free; skip the others."""
        debris = self.sweep()
        removed: list[str] = []
        skipped: list[str] = []
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return CleanResult([], [], debris)
        except OSError as e:
            raise KernelError.from_oserror("list cache", self.root, e) from None
        for name in names:
            if not _KEY_RE.match(name):
                continue
            self._ensure_dirs()
            with _KeyLock(self.lock_path(name), shared=False) as lk:
                if not lk.try_acquire():
                    skipped.append(name)
                    continue
                path = os.path.join(self.root, name)
                if os.path.lexists(path):
                    _rmtree(path, "remove cache entry")
                    removed.append(name)
        return CleanResult(removed, skipped, debris)


def _makedirs_owned(path: str, top: str) -> None:
    """mkdir -p below ``top`` with 0755 (root-owned when we are root)."""
    if os.path.isdir(path):
        return
    _makedirs_owned(os.path.dirname(path), top)
    if os.path.lexists(path):
        os.unlink(path)  # a file where a directory must go: later entries win
    os.mkdir(path, 0o755)
    os.chmod(path, 0o755)


def recipe_signature(recipe: Recipe) -> str:
    """Only the stat signature of a recipe's inputs (no hashing of contents)."""
    if isinstance(recipe, TarRecipe):
        return _stat_sig(recipe.tarball)
    if isinstance(recipe, TreeRecipe):
        return _sig_tree(recipe.source)
    sig = hashlib.sha256()
    for src, _dest in recipe.files:
        if os.path.islink(src):
            _field(sig, src)
            _field(sig, os.readlink(src))
        else:
            _field(sig, _sig_tree(src))
    return sig.hexdigest()


def _sig_tree(root: str) -> str:
    sig = hashlib.sha256()
    for rel, _path, st in _walk(root):
        for v in (rel, st.st_ino, st.st_size, st.st_ctime_ns, st.st_mtime_ns, st.st_mode):
            _field(sig, v)
    return sig.hexdigest()


def _summary(recipe: Recipe) -> dict[str, Any]:
    if isinstance(recipe, TreeRecipe):
        return {"source": os.path.abspath(recipe.source), "mkfs_options": list(recipe.mkfs_options)}
    if isinstance(recipe, TarRecipe):
        return {"tarball": os.path.abspath(recipe.tarball), "mkfs_options": list(recipe.mkfs_options)}
    files = [[os.path.abspath(s), "/" + _clean_dest(d)] for s, d in recipe.files]
    out: dict[str, Any] = {"files": files[:100], "count": len(files), "mkfs_options": list(recipe.mkfs_options)}
    return out


__all__ = [
    "TemplateCache", "TreeRecipe", "TarRecipe", "FilesRecipe", "Recipe", "CacheEntry", "CacheResult",
    "CleanResult", "MkfsInfo", "cache_key", "tree_digest", "recipe_digest", "mkfs_fingerprint", "find_mkfs",
    "check_reflink", "check_same_filesystem", "lock_holders", "validate_key",
]
