"""``cowdisk volume ...``: create, list, inspect, checkpoint, restore, fork, flatten, jail, drive,
usage and remove volumes."""

from __future__ import annotations

import contextlib
from typing import Any

import click

from .. import drive as drive_mod
from ..errors import CowdiskError, InvalidArgument
from ..store import validate_id
from .app import App, human_bytes, json_option, pass_app, table, when
from .templates import show_template


def _show_volume(app: App, v: Any, title: str, extra: dict[str, Any] | None = None) -> None:
    d = v.as_dict()
    if extra:
        d.update(extra)
    if app.json:
        app.emit(d)
        return
    rows = {"id": d["id"], "state": d["state"], "backend": d["backend"], "template": d["template_id"],
            "size": human_bytes(d["size"]), "link": d["link"], "device": d["device"], "data": d["data_path"],
            "parent": d["parent"], "created": when(d["created"])}
    if d.get("error"):
        rows["error"] = d["error"]
    u = d.get("usage")
    if u:
        rows["on disk"] = f"{human_bytes(u['own_bytes'])} own, {human_bytes(u['disk_bytes'])} allocated, " \
                          f"{human_bytes(u['apparent_bytes'])} apparent"
        rows["health"] = u["health"]
    app.kv(title, rows)


def _usage_dict(u: Any) -> dict[str, Any]:
    d = dict(u.__dict__)
    d["own_bytes"] = u.own_bytes
    return d


@click.group(cls=click.Group)
def volume() -> None:
    """Volumes: one sandbox's writable copy-on-write disk over a template.

    \b
    Example:
      cowdisk volume create vm1 --template base
      cowdisk volume checkpoint vm1
      cowdisk volume restore vm1 --as vm2
    """


@volume.command("create")
@click.argument("vid", metavar="ID")
@click.option("--template", "-t", "tref", required=True, help="Template id, digest prefix or name.")
@json_option
@pass_app
def volume_create(app: App, vid: str, tref: str, as_json: bool) -> None:
    """Create a volume over a template, attached, with its stable link.

    \b
    Example:
      cowdisk volume create vm1 --template base
    """
    validate_id(vid)
    validate_id(tref, "template name or id")
    store = app.store()
    with app.progress(f"create {vid}") as progress:
        v = store.create_volume(vid, tref, progress=progress)
    _show_volume(app, v, f"volume {v.id}")


@volume.command("ls")
@click.option("--template", "-t", "tref", help="Only volumes of this template.")
@json_option
@pass_app
def volume_ls(app: App, tref: str | None, as_json: bool) -> None:
    """List volumes.

    \b
    Example:
      cowdisk volume ls --json | jq -r '.volumes[] | select(.state=="attached") | .id'
    """
    vols: list[Any] = []
    if app.has_store():
        store = app.store()
        vols = store.volumes()
        if tref is not None:
            validate_id(tref, "template name or id")
            tid = store.template(tref).id
            vols = [v for v in vols if v.template_id == tid]
    if app.json:
        app.emit({"volumes": [v.as_dict() for v in vols]})
        return
    t = table("id", "state", "backend", "template", "size", "link", "device")
    for v in vols:
        t.add_row(v.id, v.state, v.backend, v.template_id, human_bytes(v.size), v.link, v.device or "-")
    app.out.print(t)


@volume.command("inspect")
@click.argument("vid", metavar="ID")
@json_option
@pass_app
def volume_inspect(app: App, vid: str, as_json: bool) -> None:
    """Show one volume, with what it costs on disk.

    \b
    Example:
      cowdisk volume inspect vm1 --json | jq .usage.own_bytes
    """
    validate_id(vid)
    store = app.store()
    v = store.volume(vid)
    usage = None
    with contextlib.suppress(CowdiskError, OSError):
        usage = _usage_dict(store.usage(vid))
    _show_volume(app, v, f"volume {v.id}", {"usage": usage})


