"""The ``cowdisk`` command line: parse, call the :class:`~cowdisk.store.Store`, render.

Data goes to stdout (rich tables for people, one JSON document with ``--json``);
messages, progress and errors go to stderr. Progress bars run only when stderr is a
terminal; otherwise the same progress is printed as plain lines. Every failure ends
in one place (:meth:`CowdiskGroup.invoke`), which prints what failed, on what, and
what to do, and exits with the error's ``exit_code`` (docs/cli.md lists them).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Iterator

import click
from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)
from rich.table import Table

from . import drive as drive_mod
from .errors import CowdiskError, InvalidArgument, NotFound, message_of
from .store import DEFAULT_ROOT, Store, validate_id

BACKEND_CHOICES = ("auto", "dm-snapshot", "reflink", "pool", "copy")

EXIT_CODES = {
    0: "success",
    1: "other error",
    2: "invalid argument or usage error",
    3: "not found",
    4: "kernel error",
    5: "already exists",
    6: "in use",
    7: "state error (wrong state for the operation)",
    8: "template changed on disk",
    9: "unsupported on this host",
    10: "lock timeout",
    11: "snapshot invalid",
}


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{int(v)} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{n} B"  # pragma: no cover


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


def _table(*columns: str, **kw: Any) -> Table:
    """A table whose cells fold rather than being cut with an ellipsis (ids and paths must stay whole)."""
    t = Table(**kw)
    for c in columns:
        t.add_column(c, overflow="fold")
    return t


def _when(ts: float | None) -> str:
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
    def progress(self, what: str) -> Iterator[Callable[[int, int], None]]:
        """A ``progress(done, total)`` callback: a rich bar on a terminal, else a few plain lines."""
        start = time.monotonic()
        if self.interactive and not self.quiet:
            cols = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn())
            with Progress(*cols, console=self.err, transient=True) as bar:
                task = bar.add_task(what, total=None)
                seen = {"done": 0}

                def cb(done: int, total: int) -> None:
                    seen["done"] = done
                    bar.update(task, completed=done, total=total)

                yield cb
            self.info(f"{what}: {human_bytes(seen['done'])} in {(time.monotonic() - start) * 1000:.0f} ms")
            return
        state = {"next": 0, "done": 0}

        def plain(done: int, total: int) -> None:
            state["done"] = done
            if total <= 0:
                return
            pct = done * 100 // total
            if pct >= state["next"] and pct < 100:
                self.info(f"{what}: {pct}% of {human_bytes(total)}")
                state["next"] = (pct // 25 + 1) * 25

        yield plain
        amount = f"{human_bytes(state['done'])} " if state["done"] else ""
        self.info(f"{what}: done, {amount}in {(time.monotonic() - start) * 1000:.0f} ms")

    def steps(self, what: str) -> Callable[[str], None]:
        return lambda msg: self.info(f"{what}: {msg}")


class CowdiskGroup(click.Group):
    """The root group: turns every cowdisk error into a message on stderr and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CowdiskError as e:
            _report_error(ctx, e, e.exit_code)
        except OSError as e:  # not wrapped by cowdisk: permissions on --root, a full disk...
            _report_error(ctx, e, 1, hint="check --root and that you run as root")


def _report_error(ctx: click.Context, e: BaseException, code: int, hint: str = "") -> None:
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

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=CowdiskGroup, context_settings=CONTEXT)
@click.option("--root", envvar="COWDISK_ROOT", default=DEFAULT_ROOT, show_default=True,
              type=click.Path(file_okay=False), help="Store root directory. [env: COWDISK_ROOT]")
@click.option("--backend", envvar="COWDISK_BACKEND", default="auto", show_default=True,
              type=click.Choice(BACKEND_CHOICES),
              help="Volume backend; only matters when the store is created (it is then fixed). "
                   "[env: COWDISK_BACKEND]")
