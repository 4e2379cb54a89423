"""Crash points for the recovery tests.

``COWDISK_CRASH_AT=<op>:<step>`` makes the process SIGKILL itself right after that
step of that operation, exactly as a power cut or an OOM kill would stop it. Unset
(always, outside tests) it costs one environment lookup.
"""

from __future__ import annotations

import os
import signal


def hit(op: str, step: str) -> None:
    spec = os.environ.get("COWDISK_CRASH_AT")
    if spec and spec == f"{op}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
