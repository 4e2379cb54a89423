"""What the commands share that needs no click: the :class:`App` (the options, the store, all
output), listing columns, ``-o`` and ``--filter``, and the error document. The click side
(the root group, the global options, error reporting) is :mod:`.app`; this module is what
:mod:`.light` runs a listing with, without importing click (bench/startup.py).

Data goes to stdout: a table for people on a terminal; plain tab-separated lines (raw
values, no wrapping, no markup) when stdout is not a terminal; one JSON document with
``--json``. Messages, progress and errors go to stderr. Data is never read as markup or
emoji (an id ``a[red]x`` prints as ``a[red]x``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from ..errors import CowdiskError, InvalidArgument, NotFound, message_of
from ..progress import Progress

if TYPE_CHECKING:  # imported when a command needs them (start-up: bench/startup.py)
    from rich.console import Console

    from ..contract import StoreAPI
    from ..store import Store


PIPE_CLOSED = 141
"""The exit status when stdout's reader went away (128 + SIGPIPE, as coreutils under a shell);
the ``cowdisk`` script ends of SIGPIPE itself."""


def overrides(value: Any) -> bool:
    """Whether a global option given after the subcommand changes what the root set (a flag
    not given, a count or a number of 0, no value: no)."""
    return value not in (None, False, 0, ())


def echo(text: str, *, err: bool = False) -> None:
    """One line on stdout (``err``: stderr), flushed (progress and messages interleave)."""
    stream = sys.stderr if err else sys.stdout
    stream.write(text + "\n")
    stream.flush()


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

    def use(self, store: StoreAPI) -> None:
        """Go through ``store`` (a client of the daemon that serves ``--root``, cli/light.py)."""
        self._store = store

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
            echo(msg, err=True)
            return
        from rich.text import Text

        self.err.print(Text(msg))

    def emit(self, data: Any) -> None:
        """The one JSON document a ``--json`` command writes to stdout."""
        import json

        echo(json.dumps(data, indent=2, default=str))

    def line(self, text: str) -> None:
        echo(text)

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
                echo(f"cowdisk {self.command}: error: {i}: {message_of(e)}", err=True)
                hint = getattr(e, "hint", "")
                if hint:
                    echo(f"  hint: {hint}", err=True)
        return results, errors

    def finish_each(self, doc: dict[str, Any], errors: list[dict[str, Any]]) -> None:
        """Print ``doc`` (+ its ``errors``) with --json; exit with the first error's code."""
        if self.json:
            self.emit({**doc, "errors": errors})
        if errors:
            self.close()
            raise SystemExit(int(errors[0]["exit_code"]))


def error_doc(e: BaseException, code: int, command: str, hint: str = "") -> dict[str, Any]:
    return {"type": type(e).__name__, "exit_code": code, "message": message_of(e),
            "hint": getattr(e, "hint", "") or hint, "command": command, "op": getattr(e, "op", ""),
            "object": getattr(e, "obj", ""), "errno": getattr(e, "errno", None),
            "notes": list(getattr(e, "__notes__", ()))}
