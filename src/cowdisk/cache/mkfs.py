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
        hint: str = "", progress: Progress | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a tool (in :func:`c_env` unless ``env`` is given); a non-zero exit raises with
    the last lines of its output.

    With ``progress``, the wait is a heartbeat: ``progress(0, 0)`` every
    :data:`HEARTBEAT_S` seconds (a terminal's spinner moves; a daemon job sees it is alive).
    A progress callback that raises (a cancelled job) ends the tool: SIGKILL to the child
    this call started, reaped, then the exception goes on and the caller's failure path
    removes what the tool half made."""
    log.debug("%s %s: %s", op, obj, " ".join(cmd))
    try:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env or c_env(),
                             stdin=subprocess.DEVNULL)
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
               options: tuple[str, ...] = (), progress: Progress | None = None) -> None:
    """Create the sparse file ``img`` of ``capacity`` bytes and format it with ``mk``,
    populated from ``tree`` when given; UUID (and ext4 hash seed) derived from ``key``."""
    kfs.create_sparse(img, capacity)
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
    run(cmd, f"build cache entry {key}: mkfs.{mk.fs}", img, env=env,
        hint=f"is the capacity ({capacity} bytes) large enough for the content?", progress=progress)
