"""The registry on a fresh SQLite file, no root and no kernel: schema, meta, templates and
their names and loops, volumes and the state transition table, kernel objects, links,
intents, transactions, and two processes' worth of connections on one file.

Rows are checked through the registry and, where the registry's own reading could hide a
bug, straight from the SQLite file (the witness does not go through cowdisk).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sqlite3
import subprocess
import time

import pytest

from cowdisk.errors import AlreadyExists, CowdiskError, NotFound, StateError
from cowdisk.kernel.procfs import process_start
from cowdisk.registry import (
    ATTACHED,
    CHECKPOINTED,
    CHECKPOINTING,
    CREATING,
    ERROR,
    REMOVING,
    RESTORING,
    MIGRATIONS,
    SCHEMA_VERSION,
    TRANSITIONS,
    Registry,
    TemplateRow,
    VolumeRow,
    VolumeState,
)


@pytest.fixture
def db(tmp_path) -> str:
    return str(tmp_path / "registry.db")


@pytest.fixture
def reg(db):
    r = Registry(db)
    yield r
    r.close()


def tpl(tid: str = "t1", *names: str, path: str = "/nowhere/t1.img", digest: str | None = None) -> TemplateRow:
    return TemplateRow(tid, path, 1 << 20, digest or (tid * 64)[:64], 123, 456, False, "test", time.time(),
                       "ready", names)


def vol(vid: str, template_id: str = "t1", state: VolumeState = CREATING) -> VolumeRow:
    now = time.time()
    return VolumeRow(vid, template_id, "copy", state, 1 << 20, f"/nowhere/volumes/{vid}", None, now, now, None,
                     None)


def raw(db: str, sql: str, args: tuple = ()) -> list[tuple]:
    """The witness: the SQLite file read (or written) without the registry."""
    c = sqlite3.connect(db)
    try:
        with c:
            return c.execute(sql, args).fetchall()
    finally:
        c.close()


def force_state(db: str, vid: str, state: VolumeState) -> None:
    """A hand-made record: a volume in any state, as a crash or an older cowdisk may leave it."""
    raw(db, "UPDATE volumes SET state=? WHERE id=?", (state.value, vid))


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# -- schema and meta ------------------------------------------------------------------------


def test_fresh_file_has_the_current_schema_and_reopens(db) -> None:
    r = Registry(db)
    assert r.schema_version == SCHEMA_VERSION
    r.add_template(tpl())
    r.close()
    assert raw(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert raw(db, "PRAGMA journal_mode") == [("wal",)]
    r2 = Registry(db)  # migrations are not applied twice
    try:
        assert r2.schema_version == SCHEMA_VERSION
        assert [t.id for t in r2.templates()] == ["t1"]
    finally:
        r2.close()


def test_a_store_older_than_owners_is_migrated_with_root_as_owner(db) -> None:
    """A schema-2 registry (made before owners) with a template and a volume: opened, it is
    migrated to the current schema, and both belong to root (0); the template is not shared."""
    c = sqlite3.connect(db)
    for stmt in MIGRATIONS[0] + MIGRATIONS[1]:
        c.execute(stmt)
    c.execute("PRAGMA user_version=2")
    c.execute("INSERT INTO templates(id, path, size, digest, mtime_ns, ino, owned, source, created)"
              " VALUES ('t1', '/x', 4096, 'd', 1, 2, 1, 's', 0)")
    c.execute("INSERT INTO volumes(id, template_id, backend, state, size, data_path, created, updated)"
              " VALUES ('v1', 't1', 'copy', 'attached', 4096, '/v', 0, 0)")
    c.commit()
    c.close()
    r = Registry(db)
    try:
        assert r.schema_version == SCHEMA_VERSION == 3
        assert r.get_volume("v1").owner == 0 and r.get_template("t1").owner == 0
        assert r.get_template("t1").shared is False
        with pytest.raises(NotFound, match="volume 'v1' not found"):
            r.get_volume("v1", owner=1000)  # another uid: the same words as a missing volume
        assert r.find_template("t1", visible_to=1000) is None and r.templates(visible_to=0)[0].id == "t1"
    finally:
        r.close()


def test_a_newer_schema_is_refused(db) -> None:
    Registry(db).close()
    raw(db, f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(CowdiskError) as ei:
        Registry(db)
    assert (ei.value.op, ei.value.obj) == ("open registry", db)


def test_meta_default_keeps_the_first_value(reg) -> None:
    assert reg.meta("store_id") is None
    assert reg.set_meta_default("store_id", "aaaa") == "aaaa"
    assert reg.set_meta_default("store_id", "bbbb") == "aaaa"
    reg.set_meta("store_id", "cccc")
    assert reg.meta("store_id") == "cccc"


# -- templates ------------------------------------------------------------------------------


def test_template_add_find_by_id_name_and_prefix(reg) -> None:
    reg.add_template(tpl("abcdef0123456789", "base", "debian"))
    t = reg.get_template("abcdef0123456789")
    assert t.names == ("base", "debian") and not t.owned and t.state == "ready"
    assert reg.find_template("base") == t == reg.find_template("debian")
    assert reg.find_template("abcdef") == t  # an id prefix of 6 or more
    assert reg.find_template(t.digest[:8]) == t  # a digest prefix
    assert reg.find_template("abcde") is None  # too short to be a prefix
    reg.add_template(tpl("abcdef9999999999"))
    assert reg.find_template("abcdef") is None  # ambiguous
    with pytest.raises(NotFound) as ei:
        reg.get_template("nope")
    assert ei.value.obj == "nope"


def test_template_ids_and_names_are_unique(reg, db) -> None:
    reg.add_template(tpl("t1", "base"))
    with pytest.raises(AlreadyExists) as ei:
        reg.add_template(tpl("t1"))
    assert ei.value.obj == "t1"
    reg.add_template(tpl("t2"))
    with pytest.raises(AlreadyExists) as ei:
        reg.add_template_name("t2", "base")
    assert ei.value.obj == "base"
    reg.add_template_name("t1", "base")  # the same name again for the same template: no-op
    reg.add_template_name("t2", "other")
    assert raw(db, "SELECT name, template_id FROM template_names ORDER BY name") == [("base", "t1"),
                                                                                    ("other", "t2")]


def test_template_state_users_loop_and_delete(reg, db) -> None:
    reg.add_template(tpl("t1", "base"))
    reg.set_template_state("t1", "changed")
    assert reg.get_template("t1").state == "changed"
    reg.add_volume(vol("b"))
    reg.add_volume(vol("a"))
    assert reg.template_users("t1") == ["a", "b"]
    assert reg.template_loop("t1") is None
    reg.set_template_loop("t1", 7, "7:7")
    reg.set_template_loop("t1", 8, "7:8")  # replaced
    assert reg.template_loop("t1") == (8, "7:8")
    reg.clear_template_loop("t1")
    assert reg.template_loop("t1") is None
    reg.set_template_loop("t1", 9, "7:9")
    reg.delete_volume("a")
    reg.delete_volume("b")
    reg.delete_template("t1")
    assert reg.find_template("t1") is None and reg.find_template("base") is None
    for table in ("templates", "template_names", "template_loops"):
        assert raw(db, f"SELECT * FROM {table}") == [], table


def test_a_template_with_volumes_cannot_be_deleted(reg) -> None:
    reg.add_template(tpl("t1"))
    reg.add_volume(vol("v"))
    with pytest.raises(sqlite3.IntegrityError):  # volumes.template_id references it
        reg.delete_template("t1")
    assert reg.get_template("t1").id == "t1"


# -- volumes --------------------------------------------------------------------------------


def test_volume_add_find_list(reg) -> None:
    reg.add_template(tpl())
    reg.add_volume(vol("v2"))
    reg.add_volume(vol("v1"))
    v = reg.get_volume("v1")
    assert isinstance(v.state, VolumeState) and v.state == CREATING
    assert (v.template_id, v.backend, v.device, v.error) == ("t1", "copy", None, None)
    assert reg.find_volume("nope") is None
    with pytest.raises(NotFound) as ei:
        reg.get_volume("nope")
    assert ei.value.obj == "nope"
    assert [x.id for x in reg.volumes()] == ["v2", "v1"]  # by creation time


def test_a_volume_is_born_creating_once(reg) -> None:
    reg.add_template(tpl())
    with pytest.raises(StateError) as ei:
        reg.add_volume(vol("v", state=ATTACHED))
    assert ei.value.obj == "v"
    assert reg.find_volume("v") is None
    reg.add_volume(vol("v"))
    with pytest.raises(AlreadyExists) as ei:
        reg.add_volume(vol("v"))
    assert ei.value.obj == "v"


def test_a_volume_needs_its_template(reg) -> None:
    with pytest.raises(NotFound) as ei:
        reg.add_volume(vol("v", template_id="missing"))
    assert reg.volumes() == []
    assert ei.value.obj == "missing"


def test_update_volume_changes_only_device_and_error(reg, db) -> None:
    reg.add_template(tpl())
    reg.add_volume(vol("v"))
    before = reg.get_volume("v")
    reg.update_volume("v", device="/dev/x", error="boom")
    v = reg.get_volume("v")
    assert (v.device, v.error, v.state) == ("/dev/x", "boom", CREATING)
    assert v.updated >= before.updated
    for field in ("state", "id", "template_id", "backend", "data_path", "size"):
        with pytest.raises(TypeError):
            reg.update_volume("v", **{field: "x"})
    assert raw(db, "SELECT state, device, error FROM volumes") == [("creating", "/dev/x", "boom")]


def test_state_transitions_follow_the_table(reg, db) -> None:
    """Every (from, to) pair: allowed ones move the state and return the old one, the others
    raise StateError and change nothing (records made by hand in each state)."""
    reg.add_template(tpl())
    reg.add_volume(vol("v"))
    allowed = refused = 0
    for a, b in itertools.product(VolumeState, VolumeState):
        force_state(db, "v", a)
        reg.update_volume("v", device="/dev/before")
        if (a, b) in TRANSITIONS:
            assert reg.set_state("v", b, device="/dev/after") == a
            assert raw(db, "SELECT state, device FROM volumes") == [(b.value, "/dev/after")], (a, b)
            allowed += 1
        else:
            with pytest.raises(StateError) as ei:
                reg.set_state("v", b, device="/dev/after")
            assert (ei.value.op, ei.value.obj) == ("set volume state", "v")
            assert raw(db, "SELECT state, device FROM volumes") == [(a.value, "/dev/before")], (a, b)
            refused += 1
    assert allowed == len(TRANSITIONS) and refused > 0


@pytest.mark.parametrize("path", [
    [CREATING, ATTACHED, CHECKPOINTING, CHECKPOINTED, RESTORING, ATTACHED, REMOVING],  # a life
    [CREATING, REMOVING],  # a create rolled back by remove
    [CREATING, ATTACHED, CHECKPOINTING, ATTACHED],  # checkpoint reverted: the device was open
    [CREATING, ATTACHED, CHECKPOINTING, CHECKPOINTED, RESTORING, CHECKPOINTED],  # restore rolled back
    [CREATING, ATTACHED, REMOVING, ATTACHED],  # remove reverted
    [CREATING, ATTACHED, ERROR, REMOVING],  # recovery gave up; a person removes it
    [CREATING, CHECKPOINTED, RESTORING, ATTACHED],  # adopted from another store, then restored
])
def test_lifecycles_the_store_relies_on(reg, path) -> None:
    reg.add_template(tpl())
    reg.add_volume(vol("v"))
    for a, b in zip(path, path[1:]):
        assert reg.set_state("v", b) == a
    assert reg.get_volume("v").state == path[-1]


@pytest.mark.parametrize("a,b", [(CREATING, CHECKPOINTING), (CHECKPOINTED, ATTACHED), (ATTACHED, RESTORING),
                                 (ERROR, ATTACHED), (REMOVING, CHECKPOINTED), (CHECKPOINTED, CHECKPOINTING)])
def test_shortcuts_are_refused(reg, db, a, b) -> None:
    reg.add_template(tpl())
    reg.add_volume(vol("v"))
    force_state(db, "v", a)
    with pytest.raises(StateError):
        reg.set_state("v", b)
    assert reg.get_volume("v").state == a


def test_set_state_of_a_missing_volume(reg) -> None:
    with pytest.raises(NotFound) as ei:
        reg.set_state("ghost", ATTACHED)
    assert ei.value.obj == "ghost"


def test_delete_volume_takes_its_objects_and_links_only(reg, db) -> None:
    reg.add_template(tpl())
    for v in ("a", "b"):
        reg.add_volume(vol(v))
        reg.record_object(v, "file", f"/nowhere/{v}/disk.img")
        reg.set_link(f"/links/{v}/rootfs", v, f"/nowhere/{v}/disk.img")
    reg.delete_volume("a")
    assert [v.id for v in reg.volumes()] == ["b"]
    assert raw(db, "SELECT kind, name, volume_id FROM objects") == [("file", "/nowhere/b/disk.img", "b")]
    assert raw(db, "SELECT path, volume_id FROM links") == [("/links/b/rootfs", "b")]
    reg.delete_volume("a")  # gone already: nothing to do


# -- kernel objects and links -------------------------------------------------------------------


def test_objects_record_forget_and_list(reg) -> None:
    reg.record_object("a", "loop", "/dev/loop7")
    reg.record_object("a", "dm", "cowdisk-x-a")
    reg.record_object("b", "file", "/nowhere/b")
    assert reg.objects("a") == [("loop", "/dev/loop7", "a"), ("dm", "cowdisk-x-a", "a")]  # in creation order
    assert len(reg.objects()) == 3
    reg.record_object("b", "loop", "/dev/loop7")  # (kind, name) is one object: its owner changes
    assert reg.objects("a") == [("dm", "cowdisk-x-a", "a")]
    assert ("loop", "/dev/loop7", "b") in reg.objects("b")
    reg.forget_object("dm", "cowdisk-x-a")
    reg.forget_object("dm", "cowdisk-x-a")  # forgetting twice is fine
    assert reg.objects("a") == []


def test_links_set_retarget_drop(reg) -> None:
    reg.set_link("/links/a/rootfs", "a", "/dev/dm-1")
    reg.set_link("/links/b/rootfs", "b", "/dev/dm-2")
    reg.set_link("/links/a/rootfs", "c", "/dev/dm-3")  # retargeted to another volume (restore-as)
    assert reg.links() == [("/links/a/rootfs", "c", "/dev/dm-3"), ("/links/b/rootfs", "b", "/dev/dm-2")]
    assert reg.links("c") == [("/links/a/rootfs", "c", "/dev/dm-3")]
    assert reg.links("a") == []
    reg.drop_link("/links/a/rootfs")
    reg.drop_link("/links/a/rootfs")
    assert reg.links() == [("/links/b/rootfs", "b", "/dev/dm-2")]


# -- intents ----------------------------------------------------------------------------------


def test_intents_begin_update_end(reg, db) -> None:
    i1 = reg.begin_intent("create", volume_id="a")
    i2 = reg.begin_intent("flatten", volume_id="b", template_id="t9", data={"staging": "/s"})
    assert i2 > i1 > 0
    got = reg.intents()
    assert [(i.id, i.op, i.volume_id, i.template_id, i.data) for i in got] == [
        (i1, "create", "a", None, {}), (i2, "flatten", "b", "t9", {"staging": "/s"})]
    assert all(i.pid == os.getpid() and i.pid_start == process_start(os.getpid()) for i in got)
    reg.update_intent(i2, {"staging": "/s", "template_id": "t9", "existed": False})
    assert reg.intents()[1].data == {"staging": "/s", "template_id": "t9", "existed": False}
    reg.end_intent(i1)
    reg.end_intent(i1)  # ending twice is fine
    assert [i.id for i in reg.intents()] == [i2]
    reg.end_intent(i2)
    assert raw(db, "SELECT * FROM intents") == []


def test_live_intent_volumes_are_those_of_running_processes(reg, db) -> None:
    reg.begin_intent("create", volume_id="mine")
    reg.begin_intent("flatten", volume_id="also-mine", template_id="tpl-mine")
    # hand-made: intents of a process that exited, and of a PID reused by another process
    raw(db, "INSERT INTO intents(op, volume_id, template_id, pid, pid_start, started, data)"
            " VALUES ('remove', 'dead', 'tpl-dead', ?, '1', 0, '{}')", (dead_pid(),))
    raw(db, "INSERT INTO intents(op, volume_id, template_id, pid, pid_start, started, data)"
            " VALUES ('remove', 'reused', NULL, ?, 'not-my-start', 0, '{}')", (os.getpid(),))
    assert reg.live_intent_volumes() == {"mine", "also-mine", "tpl-mine"}
    assert len(reg.intents()) == 4


# -- transactions and connections ---------------------------------------------------------------


def test_a_failed_transaction_leaves_nothing(reg) -> None:
    reg.add_template(tpl())
    with pytest.raises(RuntimeError):
        with reg.tx():
            i = reg.begin_intent("create", volume_id="v")
            reg.add_volume(vol("v"))  # joins the outer transaction
            assert reg.find_volume("v") is not None and [x.id for x in reg.intents()] == [i]
            raise RuntimeError("killed between two writes")
    assert reg.find_volume("v") is None
    assert reg.intents() == []


def test_a_refused_transition_inside_a_transaction_rolls_it_back(reg) -> None:
    reg.add_template(tpl())
    reg.add_volume(vol("v"))
    with pytest.raises(StateError):
        with reg.tx():
            reg.begin_intent("checkpoint", volume_id="v")
            reg.set_state("v", RESTORING)  # creating -> restoring: not allowed
    assert reg.intents() == [] and reg.get_volume("v").state == CREATING


def test_two_registries_on_one_file_see_each_others_commits(db) -> None:
    a, b = Registry(db), Registry(db)
    try:
        a.add_template(tpl("t1", "base"))
        assert b.get_template("base").id == "t1"
        b.add_volume(vol("v"))
        b.set_state("v", ATTACHED, device="/dev/x")
        assert (a.get_volume("v").state, a.get_volume("v").device) == (ATTACHED, "/dev/x")
        with pytest.raises(AlreadyExists):
            a.add_volume(vol("v"))
    finally:
        a.close()
        b.close()


def test_rows_are_frozen(reg) -> None:
    reg.add_template(tpl())
    reg.add_volume(vol("v"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        reg.get_volume("v").state = ATTACHED  # type: ignore[misc]


def test_link_lookups_by_path_and_directory(tmp_path) -> None:
    """link(path) and links_in(dir) answer from the primary key: exactly the rows asked for,
    not a neighbour whose name shares a prefix, nor a deeper path."""
    r = Registry(str(tmp_path / "registry.db"))
    try:
        rows = [("/s/links/a/rootfs", "a", "/dev/x"), ("/s/links/a/other", "b", "/dev/y"),
                ("/s/links/ab/rootfs", "ab", "/dev/z"), ("/s/links/a-1/rootfs", "a-1", "/dev/w"),
                ("/s/links/a/deeper/rootfs", "a", "/dev/v")]
        for p, v, t in rows:
            r.set_link(p, v, t)
        assert r.link("/s/links/a/rootfs") == ("/s/links/a/rootfs", "a", "/dev/x")
        assert r.link("/s/links/a/missing") is None
        assert r.links_in("/s/links/a") == [("/s/links/a/other", "b", "/dev/y"), ("/s/links/a/rootfs", "a", "/dev/x")]
        assert r.links_in("/s/links/a/") == r.links_in("/s/links/a")
        assert r.links_in("/s/links/ab") == [("/s/links/ab/rootfs", "ab", "/dev/z")]
        assert r.links_in("/s/links/none") == []
    finally:
        r.close()
