"""``cowdisk volume ...``: create, list, inspect, checkpoint, restore, fork, flatten, jail, drive,
usage and remove volumes."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import click

from ..errors import CowdiskError, InvalidArgument, NotFound
from ..model import validate_id
from .app import CowdiskSubGroup, LazyChoice, complete_templates, complete_volumes, list_options, parse_size, pass_app
from .base import App, Column, human_bytes, select_columns, when
from .lists import VOLUME_COLUMNS, list_volumes
from .refs import owner_name, parse_owner, show_template, template_ref

if TYPE_CHECKING:
    from ..contract import StoreAPI
    from ..store import Volume

USAGE_COLUMNS = [Column("id"), Column("state"), Column("template_id", "template"),
                 Column("own_bytes", "own", human=human_bytes), Column("disk_bytes", "allocated", human=human_bytes),
                 Column("apparent_bytes", "apparent", human=human_bytes), Column("cow", "cow used"),
                 Column("health"), Column("exclusive_bytes", default=False), Column("shared_bytes", default=False),
                 Column("cow_used_bytes", default=False), Column("cow_total_bytes", default=False)]


def _show_volume(app: App, store: StoreAPI, v: Volume, title: str, extra: dict[str, Any] | None = None) -> None:
    app.show(v.as_dict() | (extra or {}), title, _volume_rows)


def _volume_rows(d: dict[str, Any]) -> dict[str, Any]:
    rows = {"id": d["id"], "state": d["state"], "backend": d["backend"], "template": d["template_id"],
            "size": human_bytes(d["size"]), "link": d["link"], "links": d["links"], "device": d["device"],
            "data": d["data_path"], "parent": d["parent"], "owner": owner_name(d["owner"]),
            "created": when(d["created"])}
    if d.get("error"):
        rows["error"] = d["error"]
    u = d.get("usage")
    if u:
        rows["on disk"] = f"{human_bytes(u['own_bytes'])} own, {human_bytes(u['disk_bytes'])} allocated, " \
                          f"{human_bytes(u['apparent_bytes'])} apparent"
        rows["health"] = u["health"]
    return rows


@click.group(cls=CowdiskSubGroup)
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
@click.option("--template", "-t", "tref", required=True, help="Template id, digest prefix or name.",
              shell_complete=complete_templates)
@click.option("--size", "size", help="Make the volume this large (e.g. 4G; at least the template's size; "
                                     "backends dm-thin, reflink, pool, copy). Its ext4 is grown to fill it.")
@click.option("--no-grow-fs", "no_grow_fs", is_flag=True,
              help="With --size: leave the filesystem as it is (the guest grows it).")
@pass_app
def volume_create(app: App, vid: str, tref: str, size: str | None, no_grow_fs: bool) -> None:
    """Create a volume over a template, attached, with its stable link.

    \b
    Example:
      cowdisk volume create vm1 --template base
      cowdisk volume create vm2 --template base --size 4G
    """
    validate_id(vid)
    tref = template_ref(tref)
    nbytes = parse_size(size) if size is not None else None
    store = app.store()
    with app.progress(f"create {vid}") as progress:
        v = store.create_volume(vid, tref, size=nbytes, grow_fs=not no_grow_fs, progress=progress)
    _show_volume(app, store, v, f"volume {v.id}")


@volume.command("ls")
@click.option("--template", "-t", "tref", help="Only volumes of this template.", shell_complete=complete_templates)
@list_options(VOLUME_COLUMNS, "volumes", "state=attached, template=REF: an id, name or digest, owner=UID or user name, "
                                  "links: one of them")
@pass_app
def volume_ls(app: App, tref: str | None, ids_only: bool, no_headings: bool, columns: str | None,
              filters: tuple[str, ...]) -> None:
    """List volumes; `links` are all the stable links that reach each one (after a
    `restore --as`, the source's link serves the new volume).

    Off a terminal the table is tab-separated raw values (sizes in bytes), one line each.

    \b
    Example:
      cowdisk volume ls
      cowdisk volume ls -q | xargs cowdisk volume rm
      cowdisk volume ls --no-headings -o id,state,device
      cowdisk volume ls -o +parent --filter state=checkpointed
      cowdisk volume ls --json | jq -r '.volumes[] | select(.state=="attached") | .id'
    """
    list_volumes(app, tref, ids_only, no_headings, columns, filters)


@volume.command("inspect")
@click.argument("vids", metavar="ID...", nargs=-1, required=True, shell_complete=complete_volumes)
@pass_app
def volume_inspect(app: App, vids: tuple[str, ...]) -> None:
    """Show volumes: every link that points at each, and what it costs on disk. One ID
    prints its volume (--json: the document); several, each on its own (--json:
    {"volumes": [...], "errors": [...]}; the exit code is the first failure's).

    \b
    Example:
      cowdisk volume inspect vm1 --json | jq .usage.own_bytes
      cowdisk volume inspect vm1 vm2
    """
    store = app.store()

    def one(vid: str) -> dict[str, Any]:
        validate_id(vid)
        v = store.volume(vid)
        usage = None
        with contextlib.suppress(CowdiskError, OSError):
            usage = store.usage(vid).as_dict()
        if len(vids) == 1 or not app.json:
            _show_volume(app, store, v, f"volume {v.id}", {"usage": usage})
        return v.as_dict() | {"usage": usage}

    if len(vids) == 1:  # one volume: its document, its error as any command's
        one(vids[0])
        return
    docs, errors = app.each(vids, "inspect volume", one)
    app.finish_each({"volumes": docs}, errors)


@volume.command("checkpoint")
@click.argument("vids", metavar="ID...", nargs=-1, required=True, shell_complete=complete_volumes)
@pass_app
def volume_checkpoint(app: App, vids: tuple[str, ...]) -> None:
    """Detach volumes and keep their data (pause or stop the VM first); each volume's stable
    link is removed until it is restored. Refused (exit 6) while a process holds the device:
    waits --timeout seconds (default 5) for it to let go.

    \b
    Example:
      cowdisk volume checkpoint vm1
      cowdisk volume checkpoint --timeout 30 vm1 vm2
    """
    store = app.store()

    def one(vid: str) -> dict[str, Any]:
        validate_id(vid)
        v = store.checkpoint(vid, **app.deadline())
        if not app.json:
            app.info(f"checkpointed volume {v.id}")
        return v.as_dict()

    vols, errors = app.each(vids, "checkpoint volume", one)
    app.finish_each({"volumes": vols}, errors)


@volume.command("restore")
@click.argument("vid", metavar="ID", shell_complete=complete_volumes)
@click.option("--as", "new_id", metavar="NEW_ID", help="Restore as a new volume (the checkpoint is kept).")
@click.option("--no-retarget", is_flag=True,
              help="With --as: leave ID's stable link alone (by default it points at the new volume, "
                   "as the path a VM snapshot recorded).")
@click.option("--adopt", is_flag=True,
              help="rbd: when this store does not know ID, adopt it first from the shared pool (a volume "
                   "another store checkpointed; see `volume adopt`).")
@click.option("--steal", is_flag=True,
              help="rbd: the fencing step for a volume another store still holds (its host died): that "
                   "store's clients are cut off from the cluster for good, then ID is attached here.")
@pass_app
def volume_restore(app: App, vid: str, new_id: str | None, no_retarget: bool, adopt: bool, steal: bool) -> None:
    """Attach a checkpointed volume again, in place or as a new volume.

    On rbd a volume another store holds attached is refused (exit 6, naming that store
    and its host); --steal fences that store first. Use it only when that host is dead
    or cut off: a VM still running there loses its disk.

    \b
    Example:
      cowdisk volume restore vm1              # in place
      cowdisk volume restore vm1 --as vm1b    # a copy; vm1's link now points at vm1b
      cowdisk volume restore vm1 --adopt      # rbd: checkpointed by a store on another host
      cowdisk volume restore vm1 --adopt --steal   # rbd: that host died holding it
    """
    validate_id(vid)
    if new_id is not None:
        validate_id(new_id, "new volume id")
    store = app.store()
    with app.progress(f"restore {vid}" + (f" as {new_id}" if new_id else "")) as progress:
        v = store.restore(vid, new_id, retarget_source_link=not no_retarget, adopt=adopt, steal=steal,
                          progress=progress)
    _show_volume(app, store, v, f"volume {v.id} restored")


@volume.command("adopt")
@click.argument("vid", metavar="ID")
@click.option("--steal", is_flag=True,
              help="Fence the store that still holds ID (its host died) instead of refusing.")
@pass_app
def volume_adopt(app: App, vid: str, steal: bool) -> None:
    """rbd: register here a checkpointed volume another store (another host) made in the
    shared pool, without copying it; this store becomes its owner (the other store can
    then only forget it) and its template is known by digest if this store has no file
    of it. The volume is checkpointed here: `volume restore` attaches it. Refused (exit
    6, naming the store and host) while another store holds it attached, unless --steal.

    \b
    Example:
      cowdisk volume shared                   # what the pool holds, and who owns and holds it
      cowdisk volume adopt vm1 && cowdisk volume restore vm1
    """
    validate_id(vid)
    store = app.store()
    v = store.adopt_volume(vid, steal=steal)
    _show_volume(app, store, v, f"volume {v.id} adopted")


SHARED_COLUMNS = [Column("id"), Column("owner", human=lambda o: o or "(its maker)"),
                  Column("holder", human=lambda h: h or "-"), Column("template_id", "template"),
                  Column("size", human=human_bytes),
                  Column("clients", human=lambda c: ", ".join(c) or "-")]


@volume.command("shared")
@click.option("--no-headings", is_flag=True, help="No heading line.")
@pass_app
def volume_shared(app: App, no_headings: bool) -> None:
    """rbd: every volume in the store's shared pool and namespace, whichever store made it:
    its owner (once a store adopted it; before that the store that made it) and holder
    (``<store tag>@<host>``), and the clients that have it open.

    \b
    Example:
      cowdisk volume shared
      cowdisk volume shared --json | jq -r '.volumes[] | select(.holder=="") | .id'
    """
    rows = [sv.as_dict() for sv in app.store().shared_volumes()]
    if app.json:
        app.emit({"volumes": rows})
    else:
        app.listing(rows, SHARED_COLUMNS, headings=not no_headings)


@volume.command("fork")
@click.argument("vid", metavar="ID", shell_complete=complete_volumes)
@click.argument("new_ids", metavar="[NEW_ID...]", nargs=-1)
@click.option("--count", "-n", type=click.IntRange(1), help="Make N children, named PREFIX1..PREFIXN.")
@click.option("--prefix", "-p", help="The children's names before their number (default: ID-).")
@click.option("--links", is_flag=True, help="Print only each child's stable link, one a line (for the VMMs).")
@click.option("--reset-identity", is_flag=True,
              help="Give each child its own /etc/machine-id, no SSH host keys and its id as hostname (ext2/3/4, "
                   "offline; for children that boot, not ones resumed from memory).")
@click.option("--hostname-prefix", help="With --reset-identity: the hostname is this prefix and the child's id.")
@pass_app
def volume_fork(app: App, vid: str, new_ids: tuple[str, ...], count: int | None, prefix: str | None,
                links: bool, reset_identity: bool, hostname_prefix: str | None) -> None:
    """Make new volumes that all start from ID's contents at one instant.

    ID is held once for all of them (pause its VM first: docs/vmm.md).

    \b
    Examples:
      cowdisk volume fork vm1 vm1-a vm1-b
      cowdisk volume fork vm1 --count 3 --prefix job7- --links
      cowdisk volume fork vm1 -n 10 --reset-identity --hostname-prefix sbx-
    """
    validate_id(vid)
    store = app.store()
    with app.progress(f"fork {vid}") as progress:
        vols = store.fork(vid, list(new_ids), count=count, prefix=prefix, reset_identity=reset_identity,
                          hostname_prefix=hostname_prefix, progress=progress)
    if app.json:
        app.emit({"volumes": [v.as_dict() for v in vols]})
        return
    for v in vols:
        app.line(v.link if links else v.id if app.quiet else f"volume {v.id}: {v.state}, link {v.link}")


@volume.command("flatten")
@click.argument("vid", metavar="ID", shell_complete=complete_volumes)
@click.option("--name", "-n", help="A name for the new template.")
@pass_app
def volume_flatten(app: App, vid: str, name: str | None) -> None:
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
@click.argument("vid", metavar="ID", shell_complete=complete_volumes)
@click.argument("jail_dir", type=click.Path(file_okay=False))
@click.option("--name", default="rootfs", show_default=True, help="File name inside the jail.")
@click.option("--uid", type=int, help="Owner of the node (the jailed VMM's uid).")
@click.option("--gid", type=int, help="Group of the node.")
@pass_app
def volume_jail(app: App, vid: str, jail_dir: str, name: str, uid: int | None, gid: int | None) -> None:
    """Stage an attached volume inside a jail directory (a device node, or a hard link for files).

    \b
    Example:
      cowdisk volume jail vm1 /srv/jailer/firecracker/vm1/root --uid 1000 --gid 1000
      cowdisk volume drive vm1 --format firecracker --jail-path rootfs
    """
    validate_id(vid)
    if not name or "/" in name or name in (".", ".."):
        raise InvalidArgument(f"invalid jail file name {name!r}", op="jail", obj=name,
                              hint="a plain file name, no '/'")
    path = app.store().jail(vid, jail_dir, name, uid=uid, gid=gid)
    if app.json:
        app.emit({"volume": vid, "path": path})
    else:
        app.line(path)


def _formats() -> tuple[str, ...]:
    from ..drive import FORMATS

    return tuple(FORMATS)


def _machines() -> tuple[str, ...]:
    from ..drive import MACHINES

    return tuple(MACHINES)


def _limit(text: str | None, what: str) -> int | None:
    if text is None:
        return None
    from .app import parse_size

    try:
        return parse_size(text) if what == "bandwidth" else int(text)
    except ValueError:
        raise InvalidArgument(f"invalid {what} {text!r}", op="volume drive", obj=text) from None


@volume.command("drive")
@click.argument("vid", metavar="ID", shell_complete=complete_volumes)
@click.option("--format", "-f", "fmt", required=True, type=LazyChoice(_formats),
              help="The VMM and form: firecracker (drive object), cloud-hypervisor (--disk argv), "
                   "cloud-hypervisor-api (DiskConfig JSON), qemu (-drive), qemu-blockdev (-blockdev + -device).")
@click.option("--machine", "-M", type=LazyChoice(_machines),
              help="QEMU machine: q35 or pc (virtio-blk-pci) or microvm (virtio-blk-device). [default: q35]")
@click.option("--read-only", "--readonly", "read_only", is_flag=True, help="Configure the drive read-only.")
@click.option("--id", "drive_id", help="Drive id (Firecracker drive_id, QEMU id/node-name, Cloud Hypervisor id). "
                                       "[default: rootfs; none for Cloud Hypervisor]")
@click.option("--cache", help="Cache mode: QEMU none|writeback|writethrough|directsync|unsafe; Firecracker "
                              "unsafe|writeback; Cloud Hypervisor none (direct=on)|writeback.")
@click.option("--io-engine", help="QEMU aio threads|native|io_uring; Firecracker sync|async.")
@click.option("--iops", metavar="N", help="Rate limit: operations per second.")
@click.option("--bandwidth", metavar="BYTES", help="Rate limit: bytes per second (e.g. 50M).")
@click.option("--jail-path", metavar="PATH",
              help="Firecracker under its jailer: the drive's path inside the chroot (what `volume jail` made).")
@pass_app
def volume_drive(app: App, vid: str, fmt: str, machine: str | None, read_only: bool, drive_id: str | None,
                 cache: str | None, io_engine: str | None, iops: str | None, bandwidth: str | None,
                 jail_path: str | None) -> None:
    """Print a VMM's drive configuration for the volume's stable link.

    The path is the stable link (not the device), so the same configuration works
    after a checkpoint and a restore, even under a new id. Options a VMM cannot express,
    or combinations it refuses, are refused here (exit 2).

    \b
    Example:
      cowdisk volume drive vm1 --format firecracker --cache writeback --io-engine async
      qemu-system-x86_64 -M microvm ... $(cowdisk volume drive vm1 -f qemu-blockdev -M microvm)
      cloud-hypervisor ... $(cowdisk volume drive vm1 --format cloud-hypervisor)
      ch-remote add-disk ... or PUT vm.add-disk with $(cowdisk volume drive vm1 -f cloud-hypervisor-api)
    """
    from .. import drive as drive_mod

    validate_id(vid)
    store = app.store()
    v = store.volume(vid)
    opts = drive_mod.DriveOptions(read_only=read_only, drive_id=drive_id, cache=cache, io_engine=io_engine,
                                  iops=_limit(iops, "iops"), bandwidth=_limit(bandwidth, "bandwidth"),
                                  machine=machine, jail_path=jail_path)
    try:
        config, text = drive_mod.for_link(fmt, v.link, opts, backend_block_device=store.backend.block_device)
    except ValueError as e:
        raise InvalidArgument(f"volume drive {vid}: {e}", op="volume drive", obj=vid) from None
    if app.json:
        app.emit({"volume": vid, "format": fmt, "path": v.link, "state": v.state, "config": config})
        return
    if v.state != "attached":
        app.info(f"note: volume {vid} is {v.state}; restore it before starting the VM")
    app.line(text)


@volume.command("chown")
@click.argument("vid", metavar="ID", shell_complete=complete_volumes)
@click.argument("owner", metavar="OWNER")
@pass_app
def volume_chown(app: App, vid: str, owner: str) -> None:
    """Hand a volume to another owner (a uid or user name): root only. From then on only that
    owner (and root) lists, inspects, uses and removes it; its data, device and links stay.

    \b
    Example:
      cowdisk volume chown vm1 1000
    """
    validate_id(vid)
    uid = parse_owner(owner)
    store = app.store()
    v = store.chown_volume(vid, uid)
    _show_volume(app, store, v, f"volume {v.id}")


@volume.command("usage")
@click.argument("vids", metavar="[ID...]", nargs=-1, shell_complete=complete_volumes)
@click.option("--no-headings", is_flag=True, help="No heading line.")
@click.option("-o", "--output", "columns", metavar="COLUMNS",
              help="Comma-separated columns, keys or headings in any case; +COL adds to the defaults: "
                   f"{', '.join(c.key for c in USAGE_COLUMNS if c.default)}; also "
                   f"{', '.join(c.key for c in USAGE_COLUMNS if not c.default)}.")
@pass_app
def volume_usage(app: App, vids: tuple[str, ...], no_headings: bool, columns: str | None) -> None:
    """What each volume costs on disk (real allocation, not apparent size).

    own = bytes only this volume holds (exclusive extents where blocks are shared,
    else its allocated bytes); allocated = st_blocks of its data file.

    \b
    Example:
      cowdisk volume usage
      cowdisk volume usage vm1 --json | jq '.volumes[0].own_bytes'
    """
    only = select_columns(columns, USAGE_COLUMNS)
    if not app.has_store():
        if vids:
            app.store()  # raises NotFound with the hint
        if app.json:
            app.emit({"volumes": [], "errors": []})
        return
    store = app.store()
    ids = list(vids) or [v.id for v in store.volumes()]

    def one(vid: str) -> dict[str, Any]:
        validate_id(vid)
        v = store.volume(vid)
        r = {"id": vid, "state": v.state, "template_id": v.template_id, **store.usage(vid).as_dict()}
        r["cow"] = None if r["cow_used_bytes"] is None else \
            f"{human_bytes(r['cow_used_bytes'])} / {human_bytes(r['cow_total_bytes'])}"
        return r

    rows, errors = app.each(ids, "volume usage", one)
    if not app.json:
        app.listing(rows, USAGE_COLUMNS, headings=not no_headings, only=only)
    app.finish_each({"volumes": rows}, errors)


@volume.command("rm")
@click.argument("vids", metavar="ID...", nargs=-1, required=True, shell_complete=complete_volumes)
@click.option("-f", "--force", is_flag=True,
              help="A volume that does not exist is not an error (idempotent). A device a process still "
                   "holds is never torn down: that stays exit 6.")
@pass_app
def volume_rm(app: App, vids: tuple[str, ...], force: bool) -> None:
    """Detach and delete volumes and their data, each on its own: one that fails (exit 6
    while a VM holds the device) does not stop the others; the exit code is the first
    failure's. Waits --timeout seconds (default 5) for a busy device.

    \b
    Example:
      cowdisk volume rm vm1 vm2
      cowdisk volume rm --force --timeout 30 vm1
    """
    store = app.store() if app.has_store() or not force else None
    removed: list[str] = []
    absent: list[str] = []

    def rm(vid: str) -> None:
        validate_id(vid)
        if store is None:
            absent.append(vid)
            return
        try:
            store.remove_volume(vid, **app.deadline())
        except NotFound:
            if not force:
                raise
            absent.append(vid)
            return
        removed.append(vid)
        if not app.json:
            app.info(f"removed volume {vid}")

    _, errors = app.each(vids, "remove volume", rm)
    app.finish_each({"removed": removed, "absent": absent}, errors)