@volume.command("checkpoint")
@click.argument("vid", metavar="ID")
@json_option
@pass_app
def volume_checkpoint(app: App, vid: str, as_json: bool) -> None:
    """Detach a volume and keep its data (pause or stop the VM first).

    \b
    Example:
      cowdisk volume checkpoint vm1
    """
    validate_id(vid)
    v = app.store().checkpoint(vid)
    _show_volume(app, v, f"volume {v.id} checkpointed")


@volume.command("restore")
@click.argument("vid", metavar="ID")
@click.option("--as", "new_id", metavar="NEW_ID", help="Restore as a new volume (the checkpoint is kept).")
@click.option("--no-retarget", is_flag=True,
              help="With --as: leave ID's stable link alone (by default it points at the new volume, "
                   "as the path a VM snapshot recorded).")
@json_option
@pass_app
def volume_restore(app: App, vid: str, new_id: str | None, no_retarget: bool, as_json: bool) -> None:
    """Attach a checkpointed volume again, in place or as a new volume.

    \b
    Example:
      cowdisk volume restore vm1              # in place
      cowdisk volume restore vm1 --as vm1b    # a copy; vm1's link now points at vm1b
    """
    validate_id(vid)
    if new_id is not None:
        validate_id(new_id, "new volume id")
    store = app.store()
    with app.progress(f"restore {vid}" + (f" as {new_id}" if new_id else "")) as progress:
        v = store.restore(vid, new_id, retarget_source_link=not no_retarget, progress=progress)
    _show_volume(app, v, f"volume {v.id} restored")


@volume.command("fork")
@click.argument("vid", metavar="ID")
@click.argument("new_ids", metavar="NEW_ID...", nargs=-1, required=True)
@json_option
@pass_app
def volume_fork(app: App, vid: str, new_ids: tuple[str, ...], as_json: bool) -> None:
    """Make new volumes that each start from ID's current contents.

    \b
    Example:
      cowdisk volume fork vm1 vm1-a vm1-b
    """
    validate_id(vid)
    for n in new_ids:
        validate_id(n, "new volume id")
    store = app.store()
    with app.progress(f"fork {vid}") as progress:
        vols = store.fork(vid, list(new_ids), progress=progress)
    if app.json:
        app.emit({"volumes": [v.as_dict() for v in vols]})
        return
    for v in vols:
        app.out.print(f"volume {v.id}: {v.state}, link {v.link}")


@volume.command("flatten")
@click.argument("vid", metavar="ID")
@click.option("--name", "-n", help="A name for the new template.")
@json_option
@pass_app
def volume_flatten(app: App, vid: str, name: str | None, as_json: bool) -> None:
    """Materialise a volume (template + its changes) as a new template.

    \b
    Example:
      cowdisk volume flatten vm1 --name base-v2
    """
    validate_id(vid)
    if name is not None:
        validate_id(name, "template name")
    store = app.store()
    with app.progress(f"flatten {vid}") as progress:
        t = store.flatten(vid, name, progress=progress)
    show_template(app, store, t, f"template {t.id} (from volume {vid})")


@volume.command("jail")
@click.argument("vid", metavar="ID")
@click.argument("jail_dir", type=click.Path(file_okay=False))
@click.option("--name", default="rootfs", show_default=True, help="File name inside the jail.")
@click.option("--uid", type=int, help="Owner of the node (the jailed VMM's uid).")
@click.option("--gid", type=int, help="Group of the node.")
@json_option
@pass_app
def volume_jail(app: App, vid: str, jail_dir: str, name: str, uid: int | None, gid: int | None,
                as_json: bool) -> None:
    """Stage an attached volume inside a jail directory (a device node, or a hard link for files).

    \b
    Example:
      cowdisk volume jail vm1 /srv/jailer/firecracker/vm1/root --uid 1000 --gid 1000
    """
    validate_id(vid)
    if not name or "/" in name or name in (".", ".."):
        raise InvalidArgument(f"invalid jail file name {name!r}", op="jail", obj=name,
                              hint="a plain file name, no '/'")
    path = app.store().jail(vid, jail_dir, name, uid=uid, gid=gid)
    if app.json:
        app.emit({"volume": vid, "path": path})
    else:
        app.out.print(path)


