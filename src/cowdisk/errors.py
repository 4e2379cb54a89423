"""Exceptions raised by cowdisk.

Every failure names the operation that failed, the object it failed on and, where
the kernel said why, the errno.  ``KernelError`` is an ``OSError`` so callers can
still test ``e.errno``; all cowdisk errors derive from ``CowdiskError`` and carry an
``exit_code`` the command line returns (documented in docs/cli.md) and an
``http_status`` the daemon answers with (docs/daemon.md).

The error document is what every face gives for an error: the command line prints it
with ``--json``, the daemon answers with it, and its client raises the same type again::

    {"error": {"type": "NotFound", "exit_code": 3, "message": "...", "hint": "...",
               "op": "get volume", "object": "vm1", "errno": null, "notes": []}}

:func:`error_document` makes it from an exception, :func:`error_from_document` makes
the same exception type again (unknown types become :class:`CowdiskError` with the
document's exit code).
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Any

NO_SPACE = frozenset({_errno.ENOSPC, _errno.EDQUOT})
"""Errnos that say the disk (or a quota) is full: a KernelError with one is HTTP 507."""


class CowdiskError(Exception):
    """Base of every error cowdisk raises on purpose."""

    exit_code = 1
    http_status = 500
    """What the daemon answers with for this error."""

    def __init__(self, message: str, *, op: str = "", obj: str = "", hint: str = "") -> None:
        self.op = op
        self.obj = obj
        self.hint = hint
        self.message = message
        """The message without the hint (``str(e)`` has both)."""
        full = message
        if hint:
            full = f"{message} ({hint})"
        Exception.__init__(self, full)


class KernelError(CowdiskError, OSError):
    """A kernel call failed: ``op`` on ``obj`` with ``errno``."""

    exit_code = 4

    def __init__(self, op: str, obj: str, err: int, detail: str = "", hint: str = "") -> None:
        strerror = os.strerror(err) if err else ""
        name = _errno.errorcode.get(err, str(err))
        msg = f"{op} {obj}: {name}: {strerror}"
        if detail:
            msg += f": {detail}"
        CowdiskError.__init__(self, msg, op=op, obj=obj, hint=hint)
        # set after the base __init__: OSError's constructor would reset them
        self.errno = err
        self.strerror = strerror
        self.detail = detail
        if err in NO_SPACE:
            self.http_status = 507

    def __str__(self) -> str:  # OSError.__str__ would print only errno/strerror
        return CowdiskError.__str__(self)

    @classmethod
    def from_oserror(cls, op: str, obj: str, exc: OSError, hint: str = "") -> "KernelError":
        return cls(op, obj, exc.errno or 0, hint=hint)


class InvalidArgument(CowdiskError):
    """Bad input from the caller (an invalid id, size, path...)."""

    exit_code = 2
    http_status = 400


class NotFound(CowdiskError):
    exit_code = 3
    http_status = 404


class AlreadyExists(CowdiskError):
    exit_code = 5
    http_status = 409


class InUse(CowdiskError):
    """The object is held by someone (a VM, a mount, volumes of a template)."""

    exit_code = 6
    http_status = 409


class StateError(CowdiskError):
    """The object is in a state that does not allow the operation."""

    exit_code = 7
    http_status = 409


class TemplateChanged(CowdiskError):
    """A template's bytes changed on disk since import: attaching it would corrupt volumes."""

    exit_code = 8
    http_status = 409


class Unsupported(CowdiskError):
    """This host (kernel, filesystem) cannot do what was asked."""

    exit_code = 9
    http_status = 501


class LockTimeout(CowdiskError):
    """A lock stayed held by another process past the deadline."""

    exit_code = 10
    http_status = 423


class SnapshotInvalid(CowdiskError):
    """A dm-snapshot turned Invalid (its COW overflowed or hit an I/O error)."""

    exit_code = 11
    http_status = 409


class CowFormatError(CowdiskError):
    """A dm-snapshot COW file is unreadable, corrupt or unusable for the operation
    (read offline by :mod:`cowdisk.cowformat`)."""

    exit_code = 12


class RegistryDamaged(CowdiskError):
    """The store's registry is damaged or lost; its volumes and templates are still on disk
    with their manifests, and ``cowdisk recover --rebuild-registry`` rebuilds it."""

    exit_code = 13


