"""The ``cowdisk`` command line: parse, call the :class:`~cowdisk.store.Store`, render.

One module per command group: :mod:`.templates` (``cowdisk template``), :mod:`.volumes`
(``cowdisk volume``), :mod:`.admin` (``recover``, ``gc``, ``doctor``), :mod:`.demo`;
:mod:`.base` holds what they share without click (the App: options, the store, output),
:mod:`.app` the click side (global options, error reporting), :mod:`.root` the root group.
This module has :func:`main`, the entry point of the ``cowdisk`` script and of
``python -m cowdisk``, and ``cli``, the root group (imported when asked for).

A command's module is imported when that command runs (or when ``--help`` lists them), and
each imports the store, rich and the rest only where it uses them: ``cowdisk --version``
imports click and the root group, nothing else; ``volume ls`` and ``template ls`` through a
daemon run without click (:mod:`.light`). bench/startup.py measures them;
tests/unit/test_cli_imports.py and tests/host/test_faces.py keep them so.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

from .base import PIPE_CLOSED, echo

if TYPE_CHECKING:
    from .root import cli as cli


def __getattr__(name: str) -> Any:
    if name == "cli":  # the root group: click and the global options, imported when asked for
        from .root import cli

        return cli
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _pipe_closed() -> int:
    """stdout's reader went away (``cowdisk volume ls | head -1``): end as coreutils do, of
    SIGPIPE, quietly (the shell sees 141; ``set -o pipefail`` scripts as with ``ls``). What
    stdout still buffers goes to /dev/null, so the interpreter's last flush cannot fail."""
    import signal  # here, not at the top: its enum conversions cost ~1 ms of every start

    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), sys.stdout.fileno())
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    return 128 + signal.SIGPIPE  # not reached


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cowdisk`` script and ``python -m cowdisk``."""
    args = sys.argv[1:] if argv is None else argv
    if "_COWDISK_COMPLETE" in os.environ:  # the shell asks for completions (or their script)
        from .completion import register

        register()
    else:
        from .light import run

        code = run(args)  # a listing through a daemon, without click; None: click runs it
        if code is not None:
            return _pipe_closed() if code == PIPE_CLOSED else code
    from .root import cli

    try:
        cli.main(args=args, prog_name="cowdisk", standalone_mode=True)
    except SystemExit as e:
        if e.code == PIPE_CLOSED:
            return _pipe_closed()
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # a bug: say so; the traceback only with -v
        verbose = any(a == "--verbose" or (a.startswith("-v") and set(a[1:]) == {"v"}) for a in args)
        echo(f"cowdisk: internal error: {type(e).__name__}: {e}", err=True)
        if verbose:
            import traceback

            traceback.print_exception(e, file=sys.stderr)
        else:
            echo("  hint: run again with -v for the traceback, and report it", err=True)
        return 1
    return 0


__all__ = ["cli", "main"]
