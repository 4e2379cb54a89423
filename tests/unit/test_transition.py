"""The transition mechanism on a real SQLite registry, no kernel: intent and trying state
together, steps in their declared order, done state with the end of the intent, undo on
failure for roll-back operations, the intent kept for roll-forward ones, revert, and the
crash points derived from the declarations."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from cowdisk.errors import StateError
from cowdisk.registry import ATTACHED, CHECKPOINTED, CHECKPOINTING, CREATING, Registry, TemplateRow, VolumeRow
from cowdisk.store.transition import (
    ADOPT,
    CHECKPOINT,
    CREATE,
    FLATTEN,
    FORK,
    INTENT,
    OPERATIONS,
    REMOVE,
    RESTORE,
    RESTORE_AS,
    Operation,
    Step,
    Transition,
    crash_points,
    legacy_op,
)


@pytest.fixture
def reg(tmp_path) -> Registry:
    r = Registry(str(tmp_path / "registry.db"))
    r.add_template(TemplateRow("t1", "/nowhere/disk.img", 4096, "d" * 64, 0, 0, False, "test", time.time(), "ready"))
    yield r
    r.close()


def row(vid: str) -> VolumeRow:
    now = time.time()
    return VolumeRow(vid, "t1", "copy", CREATING, 4096, f"/nowhere/{vid}", None, now, now, None, None)


def test_create_commits_intent_and_row_together_then_done_state(reg: Registry) -> None:
    seen = []
    with Transition(reg, CREATE, "v", row=row("v")) as t:
        seen.append((reg.get_volume("v").state, [i.op for i in reg.intents()]))
        t.step("volume", lambda: "/dev/x")
        t.step("link", lambda: None)
        t.finish(device="/dev/x")
    assert seen == [(CREATING, ["create"])]
    v = reg.get_volume("v")
    assert (v.state, v.device) == (ATTACHED, "/dev/x")
    assert reg.intents() == []


def test_an_undo_operation_runs_its_undo_on_failure(reg: Registry) -> None:
    undone = []

    def undo(t: Transition, e: BaseException) -> None:
        undone.append((t.op.name, type(e).__name__))
        reg.delete_volume(t.vid)
        reg.end_intent(t.intent)

    with pytest.raises(OSError):
        with Transition(reg, CREATE, "v", row=row("v"), undo=undo) as t:
            t.step("volume", lambda: (_ for _ in ()).throw(OSError(5, "boom")))
    assert undone == [("create", "OSError")]
    assert reg.find_volume("v") is None and reg.intents() == []


def test_a_failed_undo_keeps_the_intent_and_says_so(reg: Registry) -> None:
    def undo(t: Transition, e: BaseException) -> None:
        raise RuntimeError("undo broke")

    with pytest.raises(OSError) as ei:
        with Transition(reg, CREATE, "v", row=row("v"), undo=undo):
            raise OSError(5, "boom")
    assert any("undo of create v failed too" in n for n in ei.value.__notes__)
    assert [i.op for i in reg.intents()] == ["create"]


def test_a_finish_operation_leaves_its_intent_for_recovery(reg: Registry) -> None:
    reg.add_volume(row("v"))
    reg.set_state("v", ATTACHED)
    with pytest.raises(OSError):
        with Transition(reg, CHECKPOINT, "v") as t:
            t.step("detach", lambda: (_ for _ in ()).throw(OSError(16, "busy")))
    assert reg.get_volume("v").state == CHECKPOINTING
    assert [(i.op, i.volume_id) for i in reg.intents()] == [("checkpoint", "v")]


def test_revert_puts_the_start_state_back_and_ends_the_intent(reg: Registry) -> None:
    reg.add_volume(row("v"))
    reg.set_state("v", ATTACHED)
    with pytest.raises(LookupError):
        with Transition(reg, REMOVE, "v") as t:
            t.revert()
            raise LookupError("in use")
    assert reg.get_volume("v").state == ATTACHED and reg.intents() == []


def test_remove_deletes_the_row_with_the_end_of_its_intent(reg: Registry) -> None:
    reg.add_volume(row("v"))
    reg.set_state("v", ATTACHED)
    with Transition(reg, REMOVE, "v") as t:
        t.step("detach", lambda: None)
        t.step("data", lambda: None)  # "links" left out: optional steps may be skipped
        t.finish()
    assert reg.find_volume("v") is None and reg.intents() == []


CHILD = r"""
import os, sys, time
from cowdisk.registry import ATTACHED, CREATING, Registry, TemplateRow, VolumeRow
from cowdisk.store.transition import CHECKPOINT, CREATE, REMOVE, Transition

