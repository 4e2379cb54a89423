"""The registry's tables: meta, templates (and their names and shared loops), volumes
(their states: ``set_state`` refuses a change not in ``TRANSITIONS``), kernel objects,
links and intents, each read and written through the engine's transactions."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from typing import Any

from ..errors import AlreadyExists, CowdiskError, NotFound, StateError
from ..kernel.procfs import process_alive, process_start
from ..model import VolumeState
from ..operations import CREATING, REMOVING, TRANSITIONS
from .engine import Engine
from .schema import Intent, TemplateRow, VolumeRow

log = logging.getLogger("cowdisk.registry")


class Registry(Engine):
    """The SQLite registry at ``path``: the engine's transactions (see :class:`Engine`:
    writers serialised, group commit, deferred records) over the store's tables."""

    # -- meta --------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        rows = self._q("SELECT value FROM meta WHERE key=?", (key,))
        return rows[0][0] if rows else None

    def set_meta_default(self, key: str, value: str) -> str:
        """Set ``key`` unless it is set; return the value in force."""
        with self.tx() as c:
            c.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (key, value))
            return str(c.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()[0])

    def set_meta(self, key: str, value: str) -> None:
        with self.tx() as c:
            c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # -- templates ---------------------------------------------------------------

    _T = ("SELECT t.*, (SELECT json_group_array(name) FROM template_names WHERE template_id=t.id) AS names_json"
          " FROM templates t")
    """A template's row with its names, in one statement."""

    def _template(self, r: sqlite3.Row) -> TemplateRow:
        names = tuple(sorted(json.loads(r["names_json"])))
        return TemplateRow(r["id"], r["path"], r["size"], r["digest"], r["mtime_ns"], r["ino"],
                           bool(r["owned"]), r["source"], r["created"], r["state"], names, r["ctime_ns"],
                           r["owner"], bool(r["shared"]))

    def add_template(self, t: TemplateRow, *, visible_to: int | None = None) -> None:
        with self.tx() as c:
            try:
                c.execute(
                    "INSERT INTO templates(id, path, size, digest, mtime_ns, ino, owned, source, created, state,"
                    " ctime_ns, owner, shared) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (t.id, t.path, t.size, t.digest, t.mtime_ns, t.ino, int(t.owned), t.source, t.created,
                     t.state, t.ctime_ns, t.owner, int(t.shared)))
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"template {t.id} already exists", op="add template", obj=t.id) from None
            for n in t.names:
                self.add_template_name(t.id, n, visible_to=visible_to)

    def add_template_name(self, template_id: str, name: str, *, visible_to: int | None = None) -> None:
        """Name a template; a name another template has is refused (naming that template only
        when caller ``visible_to`` may see it)."""
        with self.tx() as c:
            row = c.execute("SELECT n.template_id, t.owner, t.shared FROM template_names n JOIN templates t"
                            " ON t.id=n.template_id WHERE n.name=?", (name,)).fetchone()
            if row and row[0] != template_id:
                seen = visible_to is None or row[1] == visible_to or row[2]
                raise AlreadyExists(f"template name {name!r} is already used"
                                    + (f" by template {row[0]}" if seen else " (template names are one namespace "
                                                                               "for every owner)"),
                                    op="name template", obj=name)
            c.execute("INSERT OR IGNORE INTO template_names(name, template_id) VALUES (?, ?)",
                      (name, template_id))

    def find_template(self, ref: str, *, visible_to: int | None = None) -> TemplateRow | None:
        """The template ``ref`` names (id, name, id or digest prefix); with ``visible_to``:
        only among the ones that caller may see (its own and the shared ones)."""
        def seen(rows: list[sqlite3.Row]) -> list[TemplateRow]:
            return [t for t in map(self._template, rows) if t.visible_to(visible_to)]

        found = seen(self._q(f"{self._T} WHERE t.id=?", (ref,)))
        if not found:
            found = seen(self._q(f"{self._T} JOIN template_names n ON n.template_id=t.id WHERE n.name=?", (ref,)))
        if not found and len(ref) >= 6:
            found = seen(self._q(f"{self._T} WHERE t.id LIKE ? OR t.digest LIKE ?", (ref + "%", ref + "%")))
            if len(found) > 1:
                return None
        return found[0] if found else None

    def get_template(self, ref: str, *, visible_to: int | None = None) -> TemplateRow:
        """The template ``ref`` names; NotFound (the same words for one the caller may not
        see as for one that does not exist) otherwise."""
        t = self.find_template(ref, visible_to=visible_to)
        if t is None:
            raise NotFound(f"template {ref!r} not found", op="find template", obj=ref,
                           hint="`cowdisk template ls` lists templates")
        return t

    def templates(self, *, visible_to: int | None = None) -> list[TemplateRow]:
        return [t for t in map(self._template, self._q(f"{self._T} ORDER BY t.created")) if t.visible_to(visible_to)]

    def set_template_owner(self, template_id: str, *, owner: int | None = None, shared: bool | None = None) -> None:
        """Hand a template to another owner and/or mark it shared or not."""
        with self.tx() as c:
            if owner is not None:
                c.execute("UPDATE templates SET owner=? WHERE id=?", (owner, template_id))
            if shared is not None:
                c.execute("UPDATE templates SET shared=? WHERE id=?", (int(shared), template_id))

    def set_template_state(self, template_id: str, state: str) -> None:
        with self.tx() as c:
            c.execute("UPDATE templates SET state=? WHERE id=?", (state, template_id))

    def set_template_identity(self, template_id: str, size: int, mtime_ns: int, ino: int, ctime_ns: int) -> None:
        """Record the template file's quick identity again (after a full digest found the
        content unchanged) and mark it ready."""
        with self.tx() as c:
            c.execute("UPDATE templates SET size=?, mtime_ns=?, ino=?, ctime_ns=?, state='ready' WHERE id=?",
                      (size, mtime_ns, ino, ctime_ns, template_id))

    def adopt_volume(self, v: VolumeRow) -> None:
        """Insert a volume row as it is (any state): only for rebuilding rows from manifests,
        where the volume's history already happened."""
        with self.tx() as c:
            c.execute(
                "INSERT INTO volumes(id, template_id, backend, state, size, data_path, device, created,"
                " updated, parent, error, owner) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (v.id, v.template_id, v.backend, v.state, v.size, v.data_path, v.device, v.created,
                 v.updated, v.parent, v.error, v.owner))

    def find_template_by_source(self, source: str) -> TemplateRow | None:
        rows = self._q(f"{self._T} WHERE t.source=? ORDER BY t.created LIMIT 1", (source,))
        return self._template(rows[0]) if rows else None

    def delete_template(self, template_id: str) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM template_names WHERE template_id=?", (template_id,))
            c.execute("DELETE FROM template_loops WHERE template_id=?", (template_id,))
            c.execute("DELETE FROM templates WHERE id=?", (template_id,))

    def template_users(self, template_id: str, *, besides: str | None = None, owner: int | None = None) -> list[str]:
        """The volumes over a template; with ``besides``: other than that one, and not being
        removed themselves; with ``owner``: only that uid's."""
        if owner is not None:
            return [r[0] for r in self._q("SELECT id FROM volumes WHERE template_id=? AND owner=? ORDER BY id",
                                          (template_id, owner))]
        if besides is None:
            return [r[0] for r in self._q("SELECT id FROM volumes WHERE template_id=? ORDER BY id", (template_id,))]
        return [r[0] for r in self._q("SELECT id FROM volumes WHERE template_id=? AND id!=? AND state!=? ORDER BY id",
                                      (template_id, besides, REMOVING.value))]

    # -- template loops ----------------------------------------------------------

    def template_loop(self, template_id: str) -> tuple[int, str] | None:
        rows = self._q("SELECT loop, devno FROM template_loops WHERE template_id=?", (template_id,))
        return (rows[0][0], rows[0][1]) if rows else None

    def set_template_loop(self, template_id: str, loop: int, devno: str) -> None:
        with self.tx() as c:
            c.execute("INSERT OR REPLACE INTO template_loops(template_id, loop, devno) VALUES (?,?,?)",
                      (template_id, loop, devno))

    def clear_template_loop(self, template_id: str) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM template_loops WHERE template_id=?", (template_id,))

    # -- volumes -----------------------------------------------------------------

    @staticmethod
    def _volume(r: sqlite3.Row) -> VolumeRow:
        return VolumeRow(r["id"], r["template_id"], r["backend"], VolumeState(r["state"]), r["size"], r["data_path"],
                         r["device"], r["created"], r["updated"], r["parent"], r["error"], r["owner"])

    def add_volume(self, v: VolumeRow) -> None:
        if v.state != CREATING:
            raise StateError(f"add volume {v.id}: a volume is born {CREATING.value}, not {v.state}",
                             op="add volume", obj=v.id)
        with self.tx() as c:
            try:  # the primary key and the template's foreign key check it (no reads first)
                c.execute(
                    "INSERT INTO volumes(id, template_id, backend, state, size, data_path, device, created,"
                    " updated, parent, error, owner) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (v.id, v.template_id, v.backend, v.state, v.size, v.data_path, v.device, v.created,
                     v.updated, v.parent, v.error, v.owner))
            except sqlite3.IntegrityError as e:
                if c.execute("SELECT 1 FROM volumes WHERE id=?", (v.id,)).fetchone():
                    raise AlreadyExists(f"volume {v.id!r} already exists", op="create volume", obj=v.id,
                                        hint="pick another id or remove the old volume") from None
                if not c.execute("SELECT 1 FROM templates WHERE id=?", (v.template_id,)).fetchone():
                    raise NotFound(f"add volume {v.id}: template {v.template_id!r} not found", op="add volume",
                                   obj=v.template_id) from None
                raise CowdiskError(f"add volume {v.id}: {e}", op="add volume", obj=v.id) from e

    def find_volume(self, vid: str) -> VolumeRow | None:
        rows = self._q("SELECT * FROM volumes WHERE id=?", (vid,))
        return self._volume(rows[0]) if rows else None

    def get_volume(self, vid: str, *, owner: int | None = None) -> VolumeRow:
        """Volume ``vid``; with ``owner``: only if that uid owns it. NotFound otherwise, in the
        same words whether it does not exist or is another owner's (ids do not leak)."""
        v = self.find_volume(vid)
        if v is None or (owner is not None and v.owner != owner):
            raise NotFound(f"volume {vid!r} not found", op="find volume", obj=vid,
                           hint="`cowdisk volume ls` lists volumes")
        return v

    def volumes(self, *, owner: int | None = None) -> list[VolumeRow]:
        if owner is None:
            return [self._volume(r) for r in self._q("SELECT * FROM volumes ORDER BY created, id")]
        return [self._volume(r) for r in self._q("SELECT * FROM volumes WHERE owner=? ORDER BY created, id",
                                                 (owner,))]

    def count_volumes(self, owner: int) -> int:
        return int(self._q("SELECT count(*) FROM volumes WHERE owner=?", (owner,))[0][0])

    def set_volume_owner(self, vid: str, owner: int) -> None:
        with self.tx() as c:
            if c.execute("UPDATE volumes SET owner=?, updated=? WHERE id=?", (owner, time.time(), vid)).rowcount != 1:
                raise NotFound(f"volume {vid!r} not found", op="chown volume", obj=vid)

    _MUTABLE = frozenset({"device", "error"})

    def update_volume(self, vid: str, **fields: Any) -> None:
        """Change a volume's device path or error text; the state only through :meth:`set_state`,
        identity fields (id, template, backend, data path) never."""
        bad = set(fields) - self._MUTABLE
        if bad:
            raise TypeError(f"update_volume({vid!r}): {', '.join(sorted(bad))} cannot be updated here")
        if not fields:
            return
        fields["updated"] = time.time()
        cols = ", ".join(f"{k}=?" for k in fields)
        with self.tx() as c:
            c.execute(f"UPDATE volumes SET {cols} WHERE id=?", (*fields.values(), vid))

    def set_state(self, vid: str, to: VolumeState, **fields: Any) -> VolumeState:
        """Move volume ``vid`` to state ``to`` (and set ``fields``: device, error) if the
        transition table allows it; returns the state it left. Raises StateError otherwise."""
        with self.tx() as c:
            row = c.execute("SELECT state FROM volumes WHERE id=?", (vid,)).fetchone()
            if row is None:
                raise NotFound(f"volume {vid!r} not found", op="set volume state", obj=vid)
            cur = VolumeState(row[0])
            if (cur, to) not in TRANSITIONS:
                raise StateError(f"volume {vid}: {cur.value} -> {to.value} is not an allowed transition",
                                 op="set volume state", obj=vid)
            bad = set(fields) - self._MUTABLE
            if bad:
                raise TypeError(f"set_state({vid!r}): {', '.join(sorted(bad))} cannot be updated here")
            cols = "".join(f", {k}=?" for k in fields)
            c.execute(f"UPDATE volumes SET state=?, updated=?{cols} WHERE id=?",
                      (to.value, time.time(), *fields.values(), vid))
        log.debug("volume %s: %s -> %s", vid, cur.value, to.value)
        return cur

    def delete_volume(self, vid: str) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM objects WHERE volume_id=?", (vid,))
            c.execute("DELETE FROM links WHERE volume_id=?", (vid,))
            c.execute("DELETE FROM volumes WHERE id=?", (vid,))

    # -- kernel objects and links ---------------------------------------------------

    def record_object(self, volume_id: str, kind: str, name: str) -> None:
        with self.tx(durable=False) as c:
            c.execute("INSERT OR REPLACE INTO objects(kind, name, volume_id, created) VALUES (?,?,?,?)",
                      (kind, name, volume_id, time.time()))

    def forget_object(self, kind: str, name: str, *, volume_id: str | None = None) -> None:
        """Forget a kernel object that is gone (of ``volume_id``: deferred inside :meth:`deferring`)."""
        self._delete_soon("DELETE FROM objects WHERE kind=? AND name=?", (kind, name), volume_id)

    def objects(self, volume_id: str | None = None) -> list[tuple[str, str, str]]:
        if volume_id is None:
            rows = self._q("SELECT kind, name, volume_id FROM objects ORDER BY created")
        else:
            rows = self._q("SELECT kind, name, volume_id FROM objects WHERE volume_id=? ORDER BY created",
                           (volume_id,))
        return [(r[0], r[1], r[2]) for r in rows]

    def set_link(self, path: str, volume_id: str, target: str) -> None:
        """Record a stable link. Not durable on its own (see ``tx``): a link is made or dropped
        inside an operation, between its intent's durable commit and its done state's, which
        makes it durable; after a power loss in between, recovery acts on the intent, drops
        link rows whose owner is not attached and removes link directories of no volume."""
        with self.tx(durable=False) as c:
            c.execute("INSERT OR REPLACE INTO links(path, volume_id, target) VALUES (?,?,?)",
                      (path, volume_id, target))

    def drop_link(self, path: str, *, volume_id: str | None = None) -> None:
        """Drop the row of a link that is gone (of ``volume_id``: deferred inside :meth:`deferring`)."""
        self._delete_soon("DELETE FROM links WHERE path=?", (path,), volume_id)

    def link(self, path: str) -> tuple[str, str, str] | None:
        """The row of the link at ``path`` (a primary-key lookup), or None."""
        rows = self._q("SELECT path, volume_id, target FROM links WHERE path=?", (path,))
        return (rows[0][0], rows[0][1], rows[0][2]) if rows else None

    def links_in(self, directory: str) -> list[tuple[str, str, str]]:
        """The rows of the links directly inside ``directory`` (a range of the primary key:
        paths after ``directory/`` and before ``directory0``, '0' following '/'), without
        reading every link of the store."""
        d = directory.rstrip("/")
        rows = self._q("SELECT path, volume_id, target FROM links WHERE path > ? AND path < ? ORDER BY path",
                       (d + "/", d + "0"))
        return [(r[0], r[1], r[2]) for r in rows if "/" not in r[0][len(d) + 1:]]

    def links(self, volume_id: str | None = None) -> list[tuple[str, str, str]]:
        if volume_id is None:
            rows = self._q("SELECT path, volume_id, target FROM links ORDER BY path")
        else:
            rows = self._q("SELECT path, volume_id, target FROM links WHERE volume_id=? ORDER BY path",
                           (volume_id,))
        return [(r[0], r[1], r[2]) for r in rows]

    # -- intents -----------------------------------------------------------------

    def begin_intent(self, op: str, *, volume_id: str | None = None, template_id: str | None = None,
                     data: dict[str, Any] | None = None) -> int:
        pid = os.getpid()
        with self.tx() as c:
            cur = c.execute(
                "INSERT INTO intents(op, volume_id, template_id, pid, pid_start, started, data)"
                " VALUES (?,?,?,?,?,?,?)",
                (op, volume_id, template_id, pid, process_start(pid), time.time(), json.dumps(data or {})))
            return int(cur.lastrowid or 0)

    def update_intent(self, intent_id: int, data: dict[str, Any]) -> None:
        with self.tx() as c:
            c.execute("UPDATE intents SET data=? WHERE id=?", (json.dumps(data), intent_id))

    def end_intent(self, intent_id: int) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM intents WHERE id=?", (intent_id,))

    def intents(self) -> list[Intent]:
        return [Intent(r["id"], r["op"], r["volume_id"], r["template_id"], r["pid"], r["pid_start"],
                       r["started"], json.loads(r["data"]))
                for r in self._q("SELECT * FROM intents ORDER BY id")]

    def live_intent_volumes(self) -> set[str]:
        """Volumes (and template ids) that a running process is working on right now."""
        out: set[str] = set()
        for i in self.intents():
            if process_alive(i.pid, i.pid_start):
                if i.volume_id:
                    out.add(i.volume_id)
                if i.template_id:
                    out.add(i.template_id)
        return out
