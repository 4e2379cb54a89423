"""Recovery fed hand-made records, no root and no kernel: a copy-backend store whose
registry rows, intents and files are written directly (as a killed process or an
older cowdisk leaves them), then ``Store.recover()`` (what opening a store runs).

Each interrupted operation is rolled back or finished as its declaration says, a live
process's intent is left alone, an unknown operation is kept and reported without
stopping the others, and only true orphans are removed. Witnesses: the SQLite file read
without the registry, and the files and links on disk.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time

import pytest

from cowdisk.kernel.procfs import process_start
from cowdisk.registry import ATTACHED, CHECKPOINTED, CHECKPOINTING, CREATING, ERROR, REMOVING, RESTORING
from cowdisk.registry import TemplateRow, VolumeState
from cowdisk.store import Store

DISK = "disk.img"  # the copy backend's file in a volume's data directory


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


class Handmade:
    """Writes a store's records the way a crash leaves them."""

    def __init__(self, store: Store):
        self.s = store
        self.db = os.path.join(store.root, "registry.db")

    def sql(self, q: str, args: tuple = ()) -> list[tuple]:
        c = sqlite3.connect(self.db)
        try:
            with c:
                return c.execute(q, args).fetchall()
        finally:
            c.close()

    def template(self, tid: str = "t1", *, owned: bool = False, path: str | None = None) -> str:
        path = path or os.path.join(self.s.data_root, "templates", tid, "disk.img")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(1 << 20)
        st = os.stat(path)
        self.s.registry.add_template(TemplateRow(tid, path, st.st_size, "d" * 64, st.st_mtime_ns, st.st_ino, owned,
                                                 "handmade", time.time(), "ready"))
        return path

    def volume(self, vid: str, state: VolumeState, *, files: bool = True, link: bool = True,
               parent: str | None = None) -> str:
        """A row in ``state`` (written straight into SQLite), its data file and stable link."""
        data_dir = os.path.join(self.s.data_root, "volumes", vid)
        disk = os.path.join(data_dir, DISK)
        now = time.time()
        self.sql("INSERT INTO volumes(id, template_id, backend, state, size, data_path, device, created, updated,"
                 " parent, error) VALUES (?,?,?,?,?,?,?,?,?,?,NULL)",
                 (vid, "t1", "copy", state.value, 1 << 20, data_dir,
                  disk if state in (ATTACHED, CHECKPOINTING, REMOVING) else None, now, now, parent))
        if files:
            os.makedirs(data_dir, exist_ok=True)
            with open(disk, "wb") as f:
                f.truncate(1 << 20)
                f.seek(4096)
                f.write(vid.encode())
            self.s.registry.record_object(vid, "file", disk)
        if link:
            self.link(vid, disk)
        return disk

    def link(self, vid: str, target: str) -> None:
        path = self.s.link_path(vid)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.symlink(target, path)
        self.s.registry.set_link(path, vid, target)

    def intent(self, op: str, vid: str | None, data: dict | None = None, *, alive: bool = False) -> int:
        pid = os.getpid() if alive else dead_pid()
        start = process_start(pid) if alive else "1"
        self.sql("INSERT INTO intents(op, volume_id, template_id, pid, pid_start, started, data)"
                 " VALUES (?,?,NULL,?,?,?,?)", (op, vid, pid, start, time.time(), json.dumps(data or {})))
        return int(self.sql("SELECT max(id) FROM intents")[0][0])

    def state(self, vid: str) -> str | None:
        rows = self.sql("SELECT state FROM volumes WHERE id=?", (vid,))
        return rows[0][0] if rows else None

    def intents(self) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in self.sql("SELECT op, volume_id FROM intents ORDER BY id")]


@pytest.fixture
def hm(tmp_path):
    s = Store(str(tmp_path / "store"), backend="copy", recover=False)
    h = Handmade(s)
    h.template()
    yield h
    s.close()