reg = Registry(sys.argv[1])
reg.add_template(TemplateRow("t1", "/nowhere/disk.img", 4096, "d" * 64, 0, 0, False, "test", time.time(), "ready"))
mark = os.open(os.devnull, os.O_WRONLY)
reg._conn().set_trace_callback(lambda q: os.write(mark, b"@COMMIT") if q == "COMMIT" else None)


def create():
    now = time.time()
    with Transition(reg, CREATE, "v", row=VolumeRow("v", "t1", "copy", CREATING, 4096, "/nowhere/v", None, now,
                                                   now, None, None)) as t:
        t.step("volume", lambda: "/dev/x")
        t.step("link", reg.set_link, "/links/v/rootfs", "v", "/dev/x")
        t.finish(device="/dev/x")


def checkpoint():
    with Transition(reg, CHECKPOINT, "v") as t:
        t.step("detach", lambda: None)
        t.step("links", reg.drop_link, "/links/v/rootfs", volume_id="v")
        t.finish(device=None)


def remove():
    with Transition(reg, REMOVE, "v") as t:
        t.step("detach", lambda: None)
        t.step("data", lambda: None)
        t.finish()


for name, fn in (("create", create), ("checkpoint", checkpoint), ("remove", remove)):
    os.write(mark, f"@OP {name}".encode())
    fn()
assert reg.find_volume("v") is None and reg.intents() == [] and reg.links() == []
os.write(mark, b"@END")  # closing checkpoints the WAL into the database (its own syncs)
reg.close()
"""


def _commits_seen_by_strace(tmp_path) -> dict[str, list[str]]:
    """``durable``/``relaxed`` for each commit of create, checkpoint and remove, as the
    kernel sees it: a child process runs them under strace, which shows each COMMIT (a
    marker write) and each fdatasync of the registry's WAL. A commit followed by the
    WAL's fdatasync before the next commit waited for the disk."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace missing: install.sh installs it")
    out = tmp_path / "strace.txt"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    db = str(tmp_path / "child.db")
    subprocess.run([strace, "-f", "-qq", "-y", "-s", "64", "-e", "trace=fdatasync,fsync,write", "-o", str(out),
                    sys.executable, str(script), db], check=True, timeout=120)
    ops: dict[str, list[str]] = {}
    cur: list[str] | None = None
    for line in out.read_text().splitlines():
        if '"@END"' in line:
            cur = None
        elif '"@OP ' in line:
            cur = ops.setdefault(line.split('"@OP ', 1)[1].split('"', 1)[0], [])
        elif '"@COMMIT"' in line and cur is not None:
            cur.append("relaxed")
        elif ("fdatasync(" in line or "fsync(" in line) and cur:
            assert f"<{db}-wal>" in line, line  # only the WAL is synced (no checkpoint here)
            cur[-1] = "durable"
    return ops


def test_only_the_commits_recovery_depends_on_wait_for_the_disk(tmp_path) -> None:
    """The power-loss rule (docs/architecture.md): the intent is durable before the first
    kernel object; the done state is durable for an operation recovery would undo (create),
    not for one it finishes (checkpoint, remove); link rows ride on those commits, a dropped
    one with the done state's. Seen in the syscalls: one WAL fdatasync after each durable
    commit, none after a relaxed one."""
    assert _commits_seen_by_strace(tmp_path) == {
        "create": ["durable", "relaxed", "durable"],
        # the link's row, dropped once the link is gone, is written with the done state
        "checkpoint": ["durable", "relaxed"],
        "remove": ["durable", "relaxed"]}


def test_records_of_gone_things_are_written_with_the_done_state_and_only_their_own(reg: Registry) -> None:
    """Inside a transition, forgetting an object and dropping a link row (of a named volume)
    wait for the done commit; a record another volume made meanwhile under the same name
    (the kernel gave the loop number out again) survives that deferred delete."""
    reg.add_volume(row("v"))
    reg.set_state("v", ATTACHED)
    reg.add_volume(row("w"))
    reg.record_object("v", "loop", "7")
    reg.set_link("/links/v/rootfs", "v", "/dev/x")
    other = Registry(reg.path)  # another process's view: its own connection
    try:
        with Transition(reg, REMOVE, "v") as t:
            t.step("detach", reg.forget_object, "loop", "7", volume_id="v")
            assert other.objects() == [("loop", "7", "v")]  # not written yet
            other.record_object("w", "loop", "7")  # loop 7 given out again, to w
            t.step("links", reg.drop_link, "/links/v/rootfs", volume_id="v")
            assert [p for p, _, _ in other.links()] == ["/links/v/rootfs"]
            t.step("data", lambda: None)
            t.finish()
        assert other.objects() == [("loop", "7", "w")] and other.links() == []
        assert other.find_volume("v") is None
    finally:
        other.close()


