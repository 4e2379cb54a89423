"""Print the daemon's OpenAPI document without starting it:
``python3 -m cowdisk.daemon.openapi > docs/openapi.json`` (the drift test compares the
served ``/openapi.json`` with that file)."""

from __future__ import annotations

import json
import sys
from typing import Any

from .api import Service, create_app
from .config import Config
from .metrics import Metrics


def document() -> dict[str, Any]:
    svc = Service(None, Config(), Metrics(), None)  # type: ignore[arg-type]  # the schema needs no store
    return create_app(svc).openapi()


def main() -> int:
    json.dump(document(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