def gone(s: Store, vid: str) -> bool:
    return (s.registry.find_volume(vid) is None and not os.path.lexists(os.path.join(s.data_root, "volumes", vid))
            and not os.path.lexists(os.path.dirname(s.link_path(vid))) and s.registry.objects(vid) == []
            and s.registry.links(vid) == [])


# -- interrupted operations ----------------------------------------------------------------------


def test_create_is_rolled_back(hm) -> None:
    hm.volume("v", CREATING)
    hm.intent("create", "v")
    rep = hm.s.recover()
    assert rep.rolled_back == ["create v"] and rep.errors == []
    assert gone(hm.s, "v")
    assert hm.intents() == []


def test_fork_written_by_an_older_cowdisk_is_rolled_back(hm) -> None:
    hm.volume("src", ATTACHED)
    hm.volume("f1", CREATING, parent="src")
    hm.intent("create", "f1", {"fork_of": "src"})  # an older cowdisk's spelling of fork
    rep = hm.s.recover()
    assert rep.rolled_back == ["create f1"] and rep.errors == []
    assert gone(hm.s, "f1")
    assert hm.state("src") == "attached"
    assert os.path.exists(os.path.join(hm.s.data_root, "volumes", "src", DISK))
    assert os.readlink(hm.s.link_path("src")) == os.path.join(hm.s.data_root, "volumes", "src", DISK)


def test_restore_as_is_rolled_back_and_the_source_kept(hm) -> None:
    src_disk = hm.volume("a", CHECKPOINTED, link=False)
    hm.volume("b", CREATING, parent="a")
    hm.intent("restore-as", "b", {"source": "a"})
    rep = hm.s.recover()
    assert rep.rolled_back == ["restore-as b"] and rep.errors == []
    assert gone(hm.s, "b")
    assert hm.state("a") == "checkpointed"
    with open(src_disk, "rb") as f:
        f.seek(4096)
        assert f.read(1) == b"a"


def test_restore_in_place_is_rolled_back_to_checkpointed(hm) -> None:
    disk = hm.volume("v", RESTORING)
    hm.intent("restore", "v", {"in_place": True})
    rep = hm.s.recover()
    assert rep.rolled_back == ["restore v"] and rep.errors == []
    v = hm.s.registry.get_volume("v")
    assert (v.state, v.device) == (CHECKPOINTED, None)
    assert os.path.exists(disk)  # the data is kept
    assert not os.path.lexists(hm.s.link_path("v")) and hm.s.registry.links("v") == []
    assert hm.intents() == []


def test_checkpoint_is_finished(hm) -> None:
    disk = hm.volume("v", CHECKPOINTING)
    hm.intent("checkpoint", "v")
    rep = hm.s.recover()
    assert rep.finished == ["checkpoint v"] and rep.errors == []
    v = hm.s.registry.get_volume("v")
    assert (v.state, v.device) == (CHECKPOINTED, None)
    assert os.path.exists(disk)
    assert not os.path.lexists(hm.s.link_path("v"))
    assert hm.intents() == []


def test_remove_is_finished(hm) -> None:
    hm.volume("v", REMOVING)
    hm.intent("remove", "v")
    rep = hm.s.recover()
    assert rep.finished == ["remove v"] and rep.errors == []
    assert gone(hm.s, "v")
    assert hm.intents() == []


def test_remove_interrupted_after_its_data_went_is_finished(hm) -> None:
    hm.volume("v", REMOVING, files=False, link=False)
    hm.intent("remove", "v")
    rep = hm.s.recover()
    assert rep.finished == ["remove v"] and rep.errors == []
    assert gone(hm.s, "v")


def test_flatten_is_rolled_back(hm) -> None:
    hm.volume("v", ATTACHED)
    staging = os.path.join(hm.s.data_root, "templates", ".staging-handmade")
    os.makedirs(staging)
    flat = os.path.join(staging, "disk.img")
    hm.template("flat1", owned=True, path=flat)  # registered before the kill
    hm.intent("flatten", "v", {"staging": staging, "template_id": "flat1", "existed": False})
    rep = hm.s.recover()
    assert rep.rolled_back == ["flatten v"] and rep.errors == []
    assert hm.s.registry.find_template("flat1") is None
    assert not os.path.exists(staging)
    assert hm.state("v") == "attached"  # flatten never changes its volume
    assert hm.intents() == []


