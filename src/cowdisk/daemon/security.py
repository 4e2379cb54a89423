"""Who is calling, whether they may, and which paths a request may name.

The caller is whoever the kernel says opened the connection (``SO_PEERCRED``: uid, gid
and pid at connect time); nothing in the request can claim another identity. Access:

* the socket's own mode and group are the first gate (0660, group ``cowdisk``);
* with ``allow_uids``/``allow_gids`` set, only those uids, those primary or
  supplementary gids, and root may call; anyone else gets 403 and nothing changes;
* ids go through :func:`cowdisk.store.validate_id`, like the library's;
* a path in a request must name (by its name alone, '..' taken lexically) a place inside
  a configured root: import and build sources under ``import_roots``, jail directories
  under ``jail_roots`` (403 otherwise, before anything runs). The store then opens it
  once, beneath that root, without following any symlink, with the caller's uid, gid and
  groups (:func:`caller_of`, ``store/sources.py``), and reads it through that descriptor
  with the caller's rights: what the caller may not read is refused with EACCES
  (:func:`refused`: 403), a symlink anywhere in the path with ELOOP;
* a jail's uid and gid may only be the caller's own (its uid; its gid or one of its
  groups) unless the caller is root (:func:`check_jail_ids`).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass

from ..errors import KernelError
from ..kernel.creds import Identity
from ..store.sources import Caller
from .config import Config
from ..errors import Forbidden

_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int

    def as_dict(self) -> dict[str, int]:
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid}


UNKNOWN = Peer(0, -1, -1)


def peercred(sock: socket.socket) -> Peer:
    """The process at the other end of a unix socket connection, as the kernel saw it connect."""
    try:
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except (OSError, struct.error):
        return UNKNOWN
    return Peer(pid, uid, gid)


def supplementary_gids(pid: int) -> set[int]:
    """The caller's supplementary groups from /proc (empty if it is gone already)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def check_peer(peer: Peer, cfg: Config) -> None:
    """Refuse (403) a caller the allowlist does not name. Root is always allowed."""
    if not cfg.allow_uids and not cfg.allow_gids:
        return
    if peer.uid == 0 or peer.uid in cfg.allow_uids or peer.gid in cfg.allow_gids:
        return
    if cfg.allow_gids and supplementary_gids(peer.pid) & set(cfg.allow_gids):
        return
    raise Forbidden(f"uid {peer.uid} gid {peer.gid} (PID {peer.pid}) is not allowed to call this daemon",
                    op="authorize", obj=f"uid {peer.uid}",
                    hint="add the uid or a group of the caller to allow_uids/allow_gids in the daemon's config")


def caller_of(peer: Peer, roots: list[str]) -> Caller:
    """The store's :class:`~cowdisk.store.sources.Caller` for ``peer``: its uid, gid and
    supplementary groups (from /proc at request time), and ``roots`` to stay beneath."""
    groups = tuple(sorted(supplementary_gids(peer.pid))) if peer.pid > 0 else ()
    return Caller(Identity(peer.uid, peer.gid, groups), tuple(roots))


def check_path(path: str, roots: list[str], what: str, key: str) -> str:
    """``path`` normalised, refused (403) unless its name lies inside one of ``roots``.
    Nothing is looked up here: the store opens it once, beneath that root, as the caller."""
    if not isinstance(path, str) or not path or "\0" in path or not os.path.isabs(path):
        raise Forbidden(f"{what} {path!r}: must be an absolute path", op=what, obj=repr(path))
    if not roots:
        raise Forbidden(f"{what} {path}: the daemon has no {key} configured", op=what, obj=path,
                        hint=f"set {key} in the daemon's config to the directories it may use")
    p = os.path.normpath(path)
    for r in roots:
        rr = os.path.normpath(r)
        if p == rr or p.startswith(rr.rstrip("/") + "/"):
            return p
    raise Forbidden(f"{what} {path}: outside {', '.join(roots)}", op=what, obj=path,
                    hint=f"put it under one of the daemon's {key}")


REFUSALS = frozenset({errno.EACCES, errno.EPERM, errno.ELOOP, errno.EXDEV})


def refused(e: BaseException, what: str, path: str) -> BaseException:
    """A store error opening or reading the caller's ``path`` as the caller (EACCES, EPERM,
    ELOOP, EXDEV: on the path itself or on a file beneath it) as the 403 it is, its message
    (which names the errno and the file) kept; any other error as it is."""
    if isinstance(e, KernelError) and e.errno in REFUSALS and (e.op.startswith(("open ", "jail"))
                                                                or e.obj.startswith(path)):
        return Forbidden(f"{what}: {e.message}", op=what, obj=e.obj, hint=e.hint)
    return e


def check_jail_ids(peer: Peer, uid: int | None, gid: int | None) -> None:
    """A jail's node owned by the caller's own ids only, unless the caller is root (403)."""
    if peer.uid == 0:
        return
    if uid is not None and uid != peer.uid:
        raise Forbidden(f"jail: uid {uid} is not the caller's (uid {peer.uid}); only root may jail for another uid",
                        op="jail", obj=f"uid {uid}")
    if gid is not None and gid != peer.gid and gid not in supplementary_gids(peer.pid):
        raise Forbidden(f"jail: gid {gid} is not one of the caller's groups (uid {peer.uid} gid {peer.gid}); only "
                        "root may jail for another group", op="jail", obj=f"gid {gid}")