@click.option("-v", "--verbose", count=True, help="More detail: debug logs, tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="No messages or progress on stderr (errors still).")
@click.version_option(package_name="cowdisk")
@click.pass_context
def cli(ctx: click.Context, root: str, backend: str, verbose: int, quiet: bool) -> None:
    """Copy-on-write root disks for microVM sandboxes over shared read-only templates.

    \b
    Example: a sandbox disk from a directory tree
      cowdisk template build ./rootfs --name base
      cowdisk volume create vm1 --template base
      cowdisk volume drive vm1 --format firecracker
      cowdisk volume rm vm1

    Exit codes: 0 ok, 1 other, 2 invalid argument, 3 not found, 4 kernel error,
    5 already exists, 6 in use, 7 wrong state, 8 template changed, 9 unsupported,
    10 lock timeout, 11 snapshot invalid (see docs/cli.md).
    """
    if verbose:
        logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.INFO, stream=sys.stderr,
                            format="%(levelname)s %(name)s: %(message)s")
    app = App(root, backend, verbose, quiet)
    ctx.obj = app
    ctx.call_on_close(app.close)


# -- templates -----------------------------------------------------------------------------


def _template_dict(store: Store, t: Any) -> dict[str, Any]:
    d = t.as_dict()
    try:
        d["disk_bytes"] = store.template_usage(t.id)
    except (CowdiskError, OSError):
        d["disk_bytes"] = None
    return d


def _show_template(app: App, store: Store, t: Any, title: str) -> None:
    d = _template_dict(store, t)
    if app.json:
        app.emit(d)
        return
    app.kv(title, {"id": d["id"], "names": d["names"], "size": f"{human_bytes(d['size'])} ({d['size']} bytes)",
                   "on disk": human_bytes(d["disk_bytes"]), "digest": f"sha256:{d['digest']}",
                   "state": d["state"], "source": d["source"], "path": d["path"],
                   "volumes": d["users"], "created": _when(d["created"])})


@cli.group(cls=click.Group)
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
    with app.progress(f"import {os.path.basename(image)}") as cb:
        t = store.import_template(image, name, adopt=adopt, progress=cb)
    _show_template(app, store, t, f"template {t.id}")


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
    t = store.build_template(directory, name, size=nbytes, progress=app.steps("build"))
    _show_template(app, store, t, f"template {t.id}")


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
        rows = [_template_dict(store, t) for t in store.templates()]
    if app.json:
        app.emit({"templates": rows})
        return
    t = _table("id", "names", "size", "on disk", "volumes", "state", "created")
    for d in rows:
        t.add_row(d["id"], ", ".join(d["names"]) or "-", human_bytes(d["size"]), human_bytes(d["disk_bytes"]),
                  str(len(d["users"])), d["state"], _when(d["created"]))
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
    _show_template(app, store, t, f"template {t.id}")


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
    with app.progress(f"verify {t0.id}") as cb:
        t = store.verify_template(ref, progress=cb)
    if app.json:
        app.emit({"ok": True, "template": _template_dict(store, t)})
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


# -- volumes ---------------------------------------------------------------------------------


def _show_volume(app: App, v: Any, title: str, extra: dict[str, Any] | None = None) -> None:
    d = v.as_dict()
    if extra:
        d.update(extra)
    if app.json:
        app.emit(d)
        return
    rows = {"id": d["id"], "state": d["state"], "backend": d["backend"], "template": d["template_id"],
            "size": human_bytes(d["size"]), "link": d["link"], "device": d["device"], "data": d["data_path"],
            "parent": d["parent"], "created": _when(d["created"])}
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


@cli.group(cls=click.Group)
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
    with app.progress(f"create {vid}") as cb:
        v = store.create_volume(vid, tref, progress=cb)
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
    t = _table("id", "state", "backend", "template", "size", "link", "device")
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
    with app.progress(f"restore {vid}" + (f" as {new_id}" if new_id else "")) as cb:
        v = store.restore(vid, new_id, retarget_source_link=not no_retarget, progress=cb)
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
    with app.progress(f"fork {vid}") as cb:
        vols = store.fork(vid, list(new_ids), progress=cb)
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
    with app.progress(f"flatten {vid}") as cb:
        t = store.flatten(vid, name, progress=cb)
    _show_template(app, store, t, f"template {t.id} (from volume {vid})")


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
    t = _table("id", "state", "template", "own", "allocated", "apparent", "cow used", "health")
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


