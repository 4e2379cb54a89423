"""Manifests: small JSON files beside each volume's and template's data that say what it is,
so that the registry can be rebuilt from the disk after it was lost or damaged.

* ``<root>/store.json``: the store's id (its kernel objects carry it), backend and options.
* ``volumes/<id>/manifest.json``: id, template and its digest, backend, state, size,
  device (and whether it is a block device), parent, links; written each time a volume
  reaches a done state (attached, checkpointed, error), so a volume caught half-made has
  none and goes to the quarantine, and any other comes back at its last done state.
* ``templates/<id>/manifest.json``: id, digest, size, names, owned, source.

Each is written to a temporary name and renamed over the old one, so a reader sees a whole
old or a whole new manifest, never a torn one. They are a backup of the registry, which
stays the truth while it is readable: recovery reads a manifest only for data the registry
does not account for (it then adopts that data instead of quarantining it).
"""

from __future__ import annotations

import json
import os
from typing import Any

STORE_FILE = "store.json"
MANIFEST = "manifest.json"
FORMAT = 1


def store_exists(root: str) -> bool:
    """Whether ``root`` holds a store (its registry, or its ``store.json`` when the registry
    was lost: opening it then says so). Here, not in core: callers ask it before they pay
    for importing the store."""
    return any(os.path.exists(os.path.join(root, n)) for n in ("registry.db", STORE_FILE))


def write(path: str, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON at ``path`` atomically (temporary name ``<path>.tmp-<pid>-<start>``,
    then rename): a killed writer's temporary file names its process, and recovery removes
    it once that process is gone."""
    from ..kernel.procfs import process_start  # not at import: the CLI reads store_exists from here at start
    tmp = f"{path}.tmp-{os.getpid()}-{process_start(os.getpid())}"
    text = json.dumps({"format": FORMAT, **data}, sort_keys=True)  # dumps: the C encoder; dump is Python
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "w") as f:
        f.write(text)  # 0600 whatever the umask: root's alone
    os.replace(tmp, path)


def read(path: str) -> dict[str, Any] | None:
    """The manifest at ``path``, or None when it is missing, unreadable or not ours."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None
