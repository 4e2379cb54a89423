"""Where a store lives when the caller does not say: ``COWDISK_ROOT``, else
/var/lib/cowdisk. Apart from :mod:`cowdisk.model` (which re-exports it; its types cost
milliseconds to make) so that the command line reads it at start-up without the model."""

from __future__ import annotations

import os

DEFAULT_ROOT = "/var/lib/cowdisk"


def default_root() -> str:
    return os.environ.get("COWDISK_ROOT") or DEFAULT_ROOT


__all__ = ["DEFAULT_ROOT", "default_root"]
