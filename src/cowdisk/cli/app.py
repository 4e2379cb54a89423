"""What every command shares: the :class:`App` (options, the store, all output), the global
options every command accepts, tables, progress, and the one place errors become a message,
a JSON document and an exit code.

Data goes to stdout: a table for people on a terminal; plain tab-separated lines (raw
values, no wrapping, no markup) when stdout is not a terminal; one JSON document with
``--json``. Messages, progress and errors go to stderr. Data is never read as markup or
emoji (an id ``a[red]x`` prints as ``a[red]x``). Every failure, usage errors of the parser
included, ends in :func:`report_error`: what failed (the command and the operation), on
what, what to do, as text on stderr and, with ``--json``, as ``{"error": {...}}`` on stdout;
the exit code is the error's ``exit_code`` (cowdisk/errors.py; docs/cli.md lists them).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, NoReturn, Sequence, TypeVar

import click

from ..errors import CowdiskError, InvalidArgument, NotFound, message_of
from ..progress import Progress
from ..defaults import default_root
from ..units import parse_size as parse_size

if TYPE_CHECKING:  # imported when a command needs them (start-up: bench/startup.py)
    from rich.console import Console

    from ..contract import StoreAPI

    from ..store import Store

F = TypeVar("F", bound=Callable[..., Any])


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024:
            return f"{int(v)} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} TiB"


def when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _plain(v: Any) -> str:
    """A raw value as one tab-free, newline-free field."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) or "-"
    if isinstance(v, dict):  # (a lazy template's cache) as compact JSON, one field
        import json

        return json.dumps(v, sort_keys=True, separators=(",", ":"))
    return str(v).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


class Column:
    """One column of a listing: its JSON key, its heading, how a person reads it, and whether
    it is shown by default (the others only when ``-o`` names them)."""

    def __init__(self, key: str, heading: str = "", human: Callable[[Any], str] | None = None, *,
                 default: bool = True) -> None:
        self.key = key
        self.heading = heading or key
        self.human = human
        self.default = default


def _column_names(columns: Sequence[Column]) -> dict[str, Column]:
    """Every name a column answers to, lower case: its key (``template_id``; printed in
    capitals as the heading off a terminal) and its heading on a terminal (``template``)."""
    names: dict[str, Column] = {}
    for c in columns:
        names[c.key.lower()] = c
    for c in columns:
        names.setdefault(c.heading.lower(), c)
    return names


def select_columns(text: str | None, columns: Sequence[Column]) -> list[Column] | None:
    """The columns ``-o`` asks for: comma-separated keys or headings in any case
    (``id,state``, ``ID,STATE``); ``+col`` adds to the default columns (as ``lvs -o +field``).
    An unknown column is refused (exit 2) with the list of valid ones. None: no ``-o``."""
    if text is None:
        return None
    names = _column_names(columns)
    items = [i.strip() for i in text.split(",")]
    adding = any(i.startswith("+") for i in items)
    chosen = [c for c in columns if c.default] if adding else []
    for item in items:
        name = item.removeprefix("+").strip()
        if not name:
            continue
        c = names.get(name.lower())
        if c is None:
            raise InvalidArgument(f"unknown column {name!r}", op="parse columns", obj=name,
                                  hint="the columns: " + ", ".join(c.key for c in columns))
        if not (adding and c in chosen):
            chosen.append(c)
    if not chosen:
        raise InvalidArgument(f"no columns in {text!r}", op="parse columns", obj=text,
                              hint="the columns: " + ", ".join(c.key for c in columns))
    return chosen


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


