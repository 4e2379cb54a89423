"""Exceptions raised by cowdisk.

Every failure names the operation that failed, the object it failed on and, where
the kernel said why, the errno.  ``KernelError`` is an ``OSError`` so callers can
still test ``e.errno``; all cowdisk errors derive from ``CowdiskError`` and carry an
``exit_code`` the command line returns (documented in docs/cli.md).
"""

from __future__ import annotations

import errno as _errno
import os


class CowdiskError(Exception):
    """Base of every error cowdisk raises on purpose."""

    exit_code = 1

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

    def __str__(self) -> str:  # OSError.__str__ would print only errno/strerror
        return CowdiskError.__str__(self)

    @classmethod
    def from_oserror(cls, op: str, obj: str, exc: OSError, hint: str = "") -> "KernelError":
        return cls(op, obj, exc.errno or 0, hint=hint)


class InvalidArgument(CowdiskError):
    """Bad input from the caller (an invalid id, size, path...)."""

    exit_code = 2


class NotFound(CowdiskError):
    exit_code = 3


class AlreadyExists(CowdiskError):
    exit_code = 5


class InUse(CowdiskError):
    """The object is held by someone (a VM, a mount, volumes of a template)."""

    exit_code = 6


class StateError(CowdiskError):
    """The object is in a state that does not allow the operation."""

    exit_code = 7


class TemplateChanged(CowdiskError):
    """A template's bytes changed on disk since import: attaching it would corrupt volumes."""

    exit_code = 8


class Unsupported(CowdiskError):
    """This host (kernel, filesystem) cannot do what was asked."""

    exit_code = 9


class LockTimeout(CowdiskError):
    """A lock stayed held by another process past the deadline."""

    exit_code = 10


class SnapshotInvalid(CowdiskError):
    """A dm-snapshot turned Invalid (its COW overflowed or hit an I/O error)."""

    exit_code = 11


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


def message_of(e: BaseException) -> str:
    """An error's message without its hint (cowdisk errors), or ``str(e)`` (any other)."""
    return e.message if isinstance(e, CowdiskError) else str(e)


__all__ = [
    "message_of",
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
]
