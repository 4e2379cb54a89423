"""The click side of the command line: the global options every command accepts (before or
after the subcommand), the command and group classes, shell completion, and the one place
errors become a message, a JSON document and an exit code. What the commands share that
needs no click (the :class:`~.base.App`: options, the store, all output; listing columns)
is :mod:`.base`.

Every failure, usage errors of the parser included, ends in :func:`report_error`: what
failed (the command and the operation), on what, what to do, as text on stderr and, with
``--json``, as ``{"error": {...}}`` on stdout; the exit code is the error's ``exit_code``
(cowdisk/errors.py; docs/cli.md lists them).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

import click

from ..defaults import default_root
from ..errors import CowdiskError, InvalidArgument
from ..units import parse_size as parse_size
from .base import PIPE_CLOSED, App, Column, error_doc, overrides

if TYPE_CHECKING:
    from ..store import Store

F = TypeVar("F", bound=Callable[..., Any])


def list_options(columns: Sequence[Column], what: str, keys: str) -> Callable[[F], F]:
    """The options of every list command (``-q``, ``--no-headings``, ``-o``, ``--filter``),
    their help naming ``columns``; ``what`` is the rows' plural, ``keys`` a word on the
    filter keys (``"names: one of them"``)."""
    opts = [
        click.option("-q", "--quiet", "ids_only", is_flag=True, help="Only the ids, one per line."),
        click.option("--no-headings", is_flag=True, help="No heading line."),
        click.option("-o", "--output", "columns", metavar="COLUMNS",
                     help="Comma-separated columns, keys or headings in any case; +COL adds to the defaults: "
                          f"{', '.join(c.key for c in columns if c.default)}; also "
                          f"{', '.join(c.key for c in columns if not c.default)}."),
        click.option("--filter", "filters", multiple=True, metavar="KEY=VALUE",
                     help=f"Only {what} whose column KEY is VALUE ({keys}). Repeatable: every key must match, a key "
                          "given twice matches either value."),
    ]

    def decorate(f: F) -> F:
        for o in reversed(opts):  # as if stacked above f, in this order
            f = o(f)
        return f

    return decorate



# -- global options: accepted before or after the subcommand --------------------------------


def _app(ctx: click.Context) -> App | None:
    return ctx.find_object(App)


def _set(attr: str, convert: Callable[[Any], Any] = lambda v: v) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def cb(ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        app = _app(ctx)
        if app is not None and overrides(value):
            setattr(app, attr, convert(value))
        return value
    return cb


def _verbose(ctx: click.Context, _param: click.Parameter, value: int) -> int:
    app = _app(ctx)
    if app is not None and value:
        app.verbose = max(app.verbose, value)
        setup_logging(app.verbose)
    return value


def setup_logging(verbose: int) -> None:
    """Log records on stderr with -v (INFO) and -vv (DEBUG); without, logging is not even imported."""
    if verbose:
        import logging

        logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.INFO, stream=sys.stderr,
                            format="%(levelname)s %(name)s: %(message)s", force=True)


def _timeout(value: float | None) -> float | None:
    if value is not None and value < 0:
        raise click.BadParameter("must be 0 or more seconds")
    return value


class LazyChoice(click.Choice):  # type: ignore[type-arg]
    """A choice whose values come from ``values()`` when first needed (parsing that option,
    its help), not when the command is defined: the modules that hold them are not imported
    at start-up."""

    def __init__(self, values: Callable[[], Sequence[str]], known: Sequence[str] = ()) -> None:
        self._values = values
        self._known = tuple(known)
        super().__init__(())

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value in self._known:  # a value known without loading the rest (a default)
            return value
        return super().convert(value, param, ctx)

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        return tuple(self._values())

    @choices.setter
    def choices(self, _value: Any) -> None:
        pass


def _backend_choices() -> tuple[str, ...]:
    from ..backends import BACKENDS

    return ("auto", *BACKENDS)


def global_params(*, at_root: bool) -> list[click.Parameter]:
    """The options every command takes, before or after the subcommand. At the root they
    carry their defaults and environment and are passed to the root group; after a
    subcommand they only override what the root set (on the :class:`App`)."""

    def cb(setter: Callable[[click.Context, click.Parameter, Any], Any]) -> Any:
        return None if at_root else setter

    return [
        click.Option(["--root"], envvar="COWDISK_ROOT" if at_root else None,
                     default=default_root() if at_root else None, show_default=at_root,
                     type=click.Path(file_okay=False), expose_value=at_root, is_eager=True,
                     callback=cb(_set("root", os.path.abspath)), help="Store root directory. [env: COWDISK_ROOT]"),
        click.Option(["--backend"], envvar="COWDISK_BACKEND" if at_root else None,
                     default="auto" if at_root else None, show_default=at_root,
                     type=LazyChoice(_backend_choices, known=("auto",)), expose_value=at_root, is_eager=True,
                     callback=cb(_set("backend")),
                     help="Volume backend; only matters when the store is created (it is then fixed). "
                          "[env: COWDISK_BACKEND]"),
        click.Option(["-v", "--verbose"], count=True, expose_value=at_root, is_eager=True, callback=cb(_verbose),
                     help="More detail: debug logs, tracebacks on errors."),
        click.Option(["-q", "--quiet"], is_flag=True, expose_value=at_root, is_eager=True, callback=cb(_set("quiet")),
                     help="No messages or progress on stderr (errors still)."),
        click.Option(["--json", "as_json"], is_flag=True, expose_value=at_root, is_eager=True,
                     callback=cb(_set("json")),
                     help="Print one JSON document on stdout (stable keys), errors included."),
        click.Option(["--timeout"], type=click.FloatRange(min=0), metavar="SECONDS", expose_value=at_root, is_eager=True,
                     callback=cb(_set("timeout")),
                     help="How long to wait for a lock held by another process or a busy device "
                          "(default: 30 s for locks, 5 s for a device)."),
    ]


_SUB_PARAMS: list[click.Parameter] = []


def _sub_params() -> list[click.Parameter]:
    """The global options after a subcommand, made once and shared by every command (they
    keep no state of their own: what they set goes on the :class:`App`); a command module
    that makes 20 commands does not make 120 options at every start."""
    if not _SUB_PARAMS:
        _SUB_PARAMS.extend(global_params(at_root=False))
    return _SUB_PARAMS


def table(*columns: str, **kw: Any) -> Any:
    """A rich table whose cells fold rather than being cut (the demo's tables)."""
    from rich.table import Table

    t = Table(**kw)
    for c in columns:
        t.add_column(c, overflow="fold")
    return t


class CowdiskCommand(click.Command):
    """A command that also takes the global options after its name."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        names = {n for p in self.params for n in getattr(p, "opts", [])}
        self.params += [p for p in _sub_params() if not set(p.opts) & names]

    def invoke(self, ctx: click.Context) -> Any:
        app = _app(ctx)
        if app is not None:
            app.command = ctx.command_path.partition(" ")[2] or ctx.command_path
        return super().invoke(ctx)


class CowdiskSubGroup(click.Group):
    """``template`` and ``volume``: their commands take the global options too."""

    command_class = CowdiskCommand


def _json_wanted(args: Sequence[str]) -> bool:
    for a in args:
        if a == "--":
            return False
        if a == "--json":
            return True
    return False


def usage_error_type(code: int) -> str:
    """The documented error type of a usage error the parser raised: ``InvalidArgument``
    for exit 2 (an unknown option, a bad value, a missing argument), else ``CowdiskError``."""
    return "InvalidArgument" if code == InvalidArgument.exit_code else "CowdiskError"


class CowdiskGroup(click.Group):
    """The root group: every error (a cowdisk error, an OS error, a usage error of the parser)
    becomes a message on stderr, a JSON document with --json, and its exit code. Its
    commands may be named as ``module:attribute`` (``lazy_commands``), imported when used."""

    command_class = CowdiskCommand
    group_class = CowdiskSubGroup

    def __init__(self, *args: Any, lazy_commands: dict[str, str] | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*super().list_commands(ctx), *(n for n in self.lazy_commands if n not in self.commands)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy_commands:
            import importlib

            module, _, attr = self.lazy_commands[cmd_name].partition(":")
            self.add_command(getattr(importlib.import_module(f".{module}", __package__), attr), cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_help_text(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        if self.help and "{exit_codes}" in self.help:
            from .reference import exit_codes_line

            self.help = self.help.replace("{exit_codes}", exit_codes_line())
        super().format_help_text(ctx, formatter)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            try:
                return super().invoke(ctx)
            except BrokenPipeError:
                raise
            except CowdiskError as e:
                report_error(ctx, e, e.exit_code)
            except OSError as e:  # not wrapped by cowdisk: permissions on --root, a full disk...
                report_error(ctx, e, 1, hint="check --root and that you run as root")
        except BrokenPipeError:  # stdout's reader went away: no error of the store, no message
            raise click.exceptions.Exit(PIPE_CLOSED) from None

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        if not standalone_mode:
            return super().main(argv, prog_name, complete_var, False, **extra)
        try:  # with standalone_mode off click returns an Exit's code instead of raising it
            rv = super().main(argv, prog_name, complete_var, False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("cowdisk: aborted", err=True)
            sys.exit(1)
        except click.ClickException as e:  # usage errors: unknown option, bad value, missing argument
            code = e.exit_code
            doc = {"type": usage_error_type(code), "exit_code": code, "message": e.format_message(),
                   "hint": "", "op": "parse arguments", "object": "", "errno": None, "notes": []}
            ctx = getattr(e, "ctx", None)
            if ctx is not None:
                doc["command"] = ctx.command_path.partition(" ")[2]
                doc["hint"] = f"`{ctx.command_path} --help` shows the usage"
            if _json_wanted(argv):
                import json

                click.echo(json.dumps({"error": doc}, indent=2))
            e.show()
            sys.exit(code)
        sys.exit(rv if isinstance(rv, int) else 0)


def report_error(ctx: click.Context, e: BaseException, code: int, hint: str = "") -> None:
    """Print ``e`` (and one JSON error document with ``--json``), then exit with ``code``."""
    app = ctx.find_object(App)
    command = app.command if app is not None else ""
    doc = error_doc(e, code, command, hint)
    if app is not None and app.json:
        import json

        click.echo(json.dumps({"error": doc}, indent=2))
    where = f"cowdisk {command}" if command else "cowdisk"
    click.echo(f"{where}: error: {doc['message']}", err=True)
    for n in doc["notes"]:
        click.echo(f"  note: {n}", err=True)
    if doc["hint"]:
        click.echo(f"  hint: {doc['hint']}", err=True)
    if app is not None and app.verbose:
        import traceback

        traceback.print_exception(e, file=sys.stderr)
    if app is not None:
        app.close()
    raise click.exceptions.Exit(code)


pass_app = click.make_pass_decorator(App)


# -- completion ---------------------------------------------------------------------------


def _complete_store(ctx: click.Context) -> Store | None:
    from ..store import Store

    root = ctx.find_root().params.get("root") or default_root()
    if not os.path.exists(os.path.join(root, "registry.db")):
        return None
    try:
        return Store(root, recover=False, lock_timeout=0.5)
    except (CowdiskError, OSError):
        return None


def complete_volumes(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[str]:
    """Volume ids for shell completion (read-only: the store is opened without recovery)."""
    s = _complete_store(ctx)
    if s is None:
        return []
    try:
        return [v.id for v in s.volumes() if v.id.startswith(incomplete)]
    finally:
        s.close()


def complete_templates(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[str]:
    s = _complete_store(ctx)
    if s is None:
        return []
    try:
        return sorted({n for t in s.templates() for n in (t.id, *t.names) if n.startswith(incomplete)})
    finally:
        s.close()
