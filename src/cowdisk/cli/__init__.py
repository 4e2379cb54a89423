"""The ``cowdisk`` command line: parse, call the :class:`~cowdisk.store.Store`, render.

One module per command group: :mod:`.templates` (``cowdisk template``), :mod:`.volumes`
(``cowdisk volume``), :mod:`.admin` (``recover``, ``gc``, ``doctor``), :mod:`.demo`;
:mod:`.app` holds what they share (output, JSON, progress, error reporting). This module
has the root group and :func:`main`, the entry point of the ``cowdisk`` script and of
``python -m cowdisk``.

A command's module is imported when that command runs (or when ``--help`` lists them), and
each imports the store, rich and the rest only where it uses them: ``cowdisk --version``
imports click and this package's app module, nothing else (bench/startup.py measures it;
tests/unit/test_cli_imports.py keeps it so).
"""

from __future__ import annotations

import signal
import os
import sys

import click

from .. import __version__
from .app import PIPE_CLOSED, App, CowdiskGroup, global_params, setup_logging

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


COMMANDS = {"template": "templates:template", "volume": "volumes:volume", "store": "lifecycle:store",
            "recover": "admin:recover", "gc": "admin:gc", "doctor": "admin:doctor", "demo": "demo:demo_command",
            "serve": "serve:serve"}
"""Each command and where it is defined (``module:attribute`` in this package), imported when used."""


@click.group(cls=CowdiskGroup, context_settings=CONTEXT, lazy_commands=COMMANDS)
@click.version_option(__version__, package_name="cowdisk")
@click.pass_context
def cli(ctx: click.Context, root: str, backend: str, verbose: int, quiet: bool, as_json: bool,
        timeout: float | None) -> None:
    """Copy-on-write root disks for microVM sandboxes over shared read-only templates.

    The options below are accepted before or after the subcommand
    (`cowdisk --json volume ls` and `cowdisk volume ls --json` are the same).

    \b
    Example: a sandbox disk from a container image or a directory tree
      cowdisk template build --from-image ./image.oci.tar --name base
      cowdisk template build ./rootfs --name base
      cowdisk volume create vm1 --template base
      cowdisk volume drive vm1 --format firecracker
      cowdisk volume rm vm1

    {exit_codes}

    Shell completion: eval "$(_COWDISK_COMPLETE=bash_source cowdisk)" (zsh_source, fish_source).
    """
    setup_logging(verbose)
    app = App(root, backend, verbose, quiet)
    app.json = as_json
    app.timeout = timeout
    ctx.obj = app
    ctx.call_on_close(app.close)


cli.params[:0] = global_params(at_root=True)


def _pipe_closed() -> int:
    """stdout's reader went away (``cowdisk volume ls | head -1``): end as coreutils do, of
    SIGPIPE, quietly (the shell sees 141; ``set -o pipefail`` scripts as with ``ls``). What
    stdout still buffers goes to /dev/null, so the interpreter's last flush cannot fail."""
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
    try:
        cli.main(args=args, prog_name="cowdisk", standalone_mode=True)
    except SystemExit as e:
        if e.code == PIPE_CLOSED:
            return _pipe_closed()
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # a bug: say so; the traceback only with -v
        verbose = any(a == "--verbose" or (a.startswith("-v") and set(a[1:]) == {"v"}) for a in args)
        click.echo(f"cowdisk: internal error: {type(e).__name__}: {e}", err=True)
        if verbose:
            import traceback

            traceback.print_exception(e, file=sys.stderr)
        else:
            click.echo("  hint: run again with -v for the traceback, and report it", err=True)
        return 1
    return 0


__all__ = ["cli", "main"]
