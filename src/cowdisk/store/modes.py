"""Private file modes: everything a store makes is root's alone, whatever the caller's umask.

The rule is one mask: no store file or directory grants anything to its group or to
others. Directories are ``0700``, files ``0600``, read-only files (template and cache
images, cache metadata) ``0400``. One exception, documented in docs/daemon.md: the store
root is ``0711`` (search only, no listing) when the daemon's default import root
``<root>/incoming`` lies under it, so that the socket's group can reach that directory;
nothing below the root is searchable by anyone but root.

Only the store's own names are walked (:data:`OWN`): a jail directory or an import root
someone put inside the store root is not the store's, and is left as it is.

An existing store is brought to these modes once per :data:`VERSION` (recorded as
``modes`` in ``store.json``), so an open does not walk a thousand volumes every time;
``cowdisk doctor`` walks it on every run and names any file wider than its mode.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from dataclasses import dataclass
from typing import Callable, Iterator

from ..errors import KernelError
from ..kernel import fs

log = logging.getLogger(__name__)

VERSION = 1
"""The file-mode rules' version; a store whose ``store.json`` records another is walked once."""
DIR = 0o700
FILE = 0o600
READ_ONLY = 0o400
"""Template images, cache images and cache metadata."""
ROOT_SEARCH = 0o711
"""The store root while the daemon's default import root lies under it."""
INCOMING = "incoming"
OWN = ("registry.db", "registry.db-wal", "registry.db-shm", "registry.db-journal", "registry.db.lock",
       "store.json", "reserve", "locks", "links", "templates", "volumes", "cache", "quarantine", "pool")
"""The names the store makes at its root and at its data root (its own: walked); ``registry.db.``
(damaged copies set aside by a rebuild) and ``store.json.`` (a temporary) prefixes too."""
_OWN_PREFIXES = ("registry.db.", "store.json.tmp-", "reserve.tmp-")


def allowed(path: str, root: str) -> int:
    """The widest mode bits ``path`` may have (the group and other bits it may grant)."""
    if os.path.abspath(path) == os.path.abspath(root) and os.path.isdir(os.path.join(root, INCOMING)):
        return ROOT_SEARCH
    return 0o700


def make_dirs(path: str) -> None:
    """``mkdir -p`` where every directory made is 0700, whatever the umask."""
    fs.makedirs_mode(path, DIR)


def open_private(path: str, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> int:
    """``os.open`` of a store file with mode 0600 (a file that exists keeps its mode)."""
    return os.open(path, flags | os.O_CLOEXEC, FILE)


@dataclass(frozen=True)
class Wide:
    """A store file or directory that grants more than its rule allows."""

    path: str
    mode: int
    allowed: int

    def __str__(self) -> str:
        return f"{self.path} {stat.S_IMODE(self.mode):04o} (allowed {self.allowed:04o})"


def _own(name: str) -> bool:
    return name in OWN or name.startswith(_OWN_PREFIXES)


def walk(root: str, data_root: str | None = None) -> Iterator[tuple[str, os.stat_result]]:
    """(path, lstat) of the store root and of everything of the store's own under it (and
    under ``data_root`` when that is elsewhere); symlinks are not followed, other mounts
    than the store's own (the pool's) are entered as the store made them."""
    tops = [os.path.abspath(root)]
    if data_root and os.path.abspath(data_root) not in tops:
        tops.append(os.path.abspath(data_root))
    seen: set[str] = set()
    for top in tops:
        try:
            st = os.lstat(top)
        except FileNotFoundError:
            continue
        if top not in seen:
            seen.add(top)
            yield top, st
        try:
            names = sorted(os.listdir(top))
        except OSError:
            continue
        for n in names:
            if _own(n):
                yield from _below(os.path.join(top, n), seen, tops)


def _below(path: str, seen: set[str], tops: list[str]) -> Iterator[tuple[str, os.stat_result]]:
    if path in seen:
        return
    seen.add(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    yield path, st
    if stat.S_ISDIR(st.st_mode):
        try:
            names = sorted(os.listdir(path))
        except OSError:
            return
        for n in names:
            p = os.path.join(path, n)
            if p in tops:  # the pool's mount point is the data root: walked as its own top
                continue
            yield from _below(p, seen, tops)


def wide(root: str, data_root: str | None = None) -> list[Wide]:
    """Every store file or directory whose mode grants more than its rule (what ``doctor`` reports)."""
    out = []
    for path, st in walk(root, data_root):
        if stat.S_ISLNK(st.st_mode):
            continue  # a symlink's own mode means nothing
        ok = allowed(path, root)
        if stat.S_IMODE(st.st_mode) & 0o077 & ~ok:
            out.append(Wide(path, st.st_mode, ok))
    return out


def make_private(root: str, data_root: str | None = None,
                 on_immutable: Callable[[str], None] | None = None) -> list[str]:
    """Take the group and other bits the rules do not allow from every store file and
    directory (owner bits are kept: a 0444 template image becomes 0400). An immutable file
    (chattr +i: templates) is made mutable, changed and made immutable again, then handed to
    ``on_immutable`` (its change time moved: the template's record is refreshed). Returns the
    paths changed. A file that cannot be changed is logged and left (doctor reports it)."""
    changed = []
    for w in wide(root, data_root):
        mode = stat.S_IMODE(w.mode) & ~(0o077 & ~w.allowed)
        try:
            try:
                os.chmod(w.path, mode, follow_symlinks=False)
            except PermissionError as e:
                if e.errno != errno.EPERM or not fs.is_immutable(w.path):
                    raise
                fs.set_immutable(w.path, False)
                try:
                    os.chmod(w.path, mode, follow_symlinks=False)
                finally:
                    fs.set_immutable(w.path, True)
                if on_immutable is not None:
                    on_immutable(w.path)
        except (OSError, KernelError) as e:
            log.warning("make store file private: chmod %04o %s: %s", mode, w.path, e)
            continue
        changed.append(w.path)
    if changed:
        log.info("store %s: %d files and directories made private (file-mode rules %d)", root, len(changed),
                 VERSION)
    return changed


def search_only_root(root: str) -> None:
    """The store root searchable (not listable) by others: only while the daemon's default
    import root lies under it (:func:`allowed`)."""
    with contextlib.suppress(OSError):
        st = os.stat(root)
        os.chmod(root, (stat.S_IMODE(st.st_mode) & 0o700) | 0o011)