def parse_filters(texts: Sequence[str], columns: Sequence[Column], extra: Sequence[str] = ()) -> dict[str, set[str]]:
    """``--filter KEY=VALUE`` (repeatable): KEY a column (key or heading, any case) or one of
    ``extra``; a row is listed when it matches every key, and a key given several times
    matches any of its values. Unknown keys are refused (exit 2) naming the valid ones."""
    names = _column_names(columns)
    out: dict[str, set[str]] = {}
    for t in texts:
        key, sep, value = t.partition("=")
        key = key.strip().lower()
        c = names.get(key)
        name = key if key in extra else (c.key if c is not None else None)
        if not sep or not key or name is None:
            valid = ", ".join([*extra, *(c.key for c in columns)])
            raise InvalidArgument(f"invalid filter {t!r}" + ("" if sep and key else ": use KEY=VALUE"),
                                  op="parse filter", obj=t, hint=f"the keys: {valid}")
        out.setdefault(name, set()).add(value)
    return out


def matches(row: dict[str, Any], filters: dict[str, set[str]]) -> bool:
    """Whether ``row`` passes every filter: its value's plain form is one of the wanted
    values, or, for a list (names, links, volumes), one of its items is."""
    for key, wanted in filters.items():
        v = row.get(key)
        have = {_plain(x) for x in v} if isinstance(v, (list, tuple)) else {_plain(v)}
        if not have & wanted:
            return False
    return True


def _human(v: Any) -> str:
    """A value of a ``key value`` view as a person reads it: lists and mappings joined, never
    a Python repr."""
    if isinstance(v, dict):
        return ", ".join(f"{k}={_human(x)}" for k, x in v.items()) or "-"
    if isinstance(v, (list, tuple)):
        return ", ".join(_human(x) for x in v) or "-"
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


