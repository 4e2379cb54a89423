"""Paths a caller names (import and build sources, jail directories): opened once, with
the caller's rights, and used through that descriptor from then on.

A :class:`Caller` says whose rights the open is made with (an
:class:`~cowdisk.kernel.creds.Identity`: uid, gid, groups) and, for the daemon, which
directories the path must stay beneath (its ``import_roots`` or ``jail_roots``).
:func:`open_path` then

* with roots: opens the root (the daemon's own setting) and the rest of the path beneath
  it with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)``: no '..' out of it, no
  symlink anywhere in the path, whoever made it;
* opens it with the caller's filesystem identity on this thread
  (:func:`~cowdisk.kernel.creds.fs_identity`), so the kernel checks every directory
  searched and the object opened as the caller: a file the caller may not read is EACCES
  here, named in the error;
* returns the descriptor; everything after reads through ``/proc/self/fd/N`` (the
  in-process digest walks with the same identity, the tools run as the caller with the
  descriptor passed to them: :mod:`cowdisk.cache`), so a source swapped for a symlink
  after the open changes nothing.

The store applies it to the calls made inside :meth:`Store.reading_as(caller)
<cowdisk.store.core.Store.reading_as>` (a per-thread setting: the one contract's signatures
stay the same for every face). Who the caller is, is the caller layer's decision: the daemon takes it from
``SO_PEERCRED`` (``daemon/security.py``); the command line run through ``sudo`` reads as
the user who ran sudo (:func:`sudo_caller`); the library, and root's own command line,
read with the process's own rights (the library trusts its caller).
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from dataclasses import dataclass
from typing import Mapping

from ..errors import CowdiskError, InvalidArgument, KernelError
from ..kernel.creds import RESOLVE_BENEATH, RESOLVE_NO_SYMLINKS, Identity, fs_identity, openat2

PROC_FD = "/proc/self/fd/"


@dataclass(frozen=True)
class Caller:
    """Who names a path: ``identity`` (None: the process's own rights) and ``roots`` (the
    path must lie beneath one of them; None: anywhere)."""

    identity: Identity | None = None
    roots: tuple[str, ...] | None = None

    @property
    def trusted(self) -> bool:
        """Reads with root's rights (the library, root's command line, a root peer)."""
        return self.identity is None or self.identity.is_root


def sudo_caller(env: Mapping[str, str] | None = None) -> Caller | None:
    """The command line run as root through ``sudo``: the user who ran it (``SUDO_UID``,
    ``SUDO_GID`` and that user's groups), so that ``sudo cowdisk template build DIR`` reads
    DIR with that user's rights, not root's. ``SUDO_UID`` is set by sudo itself (root
    alone can set it otherwise, and root is trusted anyway); without it, or as a user
    other than root, None (the process's own rights). ``env -u SUDO_UID`` reads as root."""
    env = os.environ if env is None else env
    if os.geteuid() != 0 or not env.get("SUDO_UID", "").isdigit():
        return None
    uid = int(env["SUDO_UID"])
    if uid == 0:
        return None
    gid = int(env["SUDO_GID"]) if env.get("SUDO_GID", "").isdigit() else uid
    try:
        groups = tuple(sorted(set(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))))
    except KeyError:
        groups = (gid,)
    return Caller(Identity(uid, gid, groups))


class Opened:
    """A path opened once: ``fd`` (closed by :meth:`close` or the ``with`` block), its
    ``st``, ``path`` as the caller named it and ``proc`` (``/proc/self/fd/N``) to reach it by."""

    def __init__(self, path: str, fd: int, identity: Identity | None) -> None:
        self.path = path
        self.fd = fd
        self.identity = identity
        self.st = os.fstat(fd)

    @property
    def proc(self) -> str:
        return f"{PROC_FD}{self.fd}"

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.st.st_mode)

    def named(self, e: CowdiskError) -> CowdiskError:
        """``e`` with ``/proc/self/fd/N`` in its message and object put back as the path the
        caller named (what a digest walk or a tool reports is the descriptor's path)."""
        proc = self.proc
        if proc not in str(e) and proc not in e.obj:
            return e
        try:
            if isinstance(e, KernelError):
                return KernelError(e.op.replace(proc, self.path), e.obj.replace(proc, self.path), e.errno or 0,
                                   detail=e.detail.replace(proc, self.path), hint=e.hint)
            return type(e)(e.message.replace(proc, self.path), op=e.op, obj=e.obj.replace(proc, self.path),
                           hint=e.hint)
        except TypeError:  # an error type with another constructor: as it is
            return e

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Opened":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_WHY = {
    errno.ELOOP: "a symlink in the path: paths under the daemon's roots are opened without following any",
    errno.EXDEV: "it leads out of the daemon's root",
    errno.EACCES: "the caller may not reach or read it",
    errno.EPERM: "the caller may not reach or read it",
}


def open_path(path: str, what: str, caller: Caller | None, *, directory: bool = False) -> Opened:
    """Open ``path`` once as ``caller`` (see the module docstring): read-only, or with
    ``directory`` an O_PATH descriptor of a directory (a jail). Raises KernelError
    ("open <what>", path, errno) naming why, or InvalidArgument for a path that is not
    absolute or not under the caller's roots."""
    caller = caller or Caller()
    if not isinstance(path, str) or not path or "\0" in path:
        raise InvalidArgument(f"{what} {path!r}: not a path", op=f"open {what}", obj=repr(path))
    named = path
    path = os.path.abspath(path)
    flags = (os.O_PATH | os.O_DIRECTORY) if directory else (os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    ident = caller.identity
    if caller.roots is None:
        with fs_identity(ident):
            try:
                fd = os.open(path, flags | os.O_CLOEXEC)
            except OSError as e:
                raise _refused(what, named, e.errno or 0, ident) from None
    else:
        root, rel = _beneath(path, caller.roots, what)
        try:
            rfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise KernelError(f"open {what}", root, e.errno or 0, detail="the daemon's root") from None
        try:
            with fs_identity(ident):
                fd = openat2(rfd, rel or ".", flags, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)
        except KernelError as e:
            raise _refused(what, named, e.errno or 0, ident) from None
        finally:
            os.close(rfd)
    o = Opened(named, fd, ident)
    if directory and not o.is_dir:
        o.close()
        raise KernelError(f"open {what}", named, errno.ENOTDIR)
    return o


def _refused(what: str, path: str, err: int, ident: Identity | None) -> KernelError:
    detail = _WHY.get(err, "")
    if err in (errno.EACCES, errno.EPERM) and ident is not None:
        detail += f" ({ident})"
    return KernelError(f"open {what}", path, err, detail=detail)


def _beneath(path: str, roots: tuple[str, ...], what: str) -> tuple[str, str]:
    """(root, path relative to it) for the first root ``path`` lies under, by its name alone
    ('..' taken lexically; symlinks are refused by the open, not followed here)."""
    p = os.path.normpath(path)
    for r in roots:
        rr = os.path.normpath(r)
        if p == rr:
            return rr, ""
        if p.startswith(rr.rstrip("/") + "/"):
            return rr, os.path.relpath(p, rr)
    raise KernelError(f"open {what}", path, errno.EXDEV, detail=f"not under {', '.join(roots)}")


__all__ = ["Caller", "Identity", "Opened", "open_path", "sudo_caller", "PROC_FD"]
