"""mkfs for the cache: finding it, fingerprinting its version for the cache key, and
running it (and tar) reproducibly.

ext4 images are reproducible: the filesystem UUID and directory hash seed are derived
from the key and mke2fs runs with a fixed ``E2FSPROGS_FAKE_TIME``, so the same key gives
the same bytes again after a ``clean_all`` (file timestamps still come from the source).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import threading
import uuid
from dataclasses import dataclass

from ..errors import CowdiskError, KernelError, Unsupported
from ..kernel import fs as kfs
from ..kernel.creds import Identity
from ..progress import Progress

log = logging.getLogger(__name__)

FAKE_TIME = 1_700_000_000  # mke2fs timestamps, for reproducible ext4 images
_MKFS_PATH_EXTRA = ("/usr/local/sbin", "/usr/sbin", "/sbin")


@dataclass(frozen=True)
class MkfsInfo:
    fs: str
    path: str
    version: str  # first line of the version output
    fingerprint: str  # sha256 hex of the full version output (stdout + stderr)


_mkfs_memo: dict[tuple[str, int, int, int], MkfsInfo] = {}
_mkfs_memo_lock = threading.Lock()


def c_env() -> dict[str, str]:
    """The environment tools run in: C locale, sbin directories on PATH."""
    env = dict(os.environ)
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    env["PATH"] = os.pathsep.join([env.get("PATH", "/usr/bin:/bin"), *_MKFS_PATH_EXTRA])
    return env


HEARTBEAT_S = 0.2


def run(cmd: list[str], op: str, obj: str, env: dict[str, str] | None = None,
        hint: str = "", progress: Progress | None = None, *, user: Identity | None = None,
        pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[bytes]:
    """Run a tool (in :func:`c_env` unless ``env`` is given); a non-zero exit raises with
    the last lines of its output.

    ``user``: the tool runs as that uid, gid and those supplementary groups (set in the
    child before its exec), so the kernel checks what it reads as that user's. ``pass_fds``:
    descriptors the tool reaches through ``/proc/self/fd/N`` (the same numbers in it).

    With ``progress``, the wait is a heartbeat: ``progress(0, 0)`` every
    :data:`HEARTBEAT_S` seconds (a terminal's spinner moves; a daemon job sees it is alive).
    A progress callback that raises (a cancelled job) ends the tool: SIGKILL to the child
    this call started, reaped, then the exception goes on and the caller's failure path
    removes what the tool half made."""
    log.debug("%s %s: %s", op, obj, " ".join(cmd))
    try:
        as_user: dict[str, object] = {}
        if user is not None and not user.is_root:
            as_user = {"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)}
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env or c_env(),
                             stdin=subprocess.DEVNULL, pass_fds=pass_fds, cwd="/", **as_user)  # type: ignore[call-overload]
    except OSError as e:
        raise KernelError.from_oserror(op, cmd[0], e) from None
    with p:
        try:
            while True:
                try:
                    out, err = p.communicate(timeout=HEARTBEAT_S if progress is not None else None)
                    break
                except subprocess.TimeoutExpired:
                    assert progress is not None
                    progress(0, 0)
        except BaseException:
            p.kill()
            p.communicate()
            log.info("%s %s: %s ended early (PID %d killed)", op, obj, os.path.basename(cmd[0]), p.pid)
            raise
    r = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).decode(errors="replace").strip().splitlines()[-6:]
        raise CowdiskError(f"{op} {obj}: {os.path.basename(cmd[0])} exited {r.returncode}: " + " | ".join(tail),
                           op=op, obj=obj, hint=hint)
    return r


def find_mkfs(fs: str) -> str:
    name = f"mkfs.{fs}"
    path = shutil.which(name, path=c_env()["PATH"])
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
        r = subprocess.run([path, "-V"], capture_output=True, env=c_env(), timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CowdiskError(f"run {path} -V for the cache key fingerprint: {e}", op="mkfs fingerprint",
                           obj=path) from None
    out = r.stdout + r.stderr
    if r.returncode != 0 or not out.strip():
        raise CowdiskError(f"{path} -V exited {r.returncode} with output {out[:200]!r}: cannot fingerprint it "
                           "for the cache key", op="mkfs fingerprint", obj=path)
    info = MkfsInfo(fs, path, out.decode(errors="replace").strip().splitlines()[0],
                    hashlib.sha256(out).hexdigest())
    with _mkfs_memo_lock:
        _mkfs_memo[memo_key] = info
    return info


def make_image(mk: MkfsInfo, key: str, img: str, capacity: int, tree: str | None,
               options: tuple[str, ...] = (), progress: Progress | None = None, *,
               reader: Identity | None = None) -> None:
    """Create the sparse file ``img`` of ``capacity`` bytes and format it with ``mk``,
    populated from ``tree`` when given; UUID (and ext4 hash seed) derived from ``key``.

    ``reader``: mkfs runs as that user (it reads ``tree``, a caller's source, with the
    caller's rights), writing the image through a descriptor passed to it: the image is
    the reader's while mkfs runs (in the builder's private staging directory, reached by
    no path the reader can search) and root's again after."""
    kfs.create_sparse(img, capacity)
    if reader is not None and not reader.is_root:
        fd = os.open(img, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.fchown(fd, reader.uid, reader.gid)
            try:
                _mkfs(mk, key, f"/proc/self/fd/{fd}", capacity, tree, options, progress, reader,
                      (fd, *proc_fds(tree)), shown=img)
            finally:
                os.fchown(fd, os.geteuid(), os.getegid())
        finally:
            os.close(fd)
        return
    _mkfs(mk, key, img, capacity, tree, options, progress, None, proc_fds(tree), shown=img)


def proc_fds(path: str | None) -> tuple[int, ...]:
    """The descriptor a ``/proc/self/fd/N[/...]`` path goes through (a tool given that path
    must be given the descriptor too); () for any other path."""
    if path and path.startswith("/proc/self/fd/"):
        n = path[len("/proc/self/fd/"):].split("/", 1)[0]
        return (int(n),) if n.isdigit() else ()
    return ()


def _mkfs(mk: MkfsInfo, key: str, img: str, capacity: int, tree: str | None, options: tuple[str, ...],
          progress: Progress | None, reader: Identity | None, fds: tuple[int, ...], *, shown: str) -> None:
    fsuuid = str(uuid.UUID(key[:32]))
    env = c_env()
    if mk.fs == "ext4":
        cmd = [mk.path, "-F", "-q", "-U", fsuuid, "-E", f"hash_seed={fsuuid}", *options]
        if tree is not None:
            cmd += ["-d", tree]
        env["E2FSPROGS_FAKE_TIME"] = str(FAKE_TIME)
    else:  # btrfs
        cmd = [mk.path, "-q", "-f", "-U", fsuuid, *options]
        if tree is not None:
            cmd += ["--rootdir", tree]
    cmd.append(img)
    run(cmd, f"build cache entry {key}: mkfs.{mk.fs}", shown, env=env,
        hint=f"is the capacity ({capacity} bytes) large enough for the content?", progress=progress,
        user=reader, pass_fds=fds)