class App:
    """What every command gets on ``ctx.obj``: the options, the store, and all output."""

    def __init__(self, root: str, backend: str, verbose: int, quiet: bool) -> None:
        self.root = os.path.abspath(root)
        self.backend = backend
        self.verbose = verbose
        self.quiet = quiet
        self.json = False
        self.timeout: float | None = None
        self.command = ""
        self.tty = sys.stdout.isatty()
        self.interactive = sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
        self._store: StoreAPI | None = None
        self._direct: Store | None = None
        self._out: Console | None = None
        self._err: Console | None = None

    @property
    def out(self) -> Console:
        """stdout for tables on a terminal (rich, made when first used)."""
        if self._out is None:
            from rich.console import Console

            width = None if self.tty else 1 << 16  # never wrap or fold off a terminal
            self._out = Console(highlight=False, markup=False, emoji=False, soft_wrap=not self.tty, width=width)
        return self._out

    @property
    def err(self) -> Console:
        """stderr for messages and progress (rich, made when first used)."""
        if self._err is None:
            from rich.console import Console

            self._err = Console(stderr=True, highlight=False, markup=False, emoji=False, soft_wrap=True,
                                width=None if sys.stderr.isatty() else 1 << 16)
        return self._err

    # -- the store -------------------------------------------------------------------

    def has_store(self) -> bool:
        from ..store.manifest import store_exists

        return store_exists(self.root)

    def store(self, *, create: bool = False, recover: bool = True) -> StoreAPI:
        """The store at ``--root``, as the one contract (:class:`cowdisk.contract.StoreAPI`):
        through the daemon that serves it when one answers (``COWDISK_SOCKET``), else the
        store opened here. The one place the command line opens a store. Only commands that
        import or build may create one; ``--timeout`` bounds its lock waits.

        Opening a store runs recovery; ``recover``/``gc`` open it with ``recover=False`` and
        run it themselves, so that they can report what it did."""
        if self._store is None:
            if self.has_store():  # a daemon serving this store answers: go through it (issue 12)
                from ..client import for_root

                client = for_root(self.root, self.info if self.verbose else None, backend=self.backend,
                                  lock_timeout=self.timeout)
                if client is not None:
                    self._store = client
                    return client
            elif not create:
                raise NotFound(f"no cowdisk store at {self.root}", op="open store", obj=self.root,
                               hint="build or import a template first (`cowdisk template build DIR`), or make "
                                    "an empty one with `cowdisk --backend NAME store init`, or point --root / "
                                    "COWDISK_ROOT at an existing store")
            from ..store import Store

            kw: dict[str, Any] = {} if self.timeout is None else {"lock_timeout": self.timeout}
            self._store = Store(self.root, backend=self.backend, recover=recover, **kw)
        return self._store

    def direct_store(self) -> Store:
        """The store at ``--root`` opened here, also beside a daemon serving it (the same
        locks keep them apart): for an import or build under sudo, whose source is read with
        the rights of the user who ran sudo (a daemon would see root). NotFound when there is
        no store."""
        if not self.has_store():
            self.store()  # raises NotFound with the hint
        if self._direct is None:
            from ..store import Store

            kw: dict[str, Any] = {} if self.timeout is None else {"lock_timeout": self.timeout}
            self._direct = Store(self.root, backend=self.backend, **kw)
        return self._direct

    def deadline(self) -> dict[str, float]:
        """``deadline_s`` for operations that wait for a busy device (``--timeout``)."""
        return {} if self.timeout is None else {"deadline_s": self.timeout}

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._direct is not None:
            self._direct.close()
            self._direct = None

    # -- output ------------------------------------------------------------------------

    def info(self, msg: str) -> None:
        if self.quiet:
            return
        if self._err is None and not self.interactive:  # no bar to print above: no rich either
            click.echo(msg, err=True)
            return
        from rich.text import Text

        self.err.print(Text(msg))

    def emit(self, data: Any) -> None:
        """The one JSON document a ``--json`` command writes to stdout."""
        import json

        click.echo(json.dumps(data, indent=2, default=str))

    def line(self, text: str) -> None:
        click.echo(text)

    def kv(self, title: str, data: dict[str, Any]) -> None:
        """One object as ``key value`` lines (a titled two-column table on a terminal); lists
        and mappings are joined (``attached=3, checkpointed=1``), never printed as reprs."""
        rows = [(k, _human(v)) for k, v in data.items()]
        if not self.tty:
            for k, v in rows:
                self.line(f"{k}\t{_plain(v)}")
            return
        from rich.table import Table
        from rich.text import Text

        t = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False)
        t.add_column(style="bold", no_wrap=True)
        t.add_column(overflow="fold")
        for k, v in rows:
            t.add_row(Text(k), Text(v))
        self.out.print(t)

    def show(self, doc: dict[str, Any], title: str, rows: Callable[[dict[str, Any]], dict[str, Any]], *,
             key: str = "id") -> None:
        """One object as its command shows it: the document with ``--json``, its ``key`` (the
        id, or what a script uses next: a URL) alone with ``-q``, else :meth:`kv` of
        ``rows(doc)`` (the human fields)."""
        if self.json:
            self.emit(doc)
        elif self.quiet:
            self.line(doc[key])
        else:
            self.kv(title, rows(doc))

    def listing(self, rows: Sequence[dict[str, Any]], columns: Sequence[Column], *, headings: bool = True,
                only: Sequence[Column] | None = None, title: str | None = None) -> None:
        """Rows as a table (terminal) or tab-separated raw values (otherwise). ``columns`` are
        every column the listing has (the default ones shown); ``only`` are the ``-o``
        columns (:func:`select_columns`), always printed raw."""
        cols = list(only) if only else [c for c in columns if c.default]
        if not self.tty or only:
            if headings:
                self.line("\t".join(c.key.upper() for c in cols))
            for r in rows:
                self.line("\t".join(_plain(r.get(c.key)) for c in cols))
            return
        from rich.table import Table
        from rich.text import Text

        t = Table(title=title, title_justify="left", show_header=headings, box=None, pad_edge=False,
                  header_style="bold")
        for c in cols:
            t.add_column(c.heading, overflow="fold")
        for r in rows:
            t.add_row(*(Text(c.human(r.get(c.key)) if c.human else _plain(r.get(c.key))) for c in cols))
        self.out.print(t)

    @contextlib.contextmanager
    def progress(self, what: str) -> Iterator[Progress]:
        """A :class:`~cowdisk.progress.Progress` for one store call, labelled ``what``.

        Each new stage is a line (``build: formatting ext4 image ...``). On a terminal a bar
        shows the bytes, or, while the total is unknown, a spinner and the elapsed time (so
        a long step visibly moves); elsewhere a line at every quarter
        (``import disk.img: 25% of 1.0 GiB``). One closing line says how long it took."""
        start = time.monotonic()
        done_bytes = 0
        next_pct = 0
        task: Any = None
        with contextlib.ExitStack() as stack:
            bar: Any = None
            if self.interactive and not self.quiet:
                from rich.progress import (BarColumn, DownloadColumn, SpinnerColumn, TextColumn, TimeElapsedColumn,
                                           TimeRemainingColumn, TransferSpeedColumn)
                from rich.progress import Progress as Bar

                bar = stack.enter_context(Bar(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                              DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn(),
                                              TimeRemainingColumn(), console=self.err, transient=True))
                task = bar.add_task(what, total=None)

            def report(done: int, total: int, stage: str = "") -> None:
                nonlocal done_bytes, next_pct, task
                if stage:
                    self.info(f"{what}: {stage}")  # printed above the bar on a terminal
                    next_pct = 0
                    if bar is not None and task is not None:  # a new phase: a new bar, size unknown until told
                        bar.remove_task(task)
                        task = bar.add_task(f"{what}: {stage}", total=None)
                done_bytes = done
                if bar is not None and task is not None:
                    bar.update(task, completed=done, total=total or None)
                elif total > 0:
                    pct = done * 100 // total
                    if next_pct <= pct < 100:
                        self.info(f"{what}: {pct}% of {human_bytes(total)}")
                        next_pct = (pct // 25 + 1) * 25

            yield report
        amount = f"{human_bytes(done_bytes)} " if done_bytes else ""
        self.info(f"{what}: done, {amount}in {(time.monotonic() - start) * 1000:.0f} ms")

    def each(self, ids: Sequence[str], what: str, fn: Callable[[str], Any]) -> tuple[list[Any], list[dict[str, Any]]]:
        """Run ``fn`` on every id, each on its own: a failure is reported and the rest still
        run. Returns (results, errors); the command exits with the first error's code."""
        results: list[Any] = []
        errors: list[dict[str, Any]] = []
        for i in ids:
            try:
                results.append(fn(i))
            except (CowdiskError, OSError) as e:
                code = e.exit_code if isinstance(e, CowdiskError) else 1
                errors.append({"id": i, **error_doc(e, code, self.command)})
                click.echo(f"cowdisk {self.command}: error: {i}: {message_of(e)}", err=True)
                hint = getattr(e, "hint", "")
                if hint:
                    click.echo(f"  hint: {hint}", err=True)
        return results, errors

    def finish_each(self, doc: dict[str, Any], errors: list[dict[str, Any]]) -> None:
        """Print ``doc`` (+ its ``errors``) with --json; exit with the first error's code."""
        if self.json:
            self.emit({**doc, "errors": errors})
        if errors:
            self.close()
            raise click.exceptions.Exit(int(errors[0]["exit_code"]))


# -- global options: accepted before or after the subcommand --------------------------------


def _app(ctx: click.Context) -> App | None:
    return ctx.find_object(App)


def _set(attr: str, convert: Callable[[Any], Any] = lambda v: v) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def cb(ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        app = _app(ctx)
        if app is not None and value not in (None, False, 0, ()):
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


PIPE_CLOSED = 141
"""The exit status when stdout's reader went away (128 + SIGPIPE, as coreutils under a shell);
the ``cowdisk`` script ends of SIGPIPE itself."""


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


def error_doc(e: BaseException, code: int, command: str, hint: str = "") -> dict[str, Any]:
    return {"type": type(e).__name__, "exit_code": code, "message": message_of(e),
            "hint": getattr(e, "hint", "") or hint, "command": command, "op": getattr(e, "op", ""),
            "object": getattr(e, "obj", ""), "errno": getattr(e, "errno", None),
            "notes": list(getattr(e, "__notes__", ()))}


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
