"""The one way a long operation reports how far it is.

A :class:`Progress` is any callable ``progress(done, total, stage="")``:

* ``done`` and ``total`` count bytes (``total`` is 0 while it is not known);
* ``stage`` names a new phase ("mkfs", "copy", "digest") when one begins; a report
  that only moves the byte count leaves it empty.

Every layer takes the same type (kernel copies, backends, the cache, the store), so a
caller (the CLI's bars, the daemon's jobs) plugs in one function and sees all of it.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def __call__(self, done: int, total: int, stage: str = "") -> None: ...


def stage(progress: Progress | None, text: str) -> None:
    """Announce a new phase (no byte count yet)."""
    if progress is not None:
        progress(0, 0, text)
