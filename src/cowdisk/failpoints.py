"""Crash and pause points for the recovery and race tests.

``COWDISK_CRASH_AT=<op>:<step>`` makes the process SIGKILL itself right after that
step of that operation, exactly as a power cut or an OOM kill would stop it.
``COWDISK_PAUSE_AT=<op>:<step>[,<op>:<step>...]`` makes it sleep there (``COWDISK_PAUSE_S``
seconds, default 1), so that a test can run another operation inside a window that is otherwise
microseconds wide; with ``COWDISK_PAUSE_MARK=<path>`` it first writes its PID to that
file, so the test knows the process is there (a daemon's store worker, say). Unset
(always, outside tests) each costs one environment lookup.
"""

from __future__ import annotations

import os
import signal
import time


def hit(op: str, step: str) -> None:
    spec = os.environ.get("COWDISK_CRASH_AT")
    if spec and spec == f"{op}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
    spec = os.environ.get("COWDISK_PAUSE_AT")
    if spec and f"{op}:{step}" in spec.split(","):
        mark = os.environ.get("COWDISK_PAUSE_MARK")
        if mark:  # whole or absent (temp + rename): a test polls for it and reads it at once
            with open(f"{mark}.tmp-{os.getpid()}", "w") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(f"{mark}.tmp-{os.getpid()}", mark)
        time.sleep(float(os.environ.get("COWDISK_PAUSE_S", "1")))