def test_flatten_keeps_a_template_that_existed_before(hm) -> None:
    hm.volume("v", ATTACHED)
    staging = os.path.join(hm.s.data_root, "templates", ".staging-handmade")
    os.makedirs(staging)
    hm.intent("flatten", "v", {"staging": staging, "template_id": "t1", "existed": True})
    rep = hm.s.recover()
    assert rep.rolled_back == ["flatten v"] and rep.errors == []
    assert hm.s.registry.find_template("t1") is not None
    assert not os.path.exists(staging)


# -- what recovery leaves alone ----------------------------------------------------------------


def test_a_live_process_intent_is_left_alone(hm) -> None:
    disk = hm.volume("v", CREATING)
    hm.intent("create", "v", alive=True)
    rep = hm.s.recover()
    assert rep.rolled_back == [] and rep.finished == [] and rep.orphans_removed == [] and rep.errors == []
    assert hm.state("v") == "creating"
    assert os.path.exists(disk) and os.path.islink(hm.s.link_path("v"))
    assert hm.intents() == [("create", "v")]


def test_an_unknown_operation_is_kept_and_the_others_recovered(hm) -> None:
    hm.volume("odd", ATTACHED)
    hm.volume("v", CREATING)
    hm.intent("defragment", "odd")  # from a newer cowdisk: never guessed at
    hm.intent("create", "v")
    rep = hm.s.recover()
    assert len(rep.errors) == 1 and "defragment" in rep.errors[0], rep.errors
    assert rep.rolled_back == ["create v"]
    assert gone(hm.s, "v")
    assert hm.state("odd") == "attached"
    assert hm.intents() == [("defragment", "odd")]


def test_an_attached_volume_is_kept_and_one_whose_file_vanished_is_marked_error(hm) -> None:
    hm.volume("ok", ATTACHED)
    hm.volume("lost", ATTACHED)
    os.unlink(os.path.join(hm.s.data_root, "volumes", "lost", DISK))  # behind the store's back
    rep = hm.s.recover()
    assert "ok" in rep.kept
    assert [e for e in rep.errors if e.startswith("reactivate lost")], rep.errors
    lost = hm.s.registry.get_volume("lost")
    assert lost.state == ERROR and lost.error
    assert hm.state("ok") == "attached"
    hm.s.remove_volume("lost")  # what a person does next: error -> removing -> gone
    assert gone(hm.s, "lost")


def test_orphan_data_is_quarantined_orphan_links_removed_known_ones_kept(hm) -> None:
    hm.volume("known", CHECKPOINTED, link=False)
    for base in (os.path.join(hm.s.data_root, "volumes"), os.path.join(hm.s.root, "links")):
        os.makedirs(os.path.join(base, "ghost"))
        with open(os.path.join(base, "ghost", "x"), "w") as f:
            f.write(base)
    rep = hm.s.recover()
    # a link holds no data: removed; a volume directory may be the only copy of a disk: kept aside
    assert rep.orphans_removed == [os.path.join(hm.s.root, "links", "ghost")]
    ghost = os.path.join(hm.s.data_root, "volumes", "ghost")
    assert not os.path.exists(ghost)
    [entry] = rep.quarantined
    assert entry.startswith(ghost + " -> ")
    moved = entry.split(" -> ", 1)[1]
    with open(os.path.join(moved, "x")) as f:
        assert f.read() == os.path.join(hm.s.data_root, "volumes")
    with open(os.path.join(moved, "why.json")) as f:
        why = json.load(f)
    assert why["from"] == ghost and "no volume" in why["reason"]
    assert os.path.exists(os.path.join(hm.s.data_root, "volumes", "known", DISK))
    assert hm.s.recover().actions == 0  # the quarantine is not an orphan itself


