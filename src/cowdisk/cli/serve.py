"""``cowdisk serve`` (also installed as ``cowdiskd``): the store as a local service.

The daemon itself is :mod:`cowdisk.daemon`; this module only turns flags into its
:class:`~cowdisk.daemon.config.Config` (flags override the environment, which overrides
the config file) and runs it, or prints the settings with ``--check-config``.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

import click

from ..errors import CowdiskError
from ..store import BACKENDS

OPTIONS: list[Callable[[Any], Any]] = [
    click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="COWDISK_CONFIG",
                 help="Config file (TOML). [default: /etc/cowdisk/cowdisk.toml if it exists; env: COWDISK_CONFIG]"),
    click.option("--socket", help="Unix socket to serve on. [default: /run/cowdisk/cowdisk.sock; env: COWDISK_SOCKET]"),
    click.option("--socket-mode", help="Mode of the socket, octal. [default: 0660]"),
    click.option("--socket-group", help="Group of the socket when it exists, else owner-only. [default: cowdisk]"),
    click.option("--allow-uid", "allow_uids", multiple=True, type=int,
                 help="Only these uids (and root, and --allow-gid) may call. Repeatable."),
    click.option("--allow-gid", "allow_gids", multiple=True, type=int, help="Callers in these groups may call."),
    click.option("--jail-root", "jail_roots", multiple=True, help="Where `volume jail` may stage. Repeatable."),
    click.option("--import-root", "import_roots", multiple=True,
                 help="Where template import/build sources may be. Repeatable. [default: ROOT/incoming]"),
    click.option("--log-format", type=click.Choice(["json", "text"]), help="[default: json]"),
    click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="[default: info]"),
    click.option("--shutdown-timeout", type=float, help="Seconds SIGTERM waits for in-flight work. [default: 30]"),
    click.option("--workers", type=int, help="Threads running requests at once. [default: 32]"),
    click.option("--processes", type=int,
                 help="Store worker processes (0: store calls in the daemon's own threads). "
                      "[default: one per core, 2 to 8]"),
    click.option("--check-config", is_flag=True, help="Print the settings in force and what would stop a start; "
                                                       "exit 2 if they are invalid."),
]


def _settings(root: str | None, backend: str | None, kw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"root": root, "backend": backend}
    for k in ("socket", "socket_mode", "socket_group", "log_format", "log_level", "shutdown_timeout", "workers", "processes"):
        out[k] = kw.get(k)
    for k in ("allow_uids", "allow_gids", "jail_roots", "import_roots"):
        out[k] = list(kw[k]) if kw.get(k) else None
    return out


def _serve(root: str | None, backend: str | None, kw: dict[str, Any]) -> None:
    from ..daemon import config as config_mod

    try:
        cfg = config_mod.load(kw.get("config_path"), overrides=_settings(root, backend, kw))
    except CowdiskError as e:
        click.echo(f"cowdisk serve: error: {e}", err=True)
        raise click.exceptions.Exit(e.exit_code)
    if kw.get("check_config"):
        from ..daemon import server

        problems = server.check(cfg)
        click.echo(json.dumps({"config": cfg.as_dict(), "problems": problems}, indent=2))
        raise click.exceptions.Exit(1 if [p for p in problems if not p.startswith("note:")] else 0)
    try:
        from ..daemon import server
    except ImportError as e:
        click.echo(f"cowdisk serve: error: the daemon needs {e.name}: pip install 'cowdisk[daemon]'", err=True)
        raise click.exceptions.Exit(1)
    try:
        code = server.run(cfg)
    except CowdiskError as e:
        click.echo(f"cowdisk serve: error: {e.message}", err=True)
        if e.hint:
            click.echo(f"  hint: {e.hint}", err=True)
        raise click.exceptions.Exit(e.exit_code)
    raise click.exceptions.Exit(code)


def _with_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed(OPTIONS):
        f = opt(f)
    return f


HELP = """Serve the store on a unix socket (HTTP/1.1 + JSON): the daemon, also installed as `cowdiskd`.

    Recovers the store, then listens (no TCP), tells systemd READY=1, and stops cleanly on
    SIGTERM. Settings: a TOML file, COWDISK_* environment variables, these flags (each
    overriding the one before). The API, the config keys and the systemd unit are in
    docs/daemon.md.

    \b
    Example:
      cowdisk serve --socket /run/cowdisk/cowdisk.sock
      cowdisk serve --config /etc/cowdisk/cowdisk.toml --check-config
      curl --unix-socket /run/cowdisk/cowdisk.sock http://cowdisk/v1/health
    """


@click.command("serve", help=HELP)
@_with_options
@click.pass_context
def serve(ctx: click.Context, /, **kw: Any) -> None:
    parent = ctx.parent
    root = backend = None
    if parent is not None:
        src = parent.get_parameter_source
        if src("root") == click.core.ParameterSource.COMMANDLINE:
            root = parent.params["root"]
        if src("backend") == click.core.ParameterSource.COMMANDLINE:
            backend = parent.params["backend"]
    _serve(root, backend, kw)


@click.command("cowdiskd", help=HELP.replace("`cowdiskd`", "`cowdisk serve`"),
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--root", help="Store root directory. [default: /var/lib/cowdisk; env: COWDISK_ROOT]")
@click.option("--backend", type=click.Choice(("auto", *BACKENDS)),
              help="Backend when the store is made. [default: auto; env: COWDISK_BACKEND]")
@_with_options
def cowdiskd(root: str | None, backend: str | None, **kw: Any) -> None:
    _serve(root, backend, kw)


def main() -> int:
    """Entry point of the ``cowdiskd`` script."""
    try:
        cowdiskd.main(prog_name="cowdiskd", standalone_mode=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
