"""The listings a daemon answers alone, ``volume ls`` and ``template ls``: their columns and
what they do, without click. The click commands (:mod:`.volumes`, :mod:`.templates`) call
these; so does :mod:`.light`, which runs them through a daemon without importing click."""

from __future__ import annotations

from ..errors import InvalidArgument
from ..model import Volume
from .base import App, Column, human_bytes, matches, parse_filters, select_columns, when
from .refs import lazy_cell, owners_as_uids, template_ref

VOLUME_COLUMNS = [Column("id"), Column("state"), Column("backend"), Column("template_id", "template"),
                  Column("size", human=human_bytes), Column("links", human=lambda ls: "\n".join(ls) or "-"),
                  Column("device", human=lambda d: d or "-"), Column("link", default=False),
                  Column("data_path", default=False), Column("parent", default=False),
                  Column("created", human=when, default=False), Column("error", default=False),
                  Column("owner", default=False)]


TEMPLATE_COLUMNS = [Column("id"), Column("names"), Column("size", human=human_bytes),
                    Column("disk_bytes", "on disk", human=human_bytes),
                    Column("users", "volumes", human=lambda u: str(len(u))), Column("state"),
                    Column("created", human=when), Column("digest", default=False), Column("path", default=False),
                    Column("source", default=False), Column("owner", default=False), Column("shared", default=False),
                    Column("lazy", human=lazy_cell)]


REMOTE_COLUMNS = [Column("manifest", human=lambda d: str(d)[:16]), Column("template", human=lambda d: str(d)[:16]),
                  Column("size", human=human_bytes), Column("chunk_size", "chunk", human=human_bytes),
                  Column("chunks"), Column("zero_chunks", "zero"), Column("local", human=lambda b: "yes" if b else "no"),
                  Column("distinct_chunks", "distinct", default=False), Column("url", default=False)]


LAZY_COLUMNS = [Column("manifest", human=lambda d: str(d)[:16]), Column("template", human=lambda d: str(d)[:16]),
                Column("size", human=human_bytes), Column("cached_bytes", "cached", human=human_bytes),
                Column("cached_chunks", "chunks"), Column("data_chunks", "of"),
                Column("whole", human=lambda b: "yes" if b else "no"),
                Column("loops", "read by", human=lambda ls: ", ".join(f"/dev/loop{n}" for n in ls) or "-"),
                Column("pid", "server", human=lambda p: f"PID {p}" if p else "-"),
                Column("url", default=False), Column("cache", default=False)]


def list_volumes(app: App, tref: str | None, ids_only: bool, no_headings: bool, columns: str | None,
                 filters: tuple[str, ...]) -> None:
    """``cowdisk volume ls``."""
    only = select_columns(columns, VOLUME_COLUMNS)
    wanted = owners_as_uids(parse_filters(filters, VOLUME_COLUMNS, extra=("template",)))
    templates = wanted.pop("template", set()) | ({tref} if tref is not None else set())
    vols: list[Volume] = []
    if app.has_store():
        store = app.store()
        vols = store.volumes()
        if templates:
            tids = {store.template(template_ref(t)).id for t in templates}
            vols = [v for v in vols if v.template_id in tids]
    rows = [r for r in (v.as_dict() for v in vols) if matches(r, wanted)]
    if app.json:
        app.emit({"volumes": rows})
    elif ids_only:
        for r in rows:
            app.line(r["id"])
    else:
        app.listing(rows, VOLUME_COLUMNS, headings=not no_headings, only=only)


def list_templates(app: App, ids_only: bool, no_headings: bool, columns: str | None, filters: tuple[str, ...],
                   remote: bool, at: str | None, lazy: bool) -> None:
    """``cowdisk template ls``."""
    if at is not None and not remote:
        raise InvalidArgument("template ls: --from needs --remote", op="list templates", obj=at)
    if remote and lazy:
        raise InvalidArgument("template ls: --remote or --lazy, not both", op="list templates", obj="")
    cols = REMOTE_COLUMNS if remote else LAZY_COLUMNS if lazy else TEMPLATE_COLUMNS
    only = select_columns(columns, cols)
    wanted = owners_as_uids(parse_filters(filters, cols))
    rows = []
    if remote:
        if app.has_store():
            rows = app.store().remote_templates(at)
        else:
            from ..store.remote import remote_listing

            rows = [{**r, "local": False} for r in remote_listing(app.root, at)]
    elif lazy:
        rows = app.store().lazy_templates() if app.has_store() else []
    elif app.has_store():
        store = app.store()
        rows = [store.template_doc(t) for t in store.templates()]
    rows = [r for r in rows if matches(r, wanted)]
    if app.json:
        app.emit({"templates": rows})
    elif ids_only:
        for r in rows:
            app.line(r["manifest" if remote or lazy else "id"])
    else:
        app.listing(rows, cols, headings=not no_headings, only=only)


__all__ = ["LAZY_COLUMNS", "REMOTE_COLUMNS", "TEMPLATE_COLUMNS", "VOLUME_COLUMNS", "list_templates", "list_volumes"]
