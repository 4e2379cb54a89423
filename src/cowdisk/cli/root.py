"""The root command group of ``cowdisk``: its global options, and where each command is
defined (imported when it runs). :func:`cowdisk.cli.main` runs it."""

from __future__ import annotations

import click

from .. import __version__
from .app import CowdiskGroup, global_params, setup_logging
from .base import App

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