def test_opening_the_store_runs_recovery(hm, tmp_path) -> None:
    hm.volume("v", CREATING)
    hm.intent("create", "v")
    hm.s.close()
    s = Store(hm.s.root)  # backend recorded in the registry; recovery on open
    try:
        assert gone(s, "v")
        assert s.registry.intents() == []
    finally:
        s.close()


def test_recovery_twice_is_a_no_op(hm) -> None:
    hm.volume("a", ATTACHED)
    hm.volume("b", CHECKPOINTING)
    hm.intent("checkpoint", "b")
    hm.s.recover()
    snap = (hm.sql("SELECT id, state, device FROM volumes ORDER BY id"), hm.intents(),
            sorted(os.listdir(os.path.join(hm.s.data_root, "volumes"))))
    rep = hm.s.recover()
    assert rep.actions == 0 and rep.errors == []
    assert (hm.sql("SELECT id, state, device FROM volumes ORDER BY id"), hm.intents(),
            sorted(os.listdir(os.path.join(hm.s.data_root, "volumes")))) == snap


def test_killed_writers_temporary_files_go_a_live_writers_stay(hm) -> None:
    """A manifest (or store.json, or the reserve) written by a process killed before its
    rename leaves ``<name>.tmp-<pid>[-<start>]``: recovery removes a dead writer's, keeps a
    live one's (this process: same PID and start time; a PID alone when the name has no start)."""
    hm.volume("a", ATTACHED)
    vdir = os.path.join(hm.s.data_root, "volumes", "a")
    tdir = os.path.join(hm.s.data_root, "templates", "t1")
    me = f"{os.getpid()}-{process_start(os.getpid())}"
    dead = [os.path.join(vdir, f"manifest.json.tmp-{dead_pid()}"),  # an older cowdisk's name: PID only
            os.path.join(vdir, f"manifest.json.tmp-{dead_pid()}-{process_start(os.getpid())}"),
            os.path.join(vdir, f"manifest.json.tmp-{os.getpid()}-1"),  # this PID, another start: reused
            os.path.join(tdir, f"manifest.json.tmp-{dead_pid()}-1"),
            os.path.join(hm.s.root, f"store.json.tmp-{dead_pid()}-1"),
            os.path.join(hm.s.root, f"reserve.tmp-{dead_pid()}-1")]
    live = [os.path.join(vdir, f"manifest.json.tmp-{me}"), os.path.join(vdir, f"manifest.json.tmp-{os.getpid()}"),
            os.path.join(hm.s.root, f"store.json.tmp-{me}")]
    for p in dead + live:
        with open(p, "w") as f:
            f.write("{")
    rep = hm.s.recover()
    assert sorted(p for p in rep.orphans_removed if ".tmp-" in p) == sorted(dead)
    assert [p for p in dead if os.path.exists(p)] == []
    assert [p for p in live if not os.path.exists(p)] == []
    assert hm.s.recover().actions == 0


def test_lock_files_of_gone_volumes_and_templates_go_a_held_one_stays(hm) -> None:
    """Lock files of volumes and templates that do not exist are removed by recovery (and
    gc, which runs it), each only once taken without waiting: one another holder has
    stays; those of existing volumes and templates stay."""
    from cowdisk.locks import FileLock

    hm.volume("a", ATTACHED)
    locks = os.path.join(hm.s.root, "locks")
    names = ["volume-a.lock", "template-t1.lock", "volume-gone.lock", "volume-held.lock", "template-gone.lock",
             "pool.lock"]
    for n in names:
        open(os.path.join(locks, n), "w").close()
    holder = FileLock(os.path.join(locks, "volume-held.lock"), timeout=0).acquire()  # another open file holds it
    try:
        hm.s.recover()
        assert sorted(os.listdir(locks)) == ["pool.lock", "template-t1.lock", "volume-a.lock", "volume-held.lock"]
    finally:
        holder.release()
    open(os.path.join(locks, "volume-gone2.lock"), "w").close()
    hm.s.gc()
    assert sorted(os.listdir(locks)) == ["pool.lock", "template-t1.lock", "volume-a.lock"]
