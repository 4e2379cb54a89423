"""Keeps one lazy template's nbdkit running (issue 25: a server process that dies is
started again, and its clients, QEMU's NBD client and the FUSE export's, reconnect).

    python3 keeper.py CACHE LOG SOCKET -- nbdkit --foreground ...

forks into the background (the caller's ``subprocess.run`` returns once it has), names
itself ``cowdisk-keeper``, writes ``CACHE/keeper.pid`` and runs the command. When the
command ends for any reason but the keeper's own stop (SIGTERM or SIGINT to the keeper,
which it passes on), it is started again after a pause that doubles from 0.1 s to 5 s
(back to 0.1 s after a run of a minute), once the dead server's SOCKET and PID file are
removed (nbdkit does not listen on a socket path that exists); once it is ready again the
command in ``$COWDISK_KEEPER_ON_RESTART`` (JSON) runs: the kernel's nbd devices that were
connected to the dead one are given a connection to it. A command that never became ready (its PID file,
``CACHE/nbdkit.pid``, never held its PID) is not started again: a wrong argument or a
broken config is an error for :func:`cowdisk.remote.lazy.serve` to report, not a loop.

Run as a script by its path: it imports the standard library alone (a few MB for as long as
the template is served).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time

NAME = b"cowdisk-keeper"
PIDFILE = "keeper.pid"
SERVER_PIDFILE = "nbdkit.pid"
ON_RESTART = "COWDISK_KEEPER_ON_RESTART"
"""A JSON list: the command the keeper runs each time a server it started again is ready
(cowdisk.kernel.nbd's reconnect of the devices connected to the dead one)."""


def _name_self() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(15, ctypes.c_char_p(NAME), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _server_pid(cache: str) -> int | None:
    try:
        with open(os.path.join(cache, SERVER_PIDFILE)) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _note(log: int, text: str) -> None:
    os.write(log, f"{time.strftime('%Y-%m-%d %H:%M:%S')} cowdisk-keeper[{os.getpid()}]: {text}\n".encode())


def _when_ready(cache: str, child: "subprocess.Popen[bytes]", log: int, hook: list[str]) -> None:
    """Run ``hook`` once the restarted server is ready (its PID file holds its PID): the
    kernel's nbd devices connected to the dead one get a connection to it (their waiting
    I/O goes on); a QEMU or FUSE client reconnects by itself."""
    while _server_pid(cache) != child.pid:
        if child.poll() is not None:
            return
        time.sleep(0.02)
    try:
        r = subprocess.run(hook, stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=60)
        if r.returncode:
            _note(log, f"{hook[0]} ended with status {r.returncode} (reconnecting the nbd devices)")
    except (OSError, subprocess.TimeoutExpired) as e:
        _note(log, f"reconnecting the nbd devices: {e}")


def keep(cache: str, log: int, sock: str, argv: list[str]) -> int:
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def stop(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    delay = 0.1
    restarted = False
    hook = json.loads(os.environ.get(ON_RESTART) or "[]")
    while not stopping:
        began = time.monotonic()
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        if stopping:  # the stop came between the check and the start
            child.send_signal(signal.SIGTERM)
        if restarted and hook:
            threading.Thread(target=_when_ready, args=(cache, child, log, hook), daemon=True).start()
        restarted = True
        rc = child.wait()
        if stopping:
            break
        if _server_pid(cache) != child.pid:
            _note(log, f"{argv[0]} (pid {child.pid}) ended with status {rc} before it was ready; "
                       "not starting it again")
            return 1
        if time.monotonic() - began > 60:
            delay = 0.1
        how = f"signal {-rc}" if rc < 0 else f"status {rc}"
        for leftover in (sock, os.path.join(cache, SERVER_PIDFILE)):
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass
        _note(log, f"{argv[0]} (pid {child.pid}) ended ({how}); starting it again in {delay:g} s")
        end = time.monotonic() + delay
        while not stopping and time.monotonic() < end:
            time.sleep(min(0.05, end - time.monotonic()))
        delay = min(delay * 2, 5.0)
    return 0


def main(args: list[str]) -> int:
    if len(args) < 5 or args[3] != "--":
        sys.stderr.write("usage: keeper.py CACHE LOG SOCKET -- COMMAND...\n")
        return 2
    cache, logpath, sock, argv = args[0], args[1], args[2], args[4:]
    log = os.open(logpath, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    if os.fork() > 0:
        return 0  # the caller's run() returns; the keeper goes on in the background
    os.setsid()
    _name_self()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull if fd == 0 else log, fd)
    pidfile = os.path.join(cache, PIDFILE)
    tmp = f"{pidfile}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, pidfile)
    try:
        return keep(cache, log, sock, argv)
    finally:
        try:
            with open(pidfile) as f:
                mine = f.read().strip() == str(os.getpid())
            if mine:
                os.unlink(pidfile)
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
