"""The store: one state root on a host, and the only way callers change it.

``Store`` (core.py) is the facade; parts.py is what its operations and recovery share
(registry, backend, paths, locks, links, teardown); templates.py imports, builds and verifies templates;
transition.py declares every state change of a volume and runs it; recovery.py undoes or
finishes interrupted operations and reconciles the registry with the kernel and the files;
model.py is the plain data handed to callers.
"""

from ..backends import BACKENDS
from .core import Store, choose_backend, explain_backend, release_pool, store_exists
from .model import DEFAULT_ROOT, RecoveryReport, Template, Volume, default_root, validate_id

__all__ = ["BACKENDS", "Store", "Template", "Volume", "RecoveryReport", "DEFAULT_ROOT", "default_root", "validate_id",
           "choose_backend", "explain_backend", "release_pool", "store_exists"]
