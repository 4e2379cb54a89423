"""The store: one state root on a host, and the only way callers change it.

``Store`` (core.py) is the facade; parts.py is what its operations and recovery share
(registry, backend, paths, locks, links, teardown); templates.py imports, builds and verifies templates;
transition.py declares every state change of a volume and runs it; recovery.py undoes or
finishes interrupted operations and reconciles the registry with the kernel and the files;
model.py is the plain data handed to callers; modes.py keeps every store file private;
sources.py opens a path a caller names once, with the caller's rights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .model import DEFAULT_ROOT, RecoveryReport, Template, Volume, default_root, fork_ids, validate_id

if TYPE_CHECKING:
    from ..backends import BACKENDS
    from .core import Store, choose_backend, explain_backend, release_pool
    from .manifest import store_exists
    from .remote import remote_listing
    from .sources import Caller, sudo_caller

_LAZY = {"BACKENDS": "..backends", "Store": ".core", "choose_backend": ".core", "explain_backend": ".core",
         "release_pool": ".core", "store_exists": ".manifest", "remote_listing": ".remote", "Caller": ".sources",
         "sudo_caller": ".sources"}


def __getattr__(name: str) -> Any:
    """The heavy names (the Store and everything under it) are imported when first used, so
    that ``cowdisk.store.model`` and ``cowdisk.store.manifest`` stay cheap to import (the
    command line's start-up)."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


__all__ = ["BACKENDS", "Store", "Template", "Volume", "RecoveryReport", "DEFAULT_ROOT", "default_root", "fork_ids",
           "validate_id", "choose_backend", "explain_backend", "release_pool", "store_exists",
           "remote_listing", "Caller", "sudo_caller"]
