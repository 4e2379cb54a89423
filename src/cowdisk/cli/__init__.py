"""The ``cowdisk`` command line: parse, call the :class:`~cowdisk.store.Store`, render.

One module per command group: :mod:`.templates` (``cowdisk template``), :mod:`.volumes`
(``cowdisk volume``), :mod:`.admin` (``recover``, ``gc``, ``doctor``), :mod:`.demo`;
:mod:`.app` holds what they share (output, JSON, progress, error reporting). This module
has the root group and :func:`main`, the entry point of the ``cowdisk`` script and of
``python -m cowdisk``.
"""

from __future__ import annotations

import logging
import sys
import traceback

import click

from ..store import BACKENDS, default_root
from . import admin, demo, templates, volumes
from .app import App, CowdiskGroup

BACKEND_CHOICES = ("auto", *BACKENDS)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=CowdiskGroup, context_settings=CONTEXT)
@click.option("--root", envvar="COWDISK_ROOT", default=default_root(), show_default=True,
              type=click.Path(file_okay=False), help="Store root directory. [env: COWDISK_ROOT]")
@click.option("--backend", envvar="COWDISK_BACKEND", default="auto", show_default=True,
              type=click.Choice(BACKEND_CHOICES),
              help="Volume backend; only matters when the store is created (it is then fixed). "
                   "[env: COWDISK_BACKEND]")
@click.option("-v", "--verbose", count=True, help="More detail: debug logs, tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="No messages or progress on stderr (errors still).")
@click.version_option(package_name="cowdisk")
@click.pass_context
def cli(ctx: click.Context, root: str, backend: str, verbose: int, quiet: bool) -> None:
    """Copy-on-write root disks for microVM sandboxes over shared read-only templates.

    \b
    Example: a sandbox disk from a directory tree
      cowdisk template build ./rootfs --name base
      cowdisk volume create vm1 --template base
      cowdisk volume drive vm1 --format firecracker
      cowdisk volume rm vm1

    Exit codes: 0 ok, 1 other, 2 invalid argument, 3 not found, 4 kernel error,
    5 already exists, 6 in use, 7 wrong state, 8 template changed, 9 unsupported,
    10 lock timeout, 11 snapshot invalid, 12 COW format error (see docs/cli.md).
    """
    if verbose:
        logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.INFO, stream=sys.stderr,
                            format="%(levelname)s %(name)s: %(message)s")
    app = App(root, backend, verbose, quiet)
    ctx.obj = app
    ctx.call_on_close(app.close)


for _command in (templates.template, volumes.volume, admin.recover, admin.gc, admin.doctor, demo.demo_command):
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
