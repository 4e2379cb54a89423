"""A store's life cycle: ``cowdisk store init``, ``store info``, ``store destroy``."""

from __future__ import annotations

from typing import Any

import click

from ..errors import InvalidArgument
from .app import CowdiskCommand, CowdiskGroup, pass_app
from .base import App, human_bytes
@click.group(cls=CowdiskGroup)
def store() -> None:
    """Make, describe and delete a store (the state root at --root).

    \b
    Example:
      cowdisk --root /srv/cowdisk --backend pool store init
      cowdisk --root /srv/cowdisk store info --json
    """


@store.command("init", cls=CowdiskCommand)
@click.option("-o", "--option", "options", multiple=True, metavar="KEY=VALUE",
              help="A backend option, recorded with the store (repeatable; see the backend's docs).")
@pass_app
def store_init(app: App, options: tuple[str, ...]) -> None:
    """Make a store at --root with --backend (checked on this host before anything is recorded).

    \b
    Example:
      cowdisk --root /srv/cowdisk --backend pool store init
    """
    opts = {}
    for o in options:
        key, sep, value = o.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"backend option {o!r}: use KEY=VALUE", op="store init", obj=o)
        opts[key] = value
    from ..store import Store

    with Store(app.root, backend=app.backend, backend_options=opts or None) as s:
        _show(app, s.info())


@store.command("info", cls=CowdiskCommand)
@pass_app
def store_info(app: App) -> None:
    """What the store is and holds: id, backend, places, volumes by state, space.

    \b
    Example:
      cowdisk store info --json
    """
    _show(app, app.store().info())


@store.command("destroy", cls=CowdiskCommand)
@click.option("--force", is_flag=True, help="Also remove attached volumes (not ones a VM holds open).")
@click.option("--yes", is_flag=True, help="Do not ask.")
@pass_app
def store_destroy(app: App, force: bool, yes: bool) -> None:
    """Delete the whole store: volumes, templates, cache, pool, quarantine, registry and the
    root directory itself. Refused while volumes are attached, unless --force.

    \b
    Example:
      cowdisk --root /srv/cowdisk store destroy --yes
    """
    s = app.store()
    if not yes and not app.json:
        click.confirm(f"delete the store at {s.root} and everything in it?", abort=True, err=True)
    removed = s.destroy_store(force=force)
    if app.json:
        app.emit({"removed": removed})
    else:
        app.info(f"destroyed store {s.root} ({len(removed) - 1} volumes and templates)")


def _show(app: App, info: dict[str, Any]) -> None:
    if app.json:
        app.emit(info)
        return
    text = dict(info)
    for s in text.pop("space", None) or []:  # one line per area: "12.0% of 252 GiB, ok"
        text[f"space: {s['area']}"] = (f"{s['pct']}% of {human_bytes(s['total_bytes'])} "
                                       f"({human_bytes(s['used_bytes'])} used), {s['state']}")
    app.kv(f"store {info['root']}", text)