# -- maintenance -------------------------------------------------------------------------------


def _show_report(app: App, rep: dict[str, Any], what: str) -> None:
    if app.json:
        app.emit(rep)
        return
    t = _table("action", "objects", title=what, title_justify="left")
    for k, v in rep.items():
        if v:
            t.add_row(k.replace("_", " "), "\n".join(map(str, v)))
    if t.row_count:
        app.out.print(t)
    else:
        app.out.print(f"{what}: nothing to do")


@cli.command()
@json_option
@pass_app
def recover(app: App, as_json: bool) -> None:
    """Reconcile registry, kernel and files after a crash or reboot (safe to run any time).

    Finishes or rolls back interrupted operations, re-attaches volumes whose device
    is gone, removes only true orphans of this store; a running volume is never
    torn down. Exit 1 if some repair failed (listed under errors).

    \b
    Example:
      cowdisk recover --json
    """
    if not app.has_store():
        rep: dict[str, Any] = {"rolled_back": [], "finished": [], "reactivated": [], "orphans_removed": [],
                               "kept": [], "errors": []}
    else:
        rep = app.store(recover=False).recover().as_dict()
    _show_report(app, rep, "recover")
    if rep["errors"]:
        raise click.exceptions.Exit(1)


@cli.command()
@json_option
@pass_app
def gc(app: App, as_json: bool) -> None:
    """Recover, then remove templates that no volume uses and that have no name.

    \b
    Example:
      cowdisk gc
    """
    if not app.has_store():
        rep: dict[str, Any] = {"rolled_back": [], "finished": [], "reactivated": [], "orphans_removed": [],
                               "kept": [], "errors": []}
    else:
        rep = app.store(recover=False).gc().as_dict()
    _show_report(app, rep, "gc")
    if rep["errors"]:
        raise click.exceptions.Exit(1)


@cli.command()
@json_option
@pass_app
def doctor(app: App, as_json: bool) -> None:
    """Report which kernel features and tools this host has, and the backend `auto` picks.

    Read-only: it creates no store, loop device or mount.

    \b
    Example:
      cowdisk doctor
      cowdisk --root /srv/cowdisk doctor --json | jq -r .backend
    """
    from . import doctor as doctor_mod

    rep = doctor_mod.check(app.root)
    if app.json:
        app.emit(rep.as_dict())
        return
    t = _table("check", "", "detail", title=f"cowdisk doctor: {rep.root}", title_justify="left")
    for c in rep.checks:
        mark = {True: "[green]ok[/]", False: "[red]no[/]", None: "[cyan]->[/]"}[c.ok]
        detail = c.detail + (f"\n[dim]{c.hint}[/]" if c.hint else "")
        t.add_row(c.name, mark, detail.replace("[", "\\[").replace("\\[dim]", "[dim]").replace("\\[/]", "[/]"))
    app.out.print(t)
    if rep.dm_version:
        app.out.print("dm targets: " + ", ".join(f"{k} {v or 'absent'}" for k, v in rep.dm_targets.items()),
                      markup=False)
    app.out.print(f"backend auto -> {rep.backend}", markup=False)
    for w in rep.why:
        app.out.print(f"  - {w}", markup=False)


