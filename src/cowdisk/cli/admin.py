"""Store maintenance and the host: ``cowdisk recover``, ``gc`` and ``doctor``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import click

from ..errors import CowdiskError
from .app import CowdiskCommand, pass_app, table
from .base import App, Column
REPORT_KEYS = ("rolled_back", "finished", "reactivated", "orphans_removed", "adopted", "quarantined", "kept",
               "in_quarantine", "errors")
"""The keys of a recovery report, in order: what ``recover``/``gc`` print on a root with no store."""

if TYPE_CHECKING:
    from ..contract import StoreAPI


def _maintain(app: App, what: str, run: Callable[[StoreAPI], Any], have: Any = None) -> None:
    """Run ``recover`` or ``gc`` (which recover themselves) and report; exit 1 if a repair failed."""
    if have is not None:
        rep: dict[str, Any] = have.as_dict()
    elif app.has_store():
        rep = run(app.store(recover=False)).as_dict()
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
@click.option("--rebuild-registry", is_flag=True,
              help="Rebuild a lost or damaged registry from the manifests beside each volume and template "
                   "(the damaged files are kept aside).")
@pass_app
def recover(app: App, rebuild_registry: bool) -> None:
    """Reconcile registry, kernel and files after a crash or reboot (safe to run any time).

    Finishes or rolls back interrupted operations, re-attaches volumes whose device
    is gone, removes only true orphans of this store; a running volume is never
    torn down; data the registry does not account for is registered again from its
    manifest or moved to the quarantine, never deleted. Exit 1 if some repair failed
    (listed under errors).

    \b
    Example:
      cowdisk recover --json
      cowdisk recover --rebuild-registry     # after exit code 13 (registry damaged or lost)
    """
    from ..store import Store

    if rebuild_registry:
        s, rep, moved = Store.rebuild_registry(app.root)
        s.close()
        for m in moved:
            app.info(f"kept the damaged registry file as {m}")
        _maintain(app, "recover", lambda _s: rep, have=rep)
        return
    _maintain(app, "recover", lambda s: s.recover())


@click.command(cls=CowdiskCommand)
@click.option("--purge", is_flag=True, help="Also delete quarantined data (see `recover`) older than --older-than.")
@click.option("--older-than", "older_than", default="24h", show_default=True, metavar="AGE",
              help="With --purge: the age (s, m, h, d) quarantined data must have to be deleted.")
@pass_app
def gc(app: App, purge: bool, older_than: str) -> None:
    """Recover, then remove templates that no volume uses and that have no name.

    \b
    Example:
      cowdisk gc
      cowdisk gc --purge --older-than 7d
    """
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        age = float(older_than[:-1]) * units[older_than[-1]] if older_than[-1:] in units else float(older_than)
    except ValueError:
        raise click.BadParameter(f"{older_than!r}: use a number with s, m, h or d", param_hint="--older-than")
    _maintain(app, "gc", lambda s: s.gc(purge=purge, older_than_s=age))


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
    from rich.text import Text

    from .. import doctor as doctor_mod

    rep = doctor_mod.check(app.root)
    if app.has_store():  # a store here: how full its areas are (dm-thin's pool too)
        try:
            rep.checks += doctor_mod.space_checks(app.store().space())
        except CowdiskError as e:
            rep.checks.append(doctor_mod.Check("space", False, f"cannot open the store: {doctor_mod.message_of(e)}",
                                               e.hint))
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
