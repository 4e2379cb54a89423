"""Store maintenance and the host: ``cowdisk recover``, ``gc`` and ``doctor``."""

from __future__ import annotations

from typing import Any, Callable

import click

from .. import doctor as doctor_mod
from ..store import Store
from rich.text import Text

from .app import App, Column, CowdiskCommand, pass_app, table

REPORT_KEYS = ("rolled_back", "finished", "reactivated", "orphans_removed", "kept", "errors")
"""The keys of a recovery report, in order: what ``recover``/``gc`` print on a root with no store."""


def _maintain(app: App, what: str, run: Callable[[Store], Any]) -> None:
    """Run ``recover`` or ``gc`` (which recover themselves) and report; exit 1 if a repair failed."""
    if app.has_store():
        rep: dict[str, Any] = run(app.store(recover=False)).as_dict()
    else:
        rep = {k: [] for k in REPORT_KEYS}
    if app.json:
        app.emit(rep)
    else:
        rows = [{"action": k, "object": str(o)} for k, v in rep.items() for o in v]
        if rows:
            app.listing(rows, [Column("action"), Column("object")], title=what)
        else:
            app.info(f"{what}: nothing to do")
    if rep["errors"]:
        raise click.exceptions.Exit(1)


@click.command(cls=CowdiskCommand)
@pass_app
def recover(app: App) -> None:
    """Reconcile registry, kernel and files after a crash or reboot (safe to run any time).

    Finishes or rolls back interrupted operations, re-attaches volumes whose device
    is gone, removes only true orphans of this store; a running volume is never
    torn down. Exit 1 if some repair failed (listed under errors).

    \b
    Example:
      cowdisk recover --json
    """
    _maintain(app, "recover", Store.recover)


@click.command(cls=CowdiskCommand)
@pass_app
def gc(app: App) -> None:
    """Recover, then remove templates that no volume uses and that have no name.

    \b
    Example:
      cowdisk gc
    """
    _maintain(app, "gc", Store.gc)


@click.command(cls=CowdiskCommand)
@pass_app
def doctor(app: App) -> None:
    """Report which kernel features and tools this host has, and the backend `auto` picks.

    Read-only: it creates no store, loop device or mount.

    \b
    Example:
      cowdisk doctor
      cowdisk --root /srv/cowdisk doctor --json | jq -r .backend
    """
    rep = doctor_mod.check(app.root)
    if app.json:
        app.emit(rep.as_dict())
        return
    t = table("check", "", "detail", title=f"cowdisk doctor: {rep.root}", title_justify="left")
    for c in rep.checks:
        mark = {True: Text("ok", style="green"), False: Text("no", style="red"), None: Text("->", style="cyan")}[c.ok]
        detail = Text(c.detail)
        if c.hint:
            detail.append("\n" + c.hint, style="dim")
        t.add_row(Text(c.name), mark, detail)
    app.out.print(t)
    if rep.dm_version:
        app.out.print("dm targets: " + ", ".join(f"{k} {v or 'absent'}" for k, v in rep.dm_targets.items()))
    app.out.print(f"backend auto -> {rep.backend}")
    for w in rep.why:
        app.out.print(f"  - {w}")