# -- demo ------------------------------------------------------------------------------------


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _make_tree(d: str) -> None:
    files = {
        "etc/hostname": "sandbox\n",
        "etc/os-release": 'NAME="cowdisk demo"\nID=cowdisk-demo\n',
        "etc/motd": "Every sandbox gets its own copy-on-write disk over one shared template.\n",
        "bin/hello": "#!/bin/sh\necho hello from a cowdisk sandbox\n",
        "srv/app/config.json": json.dumps({"workers": 4, "listen": "0.0.0.0:8080"}) + "\n",
    }
    for rel, text in files.items():
        p = os.path.join(d, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            f.write(text)
    os.chmod(os.path.join(d, "bin/hello"), 0o755)
    os.makedirs(os.path.join(d, "srv/data"), exist_ok=True)
    with open(os.path.join(d, "srv/data/blob.bin"), "wb") as f:
        f.write(os.urandom(4 << 20))
    os.makedirs(os.path.join(d, "tmp"), exist_ok=True)


class _Writer:
    """Write a file into a volume's ext4 filesystem and read it back, on a block device or an
    image file alike: ``debugfs -w`` when present, else raw bytes at an offset past the data."""

    def __init__(self, scratch: str) -> None:
        self.debugfs = shutil.which("debugfs")
        self.scratch = scratch

    @property
    def method(self) -> str:
        return "debugfs write /sandbox-note.bin" if self.debugfs else "pwrite at an offset"

    def write(self, dev: str, data: bytes, size: int) -> None:
        if self.debugfs:
            local = os.path.join(self.scratch, "note.bin")
            with open(local, "wb") as f:
                f.write(data)
            r = subprocess.run([self.debugfs, "-w", "-R", f"write {local} /sandbox-note.bin", dev],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise CowdiskError(f"demo: debugfs write into {dev} failed: {r.stderr.strip()}",
                                   op="demo write", obj=dev)
            return
        fd = os.open(dev, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, data, self._offset(size, len(data)))
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, dev: str, n: int, size: int) -> bytes:
        if self.debugfs:
            r = subprocess.run([self.debugfs, "-R", "cat /sandbox-note.bin", dev], capture_output=True)
            return r.stdout
        fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, n, self._offset(size, n))
        finally:
            os.close(fd)

    @staticmethod
    def _offset(size: int, n: int) -> int:
        return (size - n - (1 << 20)) // 4096 * 4096


@cli.command()
@click.option("--volumes", "-n", "count", default=3, show_default=True, type=click.IntRange(1, 64),
              help="How many sandbox volumes to create.")
@json_option
@click.pass_context
def demo(ctx: click.Context, count: int, as_json: bool) -> None:
    """Show cowdisk doing its job on a throwaway store, then clean up everything.

    Builds a small ext4 template from a generated directory tree, creates sandbox
    volumes over it with the best backend this host has (or --backend), writes a
    file into one, shows the template is untouched and what each volume costs on
    disk, checkpoints it and restores it under a new id, timing each step. The
    store lives in a new temporary directory (under --root / COWDISK_ROOT when
    given, else the system temp dir) and is destroyed at the end, even on failure.

    \b
    Example:
      sudo cowdisk demo
      cowdisk --backend copy demo --json
    """
    app: App = ctx.obj
    src = ctx.find_root().get_parameter_source("root")
    parent = app.root if src in (click.core.ParameterSource.COMMANDLINE,
                                 click.core.ParameterSource.ENVIRONMENT) else None
    result = run_demo(parent, app.backend, count, say=(lambda m: None) if app.json else app.out.print,
                      progress=app.progress)
    if app.json:
        app.emit(result)
    else:
        if result["ok"]:
            click.echo(result["verdict"])
        else:
            click.echo(result["verdict"], err=True)
    if not result["ok"]:
        raise click.exceptions.Exit(result.get("exit_code", 1))


