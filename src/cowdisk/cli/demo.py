"""``cowdisk demo``: the tour of what cowdisk does, on a throwaway store, through the public API only
(:class:`~cowdisk.store.Store` and the store module's functions, errors, digest)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, ContextManager, Iterator

import click

from ..digest import sha256_file
from ..errors import CowdiskError, message_of
from ..progress import Progress
from ..store import Store, release_pool
from .app import CowdiskCommand, table
from .base import App, human_bytes
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


@click.command("demo", cls=CowdiskCommand)
@click.option("--volumes", "-n", "count", default=3, show_default=True, type=click.IntRange(1, 64),
              help="How many sandbox volumes to create.")
@click.pass_context
def demo_command(ctx: click.Context, count: int) -> None:
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
    result = run_demo(parent, app.backend, count, say=(lambda m: None) if app.json else (lambda m: app.out.print(m, markup=True)),
                      progress=app.progress)
    if app.json:
        app.emit(result)
    else:
        click.echo(result["verdict"], err=not result["ok"])
    if not result["ok"]:
        raise click.exceptions.Exit(result.get("exit_code", 1))


def run_demo(parent: str | None, backend: str = "auto", count: int = 3, *,
             say: Callable[..., None] = print,
             progress: Callable[[str], ContextManager[Progress | None]] | None = None) -> dict[str, Any]:
    """The demo as a function: returns what it did and measured; never leaves anything behind.

    ``say`` prints a line (rich markup) or a table; ``progress(what)`` is a context manager giving
    the :class:`~cowdisk.progress.Progress` for one long step (the CLI's bars)."""
    if parent:
        os.makedirs(parent, exist_ok=True)
    base = tempfile.mkdtemp(prefix="cowdisk-demo-", dir=parent)
    root = os.path.join(base, "store")
    steps: list[dict[str, Any]] = []
    res: dict[str, Any] = {"ok": False, "root": root, "backend": None, "steps": steps, "volumes": [],
                           "template": None, "write": None, "cleanup": None}
    store: Store | None = None
    t0 = time.monotonic()
    progress = progress or (lambda _what: contextlib.nullcontext(None))

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
        before = sha256_file(tpl.path)
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
        t = table("volume", "state", "own", "allocated", "apparent", title="what each volume costs on disk",
                  title_justify="left")
        for r in res["volumes"]:
            t.add_row(r["id"], r["state"], human_bytes(r["own_bytes"]), human_bytes(r["disk_bytes"]),
                      human_bytes(r["apparent_bytes"]))
        t.add_row(f"template {tpl.id}", "read-only", "-", human_bytes(store.template_usage(tpl.id)),
                  human_bytes(tpl.size))
        say(t)
        with step("digest the template again"):
            after = sha256_file(tpl.path)
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
    with step("clean up (destroy store, remove temp dir)"):
        if store is not None:
            try:
                store.destroy()
            except BaseException as e:
                cleanup_errors.append(f"destroy store: {message_of(e)}")
            store.close()
        mounted = release_pool(root)  # a store that failed to open may have mounted its pool
        cleanup_errors += mounted
        if not mounted:  # never rmtree into a mounted pool
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
