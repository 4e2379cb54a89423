"""The ``cowdisk`` command line: parse, call the :class:`~cowdisk.store.Store`, render.

One module per command group: :mod:`.templates` (``cowdisk template``), :mod:`.volumes`
(``cowdisk volume``), :mod:`.admin` (``recover``, ``gc``, ``doctor``), :mod:`.demo`;
:mod:`.app` holds what they share (output, JSON, progress, error reporting). This module
has the root group and :func:`main`, the entry point of the ``cowdisk`` script and of
``python -m cowdisk``.
"""

from __future__ import annotations

import sys
import traceback

import click

from . import admin, demo, lifecycle, serve, templates, volumes
from .app import App, CowdiskGroup, global_params, setup_logging

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=CowdiskGroup, context_settings=CONTEXT)
@click.version_option(package_name="cowdisk")
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

    Exit codes: 0 ok, 1 other, 2 invalid argument or usage, 3 not found, 4 kernel error,
    5 already exists, 6 in use, 7 wrong state, 8 template changed, 9 unsupported,
    10 lock timeout, 11 snapshot invalid, 12 COW format error (see docs/cli.md).
    Shell completion: eval "$(_COWDISK_COMPLETE=bash_source cowdisk)" (zsh_source, fish_source).
    """
    setup_logging(verbose)
    app = App(root, backend, verbose, quiet)
    app.json = as_json
    app.timeout = timeout
    ctx.obj = app
    ctx.call_on_close(app.close)


cli.params[:0] = global_params(at_root=True)

for _command in (templates.template, volumes.volume, lifecycle.store, admin.recover, admin.gc, admin.doctor,
                 demo.demo_command, serve.serve):
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cowdisk`` script and ``python -m cowdisk``."""
    args = sys.argv[1:] if argv is None else argv
    try:
        cli.main(args=args, prog_name="cowdisk", standalone_mode=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # a bug: say so; the traceback only with -v
        verbose = any(a == "--verbose" or (a.startswith("-v") and set(a[1:]) == {"v"}) for a in args)
        click.echo(f"cowdisk: internal error: {type(e).__name__}: {e}", err=True)
        if verbose:
            traceback.print_exception(e, file=sys.stderr)
        else:
            click.echo("  hint: run again with -v for the traceback, and report it", err=True)
        return 1
    return 0


__all__ = ["cli", "main"]