class RemoteError(KernelError):
    """The object store failed, refused or timed out (``errno``: ETIMEDOUT, ECONNREFUSED,
    EACCES, ENOENT...), or what it sent failed its check (EIO: a chunk or manifest whose
    SHA-256 is not its name). Never a silent fallback: the caller gets the error."""


class Forbidden(CowdiskError):
    """The caller (its uid/gid from SO_PEERCRED) is not allowed, the request names a path
    outside what the daemon is configured to touch, or only root may do this (hand a volume
    or template to another owner, share a template, maintenance of the whole store)."""

    exit_code = 20
    http_status = 403


class Cancelled(CowdiskError):
    """A job was cancelled; what it had made is undone."""

    exit_code = 21
    http_status = 409


class Unavailable(CowdiskError):
    """No daemon answers on the socket, or it is shutting down."""

    exit_code = 22
    http_status = 503


class WorkerDied(CowdiskError):
    """The daemon's store worker running the request died during it (killed, out of
    memory); the daemon ran recovery before answering, and the message says what it did."""

    exit_code = 23


def message_of(e: BaseException) -> str:
    """An error's message without its hint (cowdisk errors), or ``str(e)`` (any other)."""
    return e.message if isinstance(e, CowdiskError) else str(e)


def error_document(e: BaseException) -> dict[str, Any]:
    """The ``{"error": {...}}`` document of ``e`` (the CLI's ``--json`` error)."""
    code = getattr(e, "exit_code", 1)
    return {"error": {
        "type": type(e).__name__, "exit_code": code, "message": message_of(e),
        "hint": getattr(e, "hint", "") or "", "op": getattr(e, "op", "") or "",
        "object": getattr(e, "obj", "") or "", "errno": getattr(e, "errno", None),
        "notes": [str(n) for n in getattr(e, "__notes__", ())]}}


def status_of(e: BaseException) -> int:
    """The HTTP status the daemon answers ``e`` with (500 for what is not a cowdisk error)."""
    return e.http_status if isinstance(e, CowdiskError) else 500


def error_from_document(doc: dict[str, Any], status: int = 500) -> CowdiskError:
    """The exception an error document stands for (the same type where cowdisk knows it)."""
    err = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(err, dict):
        return CowdiskError(f"daemon answered HTTP {status} without an error document: {doc!r:.200}",
                            op="call daemon")
    cls = ERROR_TYPES.get(str(err.get("type")), CowdiskError)
    msg = str(err.get("message", ""))
    op, obj, hint = str(err.get("op", "")), str(err.get("object", "")), str(err.get("hint", ""))
    e: CowdiskError
    if issubclass(cls, KernelError):  # (its constructor takes op, obj, errno)
        e = cls.__new__(cls)
        CowdiskError.__init__(e, msg, op=op, obj=obj, hint=hint)
        assert isinstance(e, KernelError)
        e.errno = err.get("errno") or 0
        e.strerror = ""
        e.detail = ""
        if e.errno in NO_SPACE:
            e.http_status = 507
    else:
        e = cls(msg, op=op, obj=obj, hint=hint)
        if cls is CowdiskError and err.get("exit_code") not in (None, 1):
            e.exit_code = int(err["exit_code"])
    for n in err.get("notes") or ():
        e.add_note(str(n))
    return e


__all__ = [
    "message_of",
    "error_document",
    "error_from_document",
    "status_of",
    "CowdiskError",
    "KernelError",
    "InvalidArgument",
    "NotFound",
    "AlreadyExists",
    "InUse",
    "StateError",
    "TemplateChanged",
    "Unsupported",
    "LockTimeout",
    "SnapshotInvalid",
    "CowFormatError",
    "RegistryDamaged",
    "RemoteError",
    "Forbidden",
    "Cancelled",
    "Unavailable",
    "WorkerDied",
]

ERROR_TYPES: dict[str, type[CowdiskError]] = {
    name: obj for name, obj in list(globals().items())
    if isinstance(obj, type) and issubclass(obj, CowdiskError)
}
"""Every cowdisk error type by name: what :func:`error_from_document` raises again."""