def test_deferred_records_are_written_when_the_block_fails(reg: Registry) -> None:
    """A roll-forward operation that fails keeps its intent; what its steps released is
    still forgotten, at the end of the block."""
    reg.add_volume(row("v"))
    reg.set_state("v", ATTACHED)
    reg.record_object("v", "dm", "cd-v")
    with pytest.raises(LookupError):
        with Transition(reg, REMOVE, "v") as t:
            t.step("detach", reg.forget_object, "dm", "cd-v", volume_id="v")
            raise LookupError("data step failed")
    assert reg.objects() == [] and [i.op for i in reg.intents()] == ["remove"]


def test_steps_run_only_in_their_declared_order(reg: Registry) -> None:
    reg.add_volume(row("v"))
    reg.set_state("v", ATTACHED)
    with pytest.raises(TypeError, match="not declared"):
        with Transition(reg, REMOVE, "v") as t:
            t.step("data", lambda: None)
            t.step("detach", lambda: None)


def test_a_block_that_forgets_finish_is_a_bug(reg: Registry) -> None:
    with pytest.raises(TypeError, match="without finish"):
        with Transition(reg, CREATE, "v", row=row("v")):
            pass


def test_the_trying_state_must_be_allowed_from_the_current_one(reg: Registry) -> None:
    reg.add_volume(row("v"))  # creating: checkpoint cannot start
    with pytest.raises(StateError):
        with Transition(reg, CHECKPOINT, "v") as t:
            t.finish()
    assert reg.get_volume("v").state == CREATING and reg.intents() == []


def test_require_names_the_operation_state_and_what_it_needs(reg: Registry) -> None:
    reg.add_volume(row("v"))
    v = reg.get_volume("v")
    with pytest.raises(StateError, match=r"restore volume v: it is creating, not checkpointed") as ei:
        RESTORE_AS.require(v)
    assert ei.value.exit_code == StateError.exit_code
    for op in (FORK, FLATTEN):
        with pytest.raises(StateError, match=f"{op.name} volume v: it is creating, not attached or checkpointed"):
            op.require(v)
    reg.set_state("v", ATTACHED)
    FLATTEN.require(reg.get_volume("v"))  # allowed: no error


def test_crash_points_come_from_the_declared_steps() -> None:
    backend_steps = {"create": ("cow_file", "dm"), "attach": ("dm",)}
    assert crash_points(CREATE, backend_steps) == [INTENT, "cow_file", "dm", "volume", "link"]
    assert crash_points(RESTORE, backend_steps) == [INTENT, "dm", "device", "link"]
    assert crash_points(REMOVE, {}) == [INTENT, "detach", "links", "source-links", "data"]
    op = Operation("demo", frozenset({ATTACHED}), None, None, "undo",
                   (Step("a", "copy_data"), Step("b", points=("b-half",))))
    assert crash_points(op, {"copy_data": ("x", "y")}) == [INTENT, "x", "y", "a", "b-half", "b"]


def test_every_operation_is_declared_consistently() -> None:
    for op in OPERATIONS.values():
        assert op.steps, op.name
        assert len({s.name for s in op.steps}) == len(op.steps), op.name
        if op.makes_volume:
            assert op.trying == CREATING, op.name
            assert (op.source_from is None) == (op in (CREATE, ADOPT)), op.name  # adopt: from another store
        assert op.after_crash in ("undo", "finish")
    assert CHECKPOINT.done == CHECKPOINTED and REMOVE.done is None


def test_intents_of_older_versions_map_to_todays_operations() -> None:
    assert legacy_op("restore", {"source": "a"}) == "restore-as"
    assert legacy_op("restore", {"in_place": True}) == "restore"
    assert legacy_op("create", {"fork_of": "a"}) == "fork"
    assert legacy_op("create", {}) == "create"


def test_transitions_are_derived_from_the_operations() -> None:
    """The registry's table of allowed state changes is derived from the operations'
    declarations (issue 22 item 7); it equals the table once written out by hand in
    registry.py, and an operation's declaration changes it."""
    import dataclasses

    from cowdisk.model import VolumeState as S
    from cowdisk.operations import REATTACH, transitions
    from cowdisk.registry import TRANSITIONS

    cr, at, cking, cked, rs, rm, err = (S.CREATING, S.ATTACHED, S.CHECKPOINTING, S.CHECKPOINTED, S.RESTORING,
                                        S.REMOVING, S.ERROR)
    old = frozenset({
        (cr, at), (cr, cked), (at, cking), (cking, cked), (cking, at), (cked, rs), (rs, at), (rs, cked),
        *((s, rm) for s in (cr, at, cking, cked, rs, err)),
        (rm, at), (at, err), (at, at),
    })
    assert TRANSITIONS == old
    without_revert = {**OPERATIONS, "checkpoint": dataclasses.replace(CHECKPOINT, back_to=frozenset())}
    assert transitions(without_revert.values(), REATTACH) == old - {(cking, at)}
