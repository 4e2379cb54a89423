"""The crash-point matrix: SIGKILL an operation right after each of its steps, recover, check.

For every (operation, step) a forked child opens the store without recovery, sets
``COWDISK_CRASH_AT=<op>:<step>`` and runs the operation; the failpoint kills it with
SIGKILL exactly there. The parent then opens the store (recovery runs on open) and
checks the invariants:

* no leaked kernel object or file: the dm devices, loops and files of the store are
  exactly what the registry's volumes need (one dm device and one COW loop per
  attached dm volume, one template loop per template in use, a data dir per volume,
  a link dir per volume with a link);
* every volume that existed before the operation still has its data;
* the operation either fully happened or not at all (create, restore and flatten roll
  back; remove and checkpoint roll forward);
* no intent is left.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Callable

from conformance import read_at, write_at
from cowdisk.kernel import loop
from cowdisk.store import Store

MiB = 1 << 20
BYSTANDER = b"bystander-data".ljust(4096, b".")
SUBJECT = b"subject-data".ljust(4096, b"#")


@dataclass(frozen=True)
class Case:
    op: str
    step: str


# (op, step) pairs; steps named by the failpoints in store.py and the backends
COMMON = [
    Case("remove", "intent"),
    Case("remove", "teardown"),
    Case("checkpoint", "detach"),
    Case("restore", "attach"),
    Case("restore", "link"),
    Case("restore-new", "copy"),
    Case("restore-new", "attach"),
    Case("restore-new", "link"),
    Case("flatten", "data"),
    Case("flatten", "register"),
    Case("create", "link"),
]
DM_ONLY = [
    Case("create", "cow_file"),
    Case("create", "template_loop"),
    Case("create", "cow_loop"),
    Case("create", "dm"),
    Case("restore", "template_loop"),
    Case("restore", "cow_loop"),
    Case("restore", "dm"),
]
FILE_ONLY = [Case("create", "data")]


def cases(backend: str) -> list[Case]:
    return COMMON + (DM_ONLY if backend == "dm-snapshot" else FILE_ONLY)


def setup(root: str, backend: str, tree: str, case: Case) -> None:
    """A store with a template, an attached bystander and the subject volume ``x`` as the op needs it."""
    from conformance import make_tree

    s = Store(root, backend=backend)
    s.build_template(make_tree(tree), "base")
    by = s.create_volume("bystander", "base")
    write_at(by.link, 3 * MiB, BYSTANDER)
    if case.op != "create":
        x = s.create_volume("x", "base")
        write_at(x.link, 4 * MiB, SUBJECT)
        if case.op in ("restore", "restore-new"):
            s.checkpoint("x")
    s.close()


def run_op(root: str, case: Case) -> None:
    s = Store(root, recover=False)
    op = {
        "create": lambda: s.create_volume("x", "base"),
        "remove": lambda: s.remove_volume("x"),
        "checkpoint": lambda: s.checkpoint("x"),
        "restore": lambda: s.restore("x"),
        "restore-new": lambda: s.restore("x", "y"),
        "flatten": lambda: s.flatten("x", "flat"),
    }[case.op]
    op()


def crash(root: str, case: Case) -> int:
    """Run the op in a forked child that the failpoint kills; return its wait status."""
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.environ["COWDISK_CRASH_AT"] = f"{case.op.split('-')[0]}:{case.step}"
            run_op(root, case)
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
    rep = s.recover()  # a second pass must find nothing left to do
    assert rep.actions == 0, f"second recovery still acted: {rep}"
    assert s.registry.intents() == [], "intents left after recovery"
    vols = {v.id: v for v in s.volumes()}
    # the operation happened fully or not at all
    if case.op == "create":
        assert set(vols) == {"bystander"}, vols
    elif case.op == "remove":
        assert set(vols) == {"bystander"}, vols
    elif case.op in ("checkpoint", "restore"):
        assert set(vols) == {"bystander", "x"} and vols["x"].state == "checkpointed", vols
    elif case.op == "restore-new":
        assert set(vols) == {"bystander", "x"} and vols["x"].state == "checkpointed", vols
    elif case.op == "flatten":
        assert set(vols) == {"bystander", "x"} and vols["x"].state == "attached", vols
        assert [t.names for t in s.templates()] == [("base",)], s.templates()
    # every volume that existed before still has its data
    by = vols["bystander"]
    assert by.state == "attached" and read_at(by.link, 3 * MiB, 4096) == BYSTANDER
    if "x" in vols and case.op != "create":
        if vols["x"].state == "checkpointed":
            s.restore("x")
        assert read_at(s.volume("x").link, 4 * MiB, 4096) == SUBJECT
        if case.op != "flatten":
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
    vdir = os.path.join(s.data_root, "volumes")
    assert sorted(os.listdir(vdir)) == sorted(vols), os.listdir(vdir)
    ldir = os.path.join(s.root, "links")
    assert set(os.listdir(ldir)) <= set(vols), os.listdir(ldir)
    for v in attached:
        assert os.path.realpath(v.link) == os.path.realpath(v.device)
    tdir = os.path.join(s.data_root, "templates")
    assert not [n for n in os.listdir(tdir) if n.startswith(".staging")], os.listdir(tdir)
    assert os.listdir(os.path.join(s.root, "staging")) == []
    s.destroy()
    s.close()
    return rep.as_dict()


def run_case(root: str, backend: str, tree: str, case: Case, dm_names: Callable[[str], list[str]]) -> dict[str, object]:
    setup(root, backend, tree, case)
    status = crash(root, case)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
        f"{case}: the child was not killed at the crash point (status {status}): the step was never reached")
    return check(root, case, backend, dm_names)
