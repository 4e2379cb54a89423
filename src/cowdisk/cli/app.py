"""What every command shares: the :class:`App` (options, the store, all output), progress
rendering, and the one place errors become a message and an exit code.

Data goes to stdout (rich tables for people, one JSON document with ``--json``);
messages, progress and errors go to stderr. Progress bars run only when stderr is a
terminal; otherwise the same progress is printed as plain lines. Every failure ends
in :meth:`CowdiskGroup.invoke`, which prints what failed, on what, and what to do,
and exits with the error's ``exit_code`` (cowdisk/errors.py; docs/cli.md lists them).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from typing import Any, Iterator

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.progress import Progress as Bar
from rich.table import Table

from ..errors import CowdiskError, InvalidArgument, NotFound, message_of
from ..progress import Progress
from ..store import Store


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024:
            return f"{int(v)} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} TiB"


def parse_size(text: str) -> int:
    """``4096``, ``512K``, ``64M``, ``1G``, ``1GiB`` -> bytes (powers of 1024)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    for i, suf in enumerate("KMGT", start=1):
        if t.endswith(suf):
            mult, t = 1024 ** i, t[:-1]
            break
    try:
        n = int(t) * mult
    except ValueError:
        raise InvalidArgument(f"invalid size {text!r}", op="parse size", obj=text,
                              hint="a number of bytes, or with a suffix K, M, G or T") from None
    if n <= 0:
        raise InvalidArgument(f"invalid size {text!r}: must be positive", op="parse size", obj=text)
    return n


def table(*columns: str, **kw: Any) -> Table:
    """A table whose cells fold rather than being cut with an ellipsis (ids and paths must stay whole)."""
    t = Table(**kw)
    for c in columns:
        t.add_column(c, overflow="fold")
    return t


def when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


class App:
    """What every command gets on ``ctx.obj``: the options, the store, and all output."""

    def __init__(self, root: str, backend: str, verbose: int, quiet: bool) -> None:
        self.root = os.path.abspath(root)
        self.backend = backend
        self.verbose = verbose
        self.quiet = quiet
        self.json = False
        # off a terminal (pipes, CI) rich would assume 80 columns; prefer whole lines
        width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
        self.out = Console(highlight=False, soft_wrap=True, width=width)
        self.err = Console(stderr=True, highlight=False)
        self.interactive = sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
        self._store: Store | None = None

    # -- the store -------------------------------------------------------------------

    def has_store(self) -> bool:
        return os.path.exists(os.path.join(self.root, "registry.db"))

    def store(self, *, create: bool = False, recover: bool = True) -> Store:
        """The store at ``--root``; only commands that import or build may create one.

        Opening a store runs recovery; ``recover``/``gc`` open it with ``recover=False`` and
        run it themselves, so that they can report what it did."""
        if self._store is None:
            if not create and not self.has_store():
                raise NotFound(f"no cowdisk store at {self.root}", op="open store", obj=self.root,
                               hint="build or import a template first (`cowdisk template build DIR`), "
                                    "or point --root / COWDISK_ROOT at an existing store")
            self._store = Store(self.root, backend=self.backend, recover=recover)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    # -- output ------------------------------------------------------------------------

    def info(self, msg: str) -> None:
        if not self.quiet:
            self.err.print(msg, markup=False)

    def emit(self, data: Any) -> None:
        """The one JSON document a ``--json`` command writes to stdout."""
        click.echo(json.dumps(data, indent=2, default=str))

    def kv(self, title: str, data: dict[str, Any]) -> None:
        t = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False)
        t.add_column(style="bold")
        t.add_column(overflow="fold")
        for k, v in data.items():
            if isinstance(v, (list, tuple)):
                v = ", ".join(map(str, v)) or "-"
            t.add_row(k, "-" if v is None else str(v))
        self.out.print(t)

    @contextlib.contextmanager
    def progress(self, what: str) -> Iterator[Progress]:
        """A :class:`~cowdisk.progress.Progress` for one store call, labelled ``what``.

        Each new stage is a line (``build: formatting ext4 image ...``). Bytes are a rich
        bar on a terminal, else a line at every quarter (``import disk.img: 25% of 1.0 GiB``).
        One closing line says how long it took."""
        start = time.monotonic()
        seen = {"done": 0, "next": 0}
        with contextlib.ExitStack() as stack:
            bar: Bar | None = None
            if self.interactive and not self.quiet:
                bar = stack.enter_context(Bar(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                              TransferSpeedColumn(), TimeRemainingColumn(), console=self.err,
                                              transient=True))
                seen["task"] = bar.add_task(what, total=None)

            def report(done: int, total: int, stage: str = "") -> None:
                if stage:
                    self.info(f"{what}: {stage}")  # printed above the bar on a terminal
                    seen["next"] = 0
                    if bar is not None:  # a new phase: a new bar, its size unknown until told
                        bar.remove_task(seen["task"])
                        seen["task"] = bar.add_task(f"{what}: {stage}", total=None)
                seen["done"] = done
                if bar is not None:
                    bar.update(seen["task"], completed=done, total=total or None)
                elif total > 0:
                    pct = done * 100 // total
                    if seen["next"] <= pct < 100:
                        self.info(f"{what}: {pct}% of {human_bytes(total)}")
                        seen["next"] = (pct // 25 + 1) * 25

            yield report
        amount = f"{human_bytes(seen['done'])} " if seen["done"] else ""
        self.info(f"{what}: done, {amount}in {(time.monotonic() - start) * 1000:.0f} ms")


class CowdiskGroup(click.Group):
    """The root group: turns every cowdisk error into a message on stderr and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CowdiskError as e:
            report_error(ctx, e, e.exit_code)
        except OSError as e:  # not wrapped by cowdisk: permissions on --root, a full disk...
            report_error(ctx, e, 1, hint="check --root and that you run as root")


def report_error(ctx: click.Context, e: BaseException, code: int, hint: str = "") -> None:
    """Print ``e`` (and one JSON error document with ``--json``), then exit with ``code``."""
    app = ctx.find_object(App)
    hint = getattr(e, "hint", "") or hint
    msg = message_of(e)
    notes = list(getattr(e, "__notes__", ()))
    if app is not None and app.json:
        click.echo(json.dumps({"error": {
            "type": type(e).__name__, "exit_code": code, "message": msg, "hint": hint,
            "op": getattr(e, "op", ""), "object": getattr(e, "obj", ""),
            "errno": getattr(e, "errno", None), "notes": notes}}, indent=2))
    click.echo(f"cowdisk: error: {msg}", err=True)
    for n in notes:
        click.echo(f"  note: {n}", err=True)
    if hint:
        click.echo(f"  hint: {hint}", err=True)
    if app is not None and app.verbose:
        traceback.print_exception(e, file=sys.stderr)
    if app is not None:
        app.close()
    raise click.exceptions.Exit(code)


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        app = ctx.find_object(App)
        if app is not None:
            app.json = True
    return value


json_option = click.option("--json", "as_json", is_flag=True, callback=_set_json, is_eager=True,
                           help="Print one JSON document on stdout (stable keys) instead of tables.")

pass_app = click.make_pass_decorator(App)