def run_demo(parent: str | None, backend: str = "auto", count: int = 3, *,
             say: Callable[..., None] = print,
             progress: Callable[[str], contextlib.AbstractContextManager[Any]] | None = None) -> dict[str, Any]:
    """The demo as a function: returns what it did and measured; never leaves anything behind."""
    if parent:
        os.makedirs(parent, exist_ok=True)
    base = tempfile.mkdtemp(prefix="cowdisk-demo-", dir=parent)
    root = os.path.join(base, "store")
    steps: list[dict[str, Any]] = []
    res: dict[str, Any] = {"ok": False, "root": root, "backend": None, "steps": steps, "volumes": [],
                           "template": None, "write": None, "cleanup": None}
    store: Store | None = None
    t0 = time.monotonic()
    progress = progress or (lambda what: contextlib.nullcontext(None))

    @contextlib.contextmanager
    def step(name: str) -> Iterator[dict[str, Any]]:
        rec: dict[str, Any] = {"name": name, "ms": None}
        start = time.perf_counter()
        yield rec
        rec["ms"] = round((time.perf_counter() - start) * 1000, 2)
        steps.append(rec)
        say(f"[green]ok[/] {name} [dim]({rec['ms']:.1f} ms)[/]")

    failed: BaseException | None = None
    try:
        tree = os.path.join(base, "tree")
        _make_tree(tree)
        with step("open store"):
            store = Store(root, backend=backend)
        res["backend"] = store.backend_name
        say(f"store {root}, backend [bold]{store.backend_name}[/]")
        with step("build ext4 template from a directory tree"):
            tpl = store.build_template(tree, "demo-base")
        before = _sha256_file(tpl.path)
        res["template"] = {"id": tpl.id, "size": tpl.size, "digest": tpl.digest, "digest_before": before}
        ids = [f"sandbox-{i + 1}" for i in range(count)]
        create_ms = []
        for vid in ids:
            with step(f"create volume {vid}") as rec:
                store.create_volume(vid, tpl.id)
            create_ms.append(rec["ms"])
        writer = _Writer(base)
        note = b"written inside sandbox-1 only\n" + os.urandom((1 << 20) - 30)
        target = store.volume(ids[0])
        with step(f"write a 1 MiB file into {ids[0]} ({writer.method})"):
            writer.write(target.link, note, target.size)
        with step(f"read it back from {ids[0]}"):
            got = writer.read(target.link, len(note), target.size)
        if got != note:
            raise CowdiskError(f"demo: {ids[0]} did not return what was written", op="demo", obj=ids[0])
        others_clean = all(writer.read(store.volume(v).link, len(note), target.size) != note for v in ids[1:])
        if not others_clean:
            raise CowdiskError("demo: another volume sees sandbox-1's write", op="demo", obj=ids[0])
        res["write"] = {"volume": ids[0], "bytes": len(note), "method": writer.method,
                        "read_back": True, "other_volumes_unchanged": True}
        for v in store.volumes():  # before checkpoint/restore: the restored copy would share sandbox-1's blocks
            u = store.usage(v.id)
            res["volumes"].append({"id": v.id, "state": v.state, "own_bytes": u.own_bytes,
                                   "disk_bytes": u.disk_bytes, "apparent_bytes": u.apparent_bytes})
        t = _table("volume", "state", "own", "allocated", "apparent", title="what each volume costs on disk",
                  title_justify="left")
        for r in res["volumes"]:
            t.add_row(r["id"], r["state"], human_bytes(r["own_bytes"]), human_bytes(r["disk_bytes"]),
                      human_bytes(r["apparent_bytes"]))
        t.add_row(f"template {tpl.id}", "read-only", "-", human_bytes(store.template_usage(tpl.id)),
                  human_bytes(tpl.size))
        say(t)
        with step("digest the template again"):
            after = _sha256_file(tpl.path)
            store.verify_template(tpl.id)
        res["template"].update(digest_after=after, unchanged=after == before == tpl.digest,
                               disk_bytes=store.template_usage(tpl.id))
        if after != before:
            raise CowdiskError("demo: the template changed", op="demo", obj=tpl.id)
        say(f"template {tpl.id} untouched: sha256 {before[:16]}... before and after")

        with step(f"checkpoint {ids[0]}"):
            store.checkpoint(ids[0])
        restored = f"{ids[0]}-restored"
        with progress(f"restore {ids[0]} as {restored}") as cb, step(f"restore {ids[0]} as {restored}"):
            store.restore(ids[0], restored, progress=cb)
        link = store.link_path(ids[0])
        if writer.read(link, len(note), target.size) != note:
            raise CowdiskError(f"demo: {restored} lost the write", op="demo", obj=restored)
        say(f"{ids[0]}'s stable link now points at {restored}'s device, and the file is there")
        with step(f"restore {ids[0]} in place"):
            store.restore(ids[0])
        if writer.read(link, len(note), target.size) != note:
            raise CowdiskError(f"demo: {ids[0]} lost the write", op="demo", obj=ids[0])

        with step(f"remove {len(store.volumes())} volumes and the template"):
            for v in store.volumes():
                store.remove_volume(v.id)
            store.remove_template(tpl.id)
        res["create_ms_median"] = statistics.median(create_ms)
    except BaseException as e:  # cleaned up below, then reported
        failed = e
    cleanup_errors: list[str] = []
    with step("clean up (destroy store, remove temp dir)") as rec:
        if store is not None:
            try:
                store.destroy()
            except BaseException as e:
                cleanup_errors.append(f"destroy store: {message_of(e)}")
            store.close()
        else:
            # the store may have mounted its pool before failing: unmount it
            from .backends.pool import Pool

            with contextlib.suppress(CowdiskError, OSError):
                Pool(root, "").unmount()
        from .backends.pool import mounted_at

        if mounted_at(os.path.join(root, "pool", "mnt")):
            cleanup_errors.append(f"{root}/pool/mnt is still mounted")
        else:
            shutil.rmtree(base, ignore_errors=True)
            if os.path.exists(base):
                cleanup_errors.append(f"{base} could not be removed")
    res["cleanup"] = {"ok": not cleanup_errors, "errors": cleanup_errors, "removed": base}
    total = time.monotonic() - t0
    res["total_ms"] = round(total * 1000, 1)
    if failed is None and not cleanup_errors:
        res["ok"] = True
        own = max((v["own_bytes"] for v in res["volumes"][1:]), default=0)
        res["verdict"] = (
            f"cowdisk demo OK: {res['backend']} backend, {count} volumes in {res['create_ms_median']:.1f} ms each "
            f"(median), an untouched volume costs {human_bytes(own)} over a "
            f"{human_bytes(res['template']['size'])} template, template unchanged, checkpoint/restore kept the "
            f"write, everything cleaned up ({total:.1f} s)")
        return res
    if failed is not None:
        if isinstance(failed, KeyboardInterrupt):
            raise failed
        res["error"] = {"type": type(failed).__name__, "message": message_of(failed),
                        "hint": getattr(failed, "hint", "")}
        res["exit_code"] = failed.exit_code if isinstance(failed, CowdiskError) else 1
        if not isinstance(failed, (CowdiskError, OSError)):
            traceback.print_exception(failed, file=sys.stderr)
        hint = getattr(failed, "hint", "")
        res["verdict"] = (f"cowdisk demo FAILED: {message_of(failed)}" + (f" (hint: {hint})" if hint else "")
                          + ("; cleanup: " + "; ".join(cleanup_errors) if cleanup_errors else
                             "; everything it made was cleaned up"))
    else:
        res["exit_code"] = 1
        res["verdict"] = "cowdisk demo: the demo worked but cleanup failed: " + "; ".join(cleanup_errors)
    return res


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cowdisk`` script and ``python -m cowdisk``."""
    args = sys.argv[1:] if argv is None else argv
    try:
        cli.main(args=args, prog_name="cowdisk", standalone_mode=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # a bug: say so; the traceback only with -v
        verbose = any(a == "--verbose" or (a.startswith("-v") and set(a[1:]) == {"v"}) for a in args)
        click.echo(f"cowdisk: internal error: {type(e).__name__}: {e}", err=True)
        if verbose:
            traceback.print_exception(e, file=sys.stderr)
        else:
            click.echo("  hint: run again with -v for the traceback, and report it", err=True)
        return 1
    return 0