@volume.command("drive")
@click.argument("vid", metavar="ID")
@click.option("--format", "-f", "fmt", required=True, type=click.Choice(drive_mod.FORMATS),
              help="The VMM to configure.")
@click.option("--readonly", is_flag=True, help="Configure the drive read-only.")
@json_option
@pass_app
def volume_drive(app: App, vid: str, fmt: str, readonly: bool, as_json: bool) -> None:
    """Print a VMM's drive configuration for the volume's stable link.

    The path is the stable link (not the device), so the same configuration works
    after a checkpoint and a restore, even under a new id.

    \b
    Example:
      cowdisk volume drive vm1 --format firecracker
      qemu-system-x86_64 ... $(cowdisk volume drive vm1 --format qemu)
      cloud-hypervisor ... $(cowdisk volume drive vm1 --format cloud-hypervisor)
    """
    validate_id(vid)
    v = app.store().volume(vid)
    try:
        text = drive_mod.render(fmt, v.link, readonly=readonly)
        if fmt == "firecracker":
            config: Any = drive_mod.firecracker(v.link, is_read_only=readonly)
        elif fmt == "cloud-hypervisor":
            config = drive_mod.cloud_hypervisor(v.link, readonly=readonly).split(" ", 1)
        else:
            config = drive_mod.qemu(v.link, readonly=readonly)
    except ValueError as e:
        raise InvalidArgument(f"volume drive {vid}: {e}", op="volume drive", obj=v.link) from None
    if app.json:
        app.emit({"volume": vid, "format": fmt, "path": v.link, "state": v.state, "config": config})
        return
    if v.state != "attached":
        app.info(f"note: volume {vid} is {v.state}; restore it before starting the VM")
    click.echo(text)


@volume.command("usage")
@click.argument("vids", metavar="[ID...]", nargs=-1)
@json_option
@pass_app
def volume_usage(app: App, vids: tuple[str, ...], as_json: bool) -> None:
    """What each volume costs on disk (real allocation, not apparent size).

    own = bytes only this volume holds (exclusive extents where blocks are shared,
    else its allocated bytes); allocated = st_blocks of its data file.

    \b
    Example:
      cowdisk volume usage
      cowdisk volume usage vm1 --json | jq '.volumes[0].own_bytes'
    """
    for v in vids:
        validate_id(v)
    rows = []
    if app.has_store():
        store = app.store()
        ids = list(vids) or [v.id for v in store.volumes()]
        for vid in ids:
            v = store.volume(vid)
            rows.append({"id": vid, "state": v.state, "template_id": v.template_id,
                         **_usage_dict(store.usage(vid))})
    elif vids:
        app.store()  # raises NotFound with the hint
    if app.json:
        app.emit({"volumes": rows})
        return
    t = table("id", "state", "template", "own", "allocated", "apparent", "cow used", "health")
    for r in rows:
        cow = "-" if r["cow_used_bytes"] is None else \
            f"{human_bytes(r['cow_used_bytes'])} / {human_bytes(r['cow_total_bytes'])}"
        t.add_row(r["id"], r["state"], r["template_id"], human_bytes(r["own_bytes"]), human_bytes(r["disk_bytes"]),
                  human_bytes(r["apparent_bytes"]), cow, r["health"])
    app.out.print(t)


@volume.command("rm")
@click.argument("vids", metavar="ID...", nargs=-1, required=True)
@json_option
@pass_app
def volume_rm(app: App, vids: tuple[str, ...], as_json: bool) -> None:
    """Detach and delete volumes and their data (exit 6 while a VM holds the device).

    \b
    Example:
      cowdisk volume rm vm1 vm2
    """
    for v in vids:
        validate_id(v)
    store = app.store()
    removed = []
    for vid in vids:
        store.remove_volume(vid)
        removed.append(vid)
        if not app.json:
            app.info(f"removed volume {vid}")
    if app.json:
        app.emit({"removed": removed})
