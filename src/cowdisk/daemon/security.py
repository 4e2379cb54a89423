"""Who is calling, whether they may, and which paths a request may name.

The caller is whoever the kernel says opened the connection (``SO_PEERCRED``: uid, gid
and pid at connect time); nothing in the request can claim another identity. Access:

* the socket's own mode and group are the first gate (0660, group ``cowdisk``);
* with ``allow_uids``/``allow_gids`` set, only those uids, those primary or
  supplementary gids, and root may call; anyone else gets 403 and nothing changes;
* ids go through :func:`cowdisk.store.validate_id`, like the library's;
* a path in a request must resolve (symlinks followed) inside a configured root:
  import and build sources under ``import_roots``, jail directories under
  ``jail_roots``; a caller other than root must own the source it names.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

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


def under(path: str, roots: list[str]) -> str | None:
    """The root that ``path`` (resolved: symlinks and '..' followed) lies in, else None."""
    real = os.path.realpath(path)
    for r in roots:
        rr = os.path.realpath(r)
        if real == rr or real.startswith(rr.rstrip("/") + "/"):
            return rr
    return None


def check_path(path: str, roots: list[str], what: str, key: str, peer: Peer, *, owned: bool = False) -> str:
    """``path`` resolved, refused (403) unless it lies inside one of ``roots`` (and, with
    ``owned``, unless a caller other than root owns it)."""
    if not isinstance(path, str) or not path or "\0" in path or not os.path.isabs(path):
        raise Forbidden(f"{what} {path!r}: must be an absolute path", op=what, obj=repr(path))
    if not roots:
        raise Forbidden(f"{what} {path}: the daemon has no {key} configured", op=what, obj=path,
                        hint=f"set {key} in the daemon's config to the directories it may use")
    if under(path, roots) is None:
        raise Forbidden(f"{what} {path}: outside {', '.join(roots)}", op=what, obj=path,
                        hint=f"put it under one of the daemon's {key}")
    real = os.path.realpath(path)
    if owned and peer.uid != 0 and os.path.exists(real) and os.stat(real).st_uid != peer.uid:
        raise Forbidden(f"{what} {path}: owned by uid {os.stat(real).st_uid}, not by the caller (uid {peer.uid})",
                        op=what, obj=path)
    return real
