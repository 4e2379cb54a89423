"""``cowdisk template ...``: import, build (from a tree, a rootfs tarball or a container
image), list, inspect, verify and remove templates."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, cast

import click

from ..errors import InvalidArgument, NotFound
from ..model import validate_id
from .app import CowdiskSubGroup, complete_templates, list_options, parse_size, pass_app
from .base import App, human_bytes
from .lists import TEMPLATE_COLUMNS, list_templates
from .refs import parse_owner, show_template, template_ref

if TYPE_CHECKING:
    from ..contract import StoreAPI
    from ..progress import Progress
    from ..store import Store, Template


@click.group(cls=CowdiskSubGroup)
def template() -> None:
    """Templates: immutable base disk images, known by digest and names.

    \b
    Example:
      cowdisk template build --from-image ./alpine.oci.tar --name base
      cowdisk template ls
    """


@template.command("import")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--name", "-n", help="A name to refer to the template by.")
@click.option("--adopt", is_flag=True, help="Use the image in place (no copy); it must never change.")
@click.option("--shared", is_flag=True, help="Every caller may use it, not only its owner (you).")
@pass_app
def template_import(app: App, image: str, name: str | None, adopt: bool, shared: bool) -> None:
    """Import a raw disk image as a template (copied sparsely, digested, made read-only).

    \b
    Example:
      cowdisk template import ./rootfs.ext4 --name base
    """
    _new_template(app, name, f"import {os.path.basename(image)}",
                  lambda store, progress: store.import_template(image, name, adopt=adopt, progress=progress,
                                                                      shared=shared),
                  as_sudo_user=True)


def _new_template(app: App, name: str | None, what: str, make: Callable[[Any, Progress], Template], *,
                  as_sudo_user: bool = False) -> None:
    """Check the name, open (or create) the store, make the template with a progress bar, show
    it. ``as_sudo_user``: run through sudo, the source is read with the rights of the user who ran
    it (store/sources.py), in a store opened here (a daemon would see root)."""
    if name is not None:
        validate_id(name, "template name")
    caller = None
    if as_sudo_user and os.geteuid() == 0 and os.environ.get("SUDO_UID"):
        from ..store import sudo_caller

        caller = sudo_caller()
    store: StoreAPI = app.direct_store() if caller is not None and app.has_store() else app.store(create=True)
    with app.progress(what) as progress:
        if caller is not None:
            with cast("Store", store).reading_as(caller):
                t = make(store, progress)
        else:
            t = make(store, progress)
    show_template(app, store, t, f"template {t.id}")


@template.command("build")
@click.argument("source", required=False, type=click.Path())
@click.option("--from-image", "image", metavar="REF",
              help="A container image: an OCI layout directory, an OCI archive or a `docker save` archive "
                   "(PATH[:TAG], or oci:, oci-archive:, docker-archive: in front).")
@click.option("--name", "-n", help="A name to refer to the template by.")
@click.option("--size", "size", help="Image size (e.g. 256M, 2G); default: chosen from the content with "
                                     "headroom (a tree or tarball: twice its size plus 32 MiB; an image: 1.5 times "
                                     "its unpacked size plus 64 MiB), at least 64 MiB.")
@click.option("--shared", is_flag=True, help="Every caller may use it, not only its owner (you).")
@pass_app
def template_build(app: App, source: str | None, image: str | None, name: str | None, size: str | None,
                   shared: bool) -> None:
    """Build an ext4 template from a directory tree, a rootfs tarball (plain, gzip, zstd, xz)
    or a container image (--from-image), with mkfs.ext4 -d: no mount, reproducible, built
    once per content (a container image: once per manifest digest).

    \b
    Example:
      cowdisk template build ./rootfs --name base --size 512M
      cowdisk template build ./rootfs.tar.zst --name base
      cowdisk template build --from-image ./layout:v1 --name base
      cowdisk template build --from-image docker-archive:./img.tar --name base
    """
    if (source is None) == (image is None):
        raise InvalidArgument("template build: give a SOURCE (directory or tarball) or --from-image REF, "
                              "one of them", op="template build", obj=source or image or "",
                              hint="`cowdisk template build --help` shows both forms")
    if name is not None:
        validate_id(name, "template name")
    nbytes = parse_size(size) if size is not None else None
    if source is not None and not os.path.exists(source):
        raise NotFound(f"build template: {source} does not exist", op="build template", obj=source)
    if image is not None:
        _new_template(app, name, "build", lambda store, progress: store.build_template_from_image(
            image, name, size=nbytes, progress=progress, shared=shared), as_sudo_user=True)
    else:
        assert source is not None
        _new_template(app, name, "build", lambda store, progress: store.build_template(
            source, name, size=nbytes, progress=progress, shared=shared), as_sudo_user=True)


@template.command("push")
@click.argument("ref", shell_complete=complete_templates)
@click.option("--to", "to", metavar="URL", help="s3://BUCKET[/PREFIX] (default: the remote config's location).")
@pass_app
def template_push(app: App, ref: str, to: str | None) -> None:
    """Push a template to the object store as content-addressed chunks: only the chunks the
    bucket lacks are uploaded, then the manifest (docs/remote.md). Prints its URL.

    \b
    Example:
      cowdisk template push base --to s3://cowdisk-templates/prod
    """
    store = app.store()
    with app.progress(f"push {ref}") as progress:
        r = store.push_template(template_ref(ref), to, progress=progress)
    app.show(r, f"template {r['id']} pushed", lambda r: {
        "url": r["url"], "manifest": f"sha256:{r['manifest']}", "digest": f"sha256:{r['digest']}",
        "chunks": f"{r['chunks']} of {human_bytes(r['chunk_size'])} ({r['zero_chunks']} zero, not stored)",
        "uploaded": f"{r['uploaded_chunks']} chunks, {human_bytes(r['uploaded_bytes'])}",
        "already there": f"{r['present_chunks']} chunks"}, key="url")


@template.command("pull")
@click.argument("source", metavar="URL|DIGEST")
@click.option("--name", "-n", help="A name to refer to the template by.")
@click.option("--from", "at", metavar="URL", help="Where to look a DIGEST up: s3://BUCKET[/PREFIX] "
                                                  "(default: the remote config's location).")
@click.option("--lazy", is_flag=True, help="Fetch nothing now: serve it from its manifest (nbdkit on a unix "
                                           "socket; chunks fetched, checked and cached when first read). Prints "
                                           "its NBD URL.")
@click.option("--prefetch", is_flag=True, help="With --lazy: fill the cache now, the chunks of the recorded read "
                                               "order first (`template record-order`).")
@pass_app
def template_pull(app: App, source: str, name: str | None, at: str | None, lazy: bool, prefetch: bool) -> None:
    """Pull a template from the object store into this store: every chunk's SHA-256 and the
    whole image's digest are checked before it is registered. SOURCE is the URL `template
    push` printed, or a manifest or template digest (a unique prefix will do).

    \b
    Example:
      cowdisk template pull s3://cowdisk-templates/prod/manifests/9f86d081... --name base
      cowdisk template pull 9f86d081 --name base
      cowdisk template pull --lazy 9f86d081
    """
    if prefetch and not lazy:
        raise InvalidArgument("template pull: --prefetch needs --lazy (a plain pull fetches everything)",
                              op="pull template", obj=source)
    if lazy:
        store = app.store(create=True)  # made here when there is none, as pull makes it
        with app.progress(f"pull --lazy {source}") as progress:
            d = store.lazy_template(source, name, at=at, prefetch=prefetch, progress=progress)
        app.show(d, f"lazy template {d['manifest'][:16]}", lambda d: {
            "id": d["id"], "url": d["url"], "template": f"sha256:{d['template']}", "size": human_bytes(d["size"]),
            "cached": f"{human_bytes(d['cached_bytes'])} ({d['cached_chunks']} of {d['data_chunks']} chunks)",
            "cache": d["cache"], "server": f"nbdkit PID {d['pid']}"}, key="url")
        return
    _new_template(app, name, f"pull {source}",
                  lambda store, progress: store.pull_template(source, name, at=at, progress=progress))


@template.command("record-order")
@click.argument("manifest", metavar="MANIFEST")
@pass_app
def template_record_order(app: App, manifest: str) -> None:
    """Upload the order this host fetched a lazy template's chunks in (its first boot's reads)
    as the manifest's read-order sidecar: `template pull --lazy --prefetch` on other hosts
    fetches those chunks first. MANIFEST: the manifest's digest (`template ls --lazy`).

    \b
    Example:
      cowdisk template record-order 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
    """
    d = app.store().record_read_order(manifest.removeprefix("sha256:"))
    if app.json:
        app.emit(d)
    else:
        app.line(f"read order of {d['chunks']} chunks recorded: {d['url']}")


@template.command("ls")
@list_options(TEMPLATE_COLUMNS, "templates", "names: one of them")
@click.option("--remote", is_flag=True, help="List the templates in the object store instead (their manifests; "
                                             "columns: manifest, template, size, chunk_size, chunks, zero_chunks, "
                                             "local, distinct_chunks, url).")
@click.option("--from", "at", metavar="URL", help="With --remote: s3://BUCKET[/PREFIX] (default: the remote "
                                                  "config's location).")
@click.option("--lazy", is_flag=True, help="List the lazy templates on this host instead: cached bytes, whole or "
                                           "not, the loops reading it, served or not (columns: manifest, template, "
                                           "size, cached_bytes, cached_chunks, data_chunks, whole, loops, url, pid).")
@pass_app
def template_ls(app: App, ids_only: bool, no_headings: bool, columns: str | None, filters: tuple[str, ...],
                remote: bool, at: str | None, lazy: bool) -> None:
    """List templates (with --remote: those in the object store).

    Off a terminal the table is tab-separated raw values (sizes in bytes), one line each.

    \b
    Example:
      cowdisk template ls
      cowdisk template ls -q
      cowdisk template ls --no-headings -o id,size
      cowdisk template ls -o +digest --filter state=ready
      cowdisk template ls --json | jq -r '.templates[].id'
      cowdisk template ls --remote
    """
    list_templates(app, ids_only, no_headings, columns, filters, remote, at, lazy)


@template.command("inspect")
@click.argument("refs", metavar="REF...", nargs=-1, required=True, shell_complete=complete_templates)
@pass_app
def template_inspect(app: App, refs: tuple[str, ...]) -> None:
    """Show templates by id, name or digest (sha256:HEX as inspect prints it, or its first 6
    or more hex digits). One REF prints its template (--json: the document); several, each
    on its own (--json: {"templates": [...], "errors": [...]}; the exit code is the first
    failure's).

    \b
    Example:
      cowdisk template inspect base
      cowdisk template inspect sha256:d9b04df1b4d5
    """
    if len(refs) == 1:
        store = app.store()
        t = store.template(template_ref(refs[0]))
        show_template(app, store, t, f"template {t.id}")
        return
    store = app.store()

    def one(ref: str) -> dict[str, Any]:
        t = store.template(template_ref(ref))
        if not app.json:
            show_template(app, store, t, f"template {t.id}")
        return store.template_doc(t)

    docs, errors = app.each(refs, "inspect template", one)
    app.finish_each({"templates": docs}, errors)


@template.command("verify")
@click.argument("ref", shell_complete=complete_templates)
@pass_app
def template_verify(app: App, ref: str) -> None:
    """Re-read a template and check its size, mtime and full content digest (exit 8 if changed).

    \b
    Example:
      cowdisk template verify base && echo intact
    """
    ref = template_ref(ref)
    store = app.store()
    t0 = store.template(ref)
    with app.progress(f"verify {t0.id}") as progress:
        t = store.verify_template(ref, progress=progress)
    if app.json:
        app.emit({"ok": True, "template": store.template_doc(t)})
    else:
        app.line(f"template {t.id}: intact (sha256:{t.digest})")


@template.command("rm")
@click.argument("refs", metavar="REF...", nargs=-1, required=True, shell_complete=complete_templates)
@click.option("-f", "--force", is_flag=True, help="A template that does not exist is not an error.")
@pass_app
def template_rm(app: App, refs: tuple[str, ...], force: bool) -> None:
    """Remove templates, each on its own (one refused while volumes use it, exit 6, does not
    stop the others; the exit code is the first failure's).

    \b
    Example:
      cowdisk template rm base old
      cowdisk template rm --force maybe-gone
    """
    store = app.store() if app.has_store() or not force else None
    removed: list[str] = []
    absent: list[str] = []
    seen: set[str] = set()

    def rm(ref: str) -> None:
        found = template_ref(ref)
        if store is None:
            absent.append(ref)
            return
        try:
            tid = store.template(found).id
        except NotFound:
            if not force:
                raise
            absent.append(ref)
            return
        if tid in seen:  # a name and an id of one template
            return
        store.remove_template(tid)
        seen.add(tid)
        removed.append(tid)
        if not app.json:
            app.info(f"removed template {tid}")

    _, errors = app.each(refs, "remove template", rm)
    app.finish_each({"removed": removed, "absent": absent}, errors)


@template.command("chown")
@click.argument("ref", metavar="TEMPLATE", shell_complete=complete_templates)
@click.argument("owner", metavar="OWNER", required=False)
@click.option("--shared/--not-shared", default=None,
              help="Let every caller use it (or only its owner again).")
@pass_app
def template_chown(app: App, ref: str, owner: str | None, shared: bool | None) -> None:
    """Hand a template to another owner (a uid or user name) and/or share it with every
    caller: root only.

    \b
    Example:
      cowdisk template chown base --shared
      cowdisk template chown base 1000
    """
    validate_id(ref, "template name or id")
    if owner is None and shared is None:
        raise InvalidArgument("template chown: give an OWNER, --shared or --not-shared", op="template chown",
                              obj=ref)
    store = app.store()
    t = store.chown_template(ref, parse_owner(owner) if owner is not None else None, shared=shared)
    show_template(app, store, t, f"template {t.id}")
