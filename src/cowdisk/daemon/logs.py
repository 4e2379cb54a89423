"""The daemon's log: one JSON line per record (or text), for the daemon and its store workers.

Light to import (no web framework): a store worker started afresh sets it up too.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from .config import Config


def setup_logging(cfg: Config) -> None:
    """Every record to stderr in ``cfg.log_format``, at ``cfg.log_level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if cfg.log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, cfg.log_level.upper()))
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.WARNING)


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...fields}``: one line per record (journald keeps it)."""

    def format(self, record: logging.LogRecord) -> str:
        d: dict[str, Any] = {"ts": round(record.created, 6), "level": record.levelname.lower(),
                             "logger": record.name, "msg": record.getMessage()}
        fields = getattr(record, "fields", None)
        if fields:
            d.update(fields)
        if record.exc_info:
            d["traceback"] = self.formatException(record.exc_info)
        return json.dumps(d, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        s = super().format(record)
        fields = getattr(record, "fields", None)
        if fields and "peer" in fields:
            p = fields["peer"]
            s += f" ({fields.get('duration_ms', 0)} ms, peer pid={p.get('pid')} uid={p.get('uid')} gid={p.get('gid')})"
        return s
