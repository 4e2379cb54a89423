"""The crash-point matrix: SIGKILL every operation right after each of its steps, recover, check.

The cases are not listed here: they come from the operations the store declares
(``cowdisk.store.transition.OPERATIONS``) and the steps each backend declares for the
methods those operations call (:func:`cowdisk.store.transition.crash_points`). A new
operation, step or backend is crash-tested by declaring it; the only thing a new
operation adds here is one line in :data:`RUNNERS` saying how to call it (and
:func:`test_every_operation_has_a_runner` fails until it is there).

For every (operation, crash point) a forked child opens the store without recovery,
sets ``COWDISK_CRASH_AT=<op>:<point>`` and runs the operation; the failpoint kills it
with SIGKILL exactly there. The parent then opens the store (recovery runs on open)
and checks the invariants:

* no leaked kernel object or file: the dm devices, loops and files of the store are
  exactly what the registry's volumes need (one dm device and one COW loop per
  attached dm volume, one template loop per template in use, a data dir per volume,
  a link dir per volume with a link);
* every volume that existed before the operation still has its data;
* the operation either fully happened or not at all, as it declares: an ``undo``
  operation leaves everything as it was before, a ``finish`` operation is completed
  (its subject in the done state, or gone);
* no intent is left, and a second recovery finds nothing to do.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable

from testutil import make_tree, read_at, write_at
from cowdisk.backends import backend_class
from cowdisk.kernel import loop
from cowdisk.registry import ATTACHED, CHECKPOINTED, VolumeState
from cowdisk.store import Store
from cowdisk.store.transition import OPERATIONS, Operation, crash_points

MiB = 1 << 20
BYSTANDER = b"bystander-data".ljust(4096, b".")
SUBJECT = b"subject-data".ljust(4096, b"#")

RUNNERS: dict[str, Callable[[Store], Any]] = {
    "create": lambda s: s.create_volume("x", "base"),
    "remove": lambda s: s.remove_volume("x"),
    "checkpoint": lambda s: s.checkpoint("x"),
    "restore": lambda s: s.restore("x"),
    "restore-as": lambda s: s.restore("x", "y"),
    "fork": lambda s: s.fork("x", ["y", "y2", "y3"], reset_identity=True),  # a batch: every child whole, or none
    "flatten": lambda s: s.flatten("x", "flat"),
    "adopt": lambda s: s.adopt_volume("x"),  # x made by the peer store (see setup)
    "take-over": lambda s: s.restore("x", steal=True),
    "import": lambda s: s.import_template(import_image(s.root), "imported"),
    "template-remove": lambda s: s.remove_template("victim"),
}
"""How to run each operation on the subject ``x`` (a new volume is ``y``)."""


def import_image(root: str) -> str:
    """A raw image beside the store for the import operation (made by :func:`setup`)."""
    return os.path.join(os.path.dirname(os.path.abspath(root)), "import.img")


@dataclass(frozen=True)
class Case:
    op: str
    step: str

    @property
    def operation(self) -> Operation:
        return OPERATIONS[self.op]


def cases(backend: str) -> list[Case]:
    """Every crash point of every operation the backend can run (an operation whose step
    calls a backend method the backend does not have, such as adopt, is not one)."""
    cls = backend_class(backend)
    return [Case(op.name, p) for op in OPERATIONS.values()
            if all(hasattr(cls, s.backend) for s in op.steps if s.backend)
            for p in crash_points(op, cls.steps)]


def peer_root(root: str) -> str:
    """The other store (another host) that made the volume an adopt takes over."""
    return os.path.abspath(root) + "-peer"


def subject_state(op: Operation) -> VolumeState | None:
    """The state ``x`` is set up in: what the operation (or, making a volume, its source)
    starts from, attached where it may be; None when the operation makes ``x`` itself."""
    states = op.starts_from if op.source_from is None else op.source_from
    if states is None:
        return None
    return ATTACHED if ATTACHED in states else CHECKPOINTED


def declares(op: Operation, step: str) -> bool:
    return any(s.name == step for s in op.steps)


def extra_volumes(op: Operation) -> dict[str, VolumeState]:
    """Volumes the setup adds for the steps the operation declares: an operation that settles
    a source's retargeted link (``source-links``) runs on ``x`` made as a restore-as copy of
    ``origin`` (origin's link points at x); one that retargets the source's link
    (``retarget``) starts with x's link already pointing at an earlier copy ``z``."""
    out: dict[str, VolumeState] = {}
    if declares(op, "source-links"):
        out["origin"] = CHECKPOINTED
    if declares(op, "retarget"):
        out["z"] = ATTACHED
    return out


def expected(op: Operation) -> dict[str, VolumeState]:
    """The volumes after the crash and recovery, as the operation declares."""
    before = subject_state(op)
    vols = {"bystander": ATTACHED, **extra_volumes(op)}
    if op.after_crash == "undo":
        if before is not None:
            vols["x"] = before
    elif op.done is not None:
        vols["x"] = op.done
    elif op.trying is None and before is not None:  # no state change (take-over)
        vols["x"] = before
    return vols


def setup(root: str, backend: str, tree: str, case: Case, options: dict[str, str] | None = None) -> None:
    """A store with a template, an attached bystander and the subject volume ``x`` as the op needs it."""
    s = Store(root, backend=backend, backend_options=options)
    s.build_template(make_tree(tree), "base")
    with open(import_image(root), "wb") as f:
        f.write(os.urandom(1 << 20))
    if case.op == "template-remove":  # a template no volume uses, for the removal to take
        s.import_template(import_image(root), "victim")
    by = s.create_volume("bystander", "base")
    write_at(by.link, 3 * MiB, BYSTANDER)
    if case.op == "adopt":  # x is a checkpointed volume another store made in the same pool
        peer = Store(peer_root(root), backend=backend, backend_options=options)
        peer.import_template(s.template("base").path, "base", adopt=True)
        x = peer.create_volume("x", "base")
        write_at(x.link, 4 * MiB, SUBJECT)
        peer.checkpoint("x")
        peer.close()
    state = subject_state(case.operation)
    if state is not None:
        extra = extra_volumes(case.operation)
        first = "origin" if "origin" in extra else "x"
        x = s.create_volume(first, "base")
        write_at(x.link, 4 * MiB, SUBJECT)
        if first == "origin":  # x is origin's restore-as copy: origin's link points at x
            s.checkpoint("origin")
            s.restore("origin", "x")
        if state == CHECKPOINTED:
            s.checkpoint("x")
        if "z" in extra:  # x's link points at an earlier copy z of it
            s.restore("x", "z")
    s.close()


def crash(root: str, case: Case) -> int:
    """Run the op in a forked child that the failpoint kills; return its wait status."""
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.environ["COWDISK_CRASH_AT"] = f"{case.op}:{case.step}"
            RUNNERS[case.op](Store(root, recover=False))
        except BaseException:
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def store_loops(root: str) -> list[loop.LoopInfo]:
    r = os.path.abspath(root) + os.sep
    return [li for li in loop.list_loops() if li.backing_file.removesuffix(" (deleted)").startswith(r)]


def check(root: str, case: Case, backend: str, dm_names: Callable[[str], list[str]]) -> dict[str, object]:
    """Recover and assert the invariants. Returns the recovery report."""
    s = Store(root)
    peer: Store | None = None
    rep = s.recover()  # a second pass must find nothing left to do
    assert rep.actions == 0, f"second recovery still acted: {rep}"
    assert s.registry.intents() == [], "intents left after recovery"
    check_links(s)  # before the checks below restore and checkpoint x (which remakes its link)
    vols = {v.id: v for v in s.volumes()}
    if backend in ("dm-snapshot", "dm-thin"):  # no device left suspended (a kill inside a copy's hold)
        from cowdisk.kernel import dm
        held = [v.id for v in vols.values() if v.state == ATTACHED and dm.control().info(s.dm_prefix + v.id).suspended]
        assert held == [], f"devices left suspended after recovery: {held}"
    # the operation happened fully or not at all
    want = expected(case.operation)
    assert {k: v.state for k, v in vols.items()} == want, (vols, want)
    assert [t.names for t in s.templates()] == [("base",)], s.templates()
    # every volume that existed before still has its data
    by = vols["bystander"]
    assert by.state == "attached" and read_at(by.link, 3 * MiB, 4096) == BYSTANDER
    if "x" in vols:
        if vols["x"].state == CHECKPOINTED:
            s.restore("x")
        assert read_at(s.volume("x").link, 4 * MiB, 4096) == SUBJECT
        if want["x"] == CHECKPOINTED:
            s.checkpoint("x")
    vols = {v.id: v for v in s.volumes()}
    attached = [v for v in vols.values() if v.state == "attached"]
    # no leaked kernel object or file
    if backend == "dm-snapshot":
        assert sorted(dm_names(s.dm_prefix)) == sorted(s.dm_prefix + v.id for v in attached)
        loops = store_loops(root)
        cow_loops = [li for li in loops if "/volumes/" in li.backing_file]
        tpl_loops = [li for li in loops if "/templates/" in li.backing_file]
        assert len(cow_loops) == len(attached), loops
        assert len(tpl_loops) == (1 if attached else 0), loops
    else:
        assert store_loops(root) == []
    if backend == "rbd":  # images in the cluster: the template's and one per volume; a mapping per attached one
        from testutil import rbd_images
        opts = dict(json.loads(s.registry.meta("backend_options") or "{}"))
        tids = {s.template(v.template_id).id for v in vols.values()}
        peer = Store(peer_root(root)) if os.path.exists(peer_root(root)) else None
        others = {v.id for v in peer.volumes()} if peer else set()
        assert rbd_images(opts) == sorted([f"cowdisk-v-{v}" for v in set(vols) | others]
                                          + [f"cowdisk-t-{t}" for t in tids])
        with open("/proc/self/mounts") as f:
            fuse = [ln.split()[1] for ln in f if ln.startswith("/dev/fuse") and ln.split()[1].startswith(root)]
        assert sorted(fuse) == sorted(v.device for v in attached), fuse
    vdir = os.path.join(s.data_root, "volumes")
    assert sorted(os.listdir(vdir)) == sorted(vols), os.listdir(vdir)
    ldir = os.path.join(s.root, "links")
    assert set(os.listdir(ldir)) <= set(vols), os.listdir(ldir)
    for v in attached:
        assert os.path.realpath(v.link) == os.path.realpath(v.device)
    tdir = os.path.join(s.data_root, "templates")
    assert not [n for n in os.listdir(tdir) if n.startswith(".staging")], os.listdir(tdir)
    s.destroy()
    s.close()
    if peer is not None:  # after s: an adopted x is s's to delete, else the peer's
        peer.destroy()
        peer.close()
    return rep.as_dict()


def check_links(s: Store) -> None:
    """Every link file has its row (same target) and names an attached volume's device, and
    every row has its file: a retargeted source link included."""
    devices = {os.path.realpath(v.device or "") for v in s.volumes() if v.state == ATTACHED}
    rows = {p: (o, t) for p, o, t in s.registry.links()}
    ldir = os.path.join(s.root, "links")
    files = {}
    for name in os.listdir(ldir):
        for entry in os.listdir(os.path.join(ldir, name)):
            p = os.path.join(ldir, name, entry)
            files[p] = os.readlink(p)
            assert os.path.realpath(p) in devices, f"{p} -> {files[p]}: not the device of an attached volume"
    assert files == {p: t for p, (_, t) in rows.items()}, f"link files {files}, the registry's rows {rows}"


def run_case(root: str, backend: str, tree: str, case: Case, dm_names: Callable[[str], list[str]],
             options: dict[str, str] | None = None) -> dict[str, object]:
    setup(root, backend, tree, case, options)
    status = crash(root, case)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
        f"{case}: the child was not killed at the crash point (status {status}): the step was never reached")
    return check(root, case, backend, dm_names)
