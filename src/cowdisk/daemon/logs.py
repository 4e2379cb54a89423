"""The daemon's log: one JSON line per record (or text), for the daemon and its store workers.

Light to import (no web framework): a store worker started afresh sets it up too.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import sys
from typing import Any, Callable

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


class _Queued(logging.handlers.QueueHandler):
    """Hands records to the writer thread as they are (an in-process queue: the record's
    fields and traceback go along untouched); only the message is resolved here."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.msg = record.getMessage()
        record.args = None
        return record


def in_background() -> Callable[[], None]:
    """From now on a thread writes the log lines: a request's line costs a queue put, and a
    slow reader of stderr (journald backed up) cannot stall the event loop. Call it after
    the store workers are forked (they keep writing their own lines directly); returns the
    function that writes what is queued and stops the thread."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(q, *handlers, respect_handler_level=True)
    for h in handlers:
        root.removeHandler(h)
    root.addHandler(_Queued(q))
    listener.start()

    def stop() -> None:
        listener.stop()
        for h in root.handlers[:]:
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)

    return stop


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
