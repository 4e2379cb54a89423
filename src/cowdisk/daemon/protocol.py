"""What the daemon and its clients agree on: the API's prefix and default socket
(:mod:`cowdisk.contract`), the daemon's own error types and the error document
(:mod:`cowdisk.errors`, where each error type carries its HTTP status). Named here for
the daemon's modules; the client imports those small modules, not this package."""

from __future__ import annotations

from ..contract import API, DEFAULT_CONFIG, DEFAULT_SOCKET
from ..errors import (ERROR_TYPES, NO_SPACE, Cancelled, Forbidden, Unavailable, WorkerDied, error_document,
                      error_from_document, status_of)

__all__ = ["API", "DEFAULT_CONFIG", "DEFAULT_SOCKET", "ERROR_TYPES", "NO_SPACE", "Cancelled", "Forbidden",
           "Unavailable", "WorkerDied", "error_document", "error_from_document", "status_of"]
