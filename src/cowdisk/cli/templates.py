"""``cowdisk template ...``: import, build, list, inspect, verify and remove templates."""

from __future__ import annotations

import os
from typing import Any

import click

from ..errors import CowdiskError
from ..store import Store, validate_id
from .app import App, human_bytes, json_option, parse_size, pass_app, table, when


def template_dict(store: Store, t: Any) -> dict[str, Any]:
    d = t.as_dict()
    try:
        d["disk_bytes"] = store.template_usage(t.id)
    except (CowdiskError, OSError):
        d["disk_bytes"] = None
    return d


def show_template(app: App, store: Store, t: Any, title: str) -> None:
    d = template_dict(store, t)
    if app.json:
        app.emit(d)
        return
    app.kv(title, {"id": d["id"], "names": d["names"], "size": f"{human_bytes(d['size'])} ({d['size']} bytes)",
                   "on disk": human_bytes(d["disk_bytes"]), "digest": f"sha256:{d['digest']}",
                   "state": d["state"], "source": d["source"], "path": d["path"],
                   "volumes": d["users"], "created": when(d["created"])})


@click.group(cls=click.Group)
def template() -> None:
    """Templates: immutable base disk images, known by digest and names.

    \b
    Example:
      cowdisk template build ./rootfs --name base
      cowdisk template ls
    """


@template.command("import")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--name", "-n", help="A name to refer to the template by.")
@click.option("--adopt", is_flag=True, help="Use the image in place (no copy); it must never change.")
@json_option
@pass_app
def template_import(app: App, image: str, name: str | None, adopt: bool, as_json: bool) -> None:
    """Import a raw disk image as a template (copied sparsely, digested, made read-only).

    \b
    Example:
      cowdisk template import ./rootfs.ext4 --name base
    """
    if name is not None:
        validate_id(name, "template name")
    store = app.store(create=True)
    with app.progress(f"import {os.path.basename(image)}") as progress:
        t = store.import_template(image, name, adopt=adopt, progress=progress)
    show_template(app, store, t, f"template {t.id}")


@template.command("build")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", "-n", help="A name to refer to the template by.")
@click.option("--size", "size", help="Image size (e.g. 256M, 2G); default: twice the tree plus 32 MiB, "
                                     "at least 64 MiB.")
@json_option
@pass_app
def template_build(app: App, directory: str, name: str | None, size: str | None, as_json: bool) -> None:
    """Build an ext4 template from a directory tree (mkfs.ext4 -d, no mount, reproducible).

    \b
    Example:
      cowdisk template build ./rootfs --name base --size 512M
    """
    if name is not None:
        validate_id(name, "template name")
    nbytes = parse_size(size) if size is not None else None
    store = app.store(create=True)
    with app.progress("build") as progress:
        t = store.build_template(directory, name, size=nbytes, progress=progress)
    show_template(app, store, t, f"template {t.id}")


@template.command("ls")
@json_option
@pass_app
def template_ls(app: App, as_json: bool) -> None:
    """List templates.

    \b
    Example:
      cowdisk template ls --json | jq -r '.templates[].id'
    """
    rows = []
    if app.has_store():
        store = app.store()
        rows = [template_dict(store, t) for t in store.templates()]
    if app.json:
        app.emit({"templates": rows})
        return
    t = table("id", "names", "size", "on disk", "volumes", "state", "created")
    for d in rows:
        t.add_row(d["id"], ", ".join(d["names"]) or "-", human_bytes(d["size"]), human_bytes(d["disk_bytes"]),
                  str(len(d["users"])), d["state"], when(d["created"]))
    app.out.print(t)


@template.command("inspect")
@click.argument("ref")
@json_option
@pass_app
def template_inspect(app: App, ref: str, as_json: bool) -> None:
    """Show one template (by id, digest prefix or name).

    \b
    Example:
      cowdisk template inspect base
    """
    validate_id(ref, "template name or id")
    store = app.store()
    t = store.template(ref)
    show_template(app, store, t, f"template {t.id}")


@template.command("verify")
@click.argument("ref")
@json_option
@pass_app
def template_verify(app: App, ref: str, as_json: bool) -> None:
    """Re-read a template and check its size, mtime and full content digest (exit 8 if changed).

    \b
    Example:
      cowdisk template verify base && echo intact
    """
    validate_id(ref, "template name or id")
    store = app.store()
    t0 = store.template(ref)
    with app.progress(f"verify {t0.id}") as progress:
        t = store.verify_template(ref, progress=progress)
    if app.json:
        app.emit({"ok": True, "template": template_dict(store, t)})
    else:
        app.out.print(f"template {t.id}: intact (sha256:{t.digest})")


@template.command("rm")
@click.argument("refs", nargs=-1, required=True)
@json_option
@pass_app
def template_rm(app: App, refs: tuple[str, ...], as_json: bool) -> None:
    """Remove templates (refused while volumes use them: exit 6).

    \b
    Example:
      cowdisk template rm base
    """
    for r in refs:
        validate_id(r, "template name or id")
    store = app.store()
    removed: list[str] = []
    for tid in dict.fromkeys(store.template(r).id for r in refs):  # a name and an id may be one template
        store.remove_template(tid)
        removed.append(tid)
        if not app.json:
            app.info(f"removed template {tid}")
    if app.json:
        app.emit({"removed": removed})
