"""What the daemon and its clients agree on, without a web framework: the API's paths,
the default socket, the error document and the HTTP status of each error type.

The error document is the one the command line prints with ``--json``::

    {"error": {"type": "NotFound", "exit_code": 3, "message": "...", "hint": "...",
               "op": "get volume", "object": "vm1", "errno": null, "notes": []}}

:func:`error_document` makes it from an exception, :func:`error_from_document` makes
the same exception type again on the client side (unknown types become
:class:`~cowdisk.errors.CowdiskError` with the document's exit code).
"""

from __future__ import annotations

import errno as _errno
from typing import Any

from .. import errors
from ..errors import CowdiskError, KernelError, message_of

API = "/v1"
"""Prefix of every operation (``/metrics`` and ``/openapi.json`` stand outside it)."""

DEFAULT_SOCKET = "/run/cowdisk/cowdisk.sock"
DEFAULT_CONFIG = "/etc/cowdisk/cowdisk.toml"


class Forbidden(CowdiskError):
    """The caller (its uid/gid from SO_PEERCRED) is not allowed, or the request names a
    path outside what the daemon is configured to touch."""

    exit_code = 20


class Cancelled(CowdiskError):
    """A job was cancelled; what it had made is undone."""

    exit_code = 21


class Unavailable(CowdiskError):
    """No daemon answers on the socket, or it is shutting down."""

    exit_code = 22


class WorkerDied(CowdiskError):
    """The daemon's store worker running the request died during it (killed, out of
    memory); the daemon ran recovery before answering, and the message says what it did."""

    exit_code = 23


ERROR_TYPES: dict[str, type[CowdiskError]] = {
    name: getattr(errors, name) for name in errors.__all__
    if isinstance(getattr(errors, name), type) and issubclass(getattr(errors, name), CowdiskError)
}
ERROR_TYPES.update(Forbidden=Forbidden, Cancelled=Cancelled, Unavailable=Unavailable, WorkerDied=WorkerDied)

STATUS: dict[str, int] = {
    "InvalidArgument": 400,
    "Forbidden": 403,
    "NotFound": 404,
    "AlreadyExists": 409,
    "InUse": 409,
    "StateError": 409,
    "TemplateChanged": 409,
    "SnapshotInvalid": 409,
    "Cancelled": 409,
    "LockTimeout": 423,
    "Unsupported": 501,
    "Unavailable": 503,
    "WorkerDied": 500,
    "CowFormatError": 500,
    "KernelError": 500,
    "CowdiskError": 500,
}
"""HTTP status by error type; a kernel error whose errno says the disk is full is 507."""

NO_SPACE = frozenset({_errno.ENOSPC, _errno.EDQUOT})


def status_of(e: BaseException) -> int:
    if isinstance(e, KernelError) and e.errno in NO_SPACE:
        return 507
    if isinstance(e, CowdiskError) and not isinstance(e, KernelError) and "full" in str(e) and "space" in e.hint:
        return 507  # the registry's "database or disk is full"
    for cls in type(e).__mro__:
        if cls.__name__ in STATUS:
            return STATUS[cls.__name__]
    return 500


def error_document(e: BaseException) -> dict[str, Any]:
    """The ``{"error": {...}}`` document of ``e`` (the CLI's ``--json`` error)."""
    code = getattr(e, "exit_code", 1)
    return {"error": {
        "type": type(e).__name__, "exit_code": code, "message": message_of(e),
        "hint": getattr(e, "hint", "") or "", "op": getattr(e, "op", "") or "",
        "object": getattr(e, "obj", "") or "", "errno": getattr(e, "errno", None),
        "notes": [str(n) for n in getattr(e, "__notes__", ())]}}


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
    if cls is KernelError:
        e = KernelError.__new__(KernelError)
        CowdiskError.__init__(e, msg, op=op, obj=obj, hint=hint)
        e.errno = err.get("errno") or 0
        e.strerror = ""
        e.detail = ""
    else:
        e = cls(msg, op=op, obj=obj, hint=hint)
        if cls is CowdiskError and err.get("exit_code") not in (None, 1):
            e.exit_code = int(err["exit_code"])
    for n in err.get("notes") or ():
        e.add_note(str(n))
    return e
