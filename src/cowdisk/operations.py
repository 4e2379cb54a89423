"""The operations on a volume or template, declared once (see :mod:`cowdisk.store.transition`,
which runs them), and the table of allowed volume state changes derived from them.

It sits below both the registry (whose ``set_state`` refuses a change not in
:data:`TRANSITIONS`) and the store (which runs the operations): pure declarations, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping, Protocol

from .errors import StateError
from .model import VolumeState


class Stated(Protocol):
    """What :meth:`Operation.require` reads of a volume (a registry row, a model volume)."""

    @property
    def id(self) -> str: ...

    @property
    def state(self) -> VolumeState: ...


CREATING = VolumeState.CREATING
ATTACHED = VolumeState.ATTACHED
CHECKPOINTING = VolumeState.CHECKPOINTING
CHECKPOINTED = VolumeState.CHECKPOINTED
RESTORING = VolumeState.RESTORING
REMOVING = VolumeState.REMOVING
ERROR = VolumeState.ERROR


@dataclass(frozen=True)
class Step:
    name: str
    backend: str | None = None
    """The backend method this step calls: its declared steps are crash points too."""
    points: tuple[str, ...] = ()
    """The store's own crash points inside this step, in order (``failpoints.hit(op, point)``
    where the step's code passes them): a kill there leaves the step half done."""


@dataclass(frozen=True)
class Operation:
    name: str
    starts_from: frozenset[VolumeState] | None
    """States the subject may be in; None: the operation makes a new volume."""
    trying: VolumeState | None
    """Committed with the intent (CREATING for a new row); None: the state does not change."""
    done: VolumeState | None
    """Committed with the end of the intent; None: the row is deleted (or, without a
    trying state, left as it is)."""
    after_crash: Literal["undo", "finish"]
    steps: tuple[Step, ...] = field(default=())
    source_from: frozenset[VolumeState] | None = None
    """For an operation that makes a volume from another: the states that source may be in."""
    subject: Literal["volume", "template"] = "volume"
    """What the intent names: a volume id, or a template id (no volume state changes)."""
    batch: bool = False
    """Runs on several new volumes at once (:class:`~cowdisk.store.transition.Batch`): one intent each, committed
    together, and their done states committed together."""
    back_to: frozenset[VolumeState] = frozenset()
    """States the trying state may go back to: reverted (a step found it cannot go on: a
    device still open) or rolled back by its undo."""

    @property
    def makes_volume(self) -> bool:
        return self.subject == "volume" and self.starts_from is None

    @property
    def verb(self) -> str:
        """What users call it ("restore" for restore-as)."""
        return self.name.split("-")[0]

    def require(self, v: Stated, hint: str = "") -> None:
        """Refuse (StateError) a subject, or for an operation that makes a volume its source,
        that is not in a state the operation starts from."""
        allowed = self.source_from if self.makes_volume else self.starts_from
        if allowed is not None and v.state not in allowed:
            want = " or ".join(s.value for s in VolumeState if s in allowed)
            raise StateError(f"{self.verb} volume {v.id}: it is {v.state}, not {want}", op=self.verb, obj=v.id,
                             hint=hint)


CREATE = Operation("create", None, CREATING, ATTACHED, "undo",
                   (Step("volume", "create"), Step("link")))
REMOVE = Operation("remove", frozenset(VolumeState), REMOVING, None, "finish",
                   (Step("detach"), Step("links"), Step("source-links"), Step("data")),
                   back_to=frozenset({ATTACHED}))
"""Takes a volume from any state (a stale trying state included: its operation is over, the
volume lock says so); reverted to ``attached`` when the device was still open."""
CHECKPOINT = Operation("checkpoint", frozenset({ATTACHED}), CHECKPOINTING, CHECKPOINTED, "finish",
                       (Step("detach"), Step("links"), Step("source-links")), back_to=frozenset({ATTACHED}))
"""``links``: the volume's own link; ``source-links``: a restore-as source's link retargeted
to this volume, settled under that source's lock (:meth:`StoreParts.settle_source_links`,
which recovery runs too)."""
RESTORE = Operation("restore", frozenset({CHECKPOINTED}), RESTORING, ATTACHED, "undo",
                    (Step("device", "attach"), Step("link")), back_to=frozenset({CHECKPOINTED}))
RESTORE_AS = Operation("restore-as", None, CREATING, ATTACHED, "undo",
                       (Step("copy", "copy_data"), Step("device", "attach"), Step("link"),
                        Step("retarget", points=("retarget-row",))),
                       source_from=frozenset({CHECKPOINTED}))
"""``retarget``: the source's link pointed at the copy (optional); ``retarget-row``: its row
committed, the file not yet renamed over the link, which may still point at an earlier copy
(the undo gives that link back to it: :meth:`StoreParts.settle_link`)."""
FORK = Operation("fork", None, CREATING, ATTACHED, "undo",
                 (Step("copy", "copy_data"), Step("copies"), Step("device", "attach"), Step("identity"),
                  Step("link")),
                 source_from=frozenset({ATTACHED, CHECKPOINTED}), batch=True)
"""Fork into N at one instant, run as one :class:`~cowdisk.store.transition.Batch`: every child's intent and row in
one transaction; ``copy`` takes the first child from the source (the source held once:
suspended, or its file cloned under the inode's lock), ``copies`` makes the others as
copies of that same instant (``copy_data(like=first)``: from the first child, which no
one can write yet, or rbd's one snapshot), the source not held again;
``device`` attaches each, ``identity`` (optional: ``reset_identity``) gives each its own
machine id, host keys and hostname on its disk (store/identity.py), ``link`` makes each
child's stable link; every done state in one transaction."""
FLATTEN = Operation("flatten", frozenset({ATTACHED, CHECKPOINTED}), None, None, "undo",
                    (Step("data", "flatten"), Step("register")))
ADOPT = Operation("adopt", None, CREATING, CHECKPOINTED, "undo", (Step("claim", "claim"),))
"""Register a checkpointed volume another store made in a shared place (rbd's pool): its
row is born ``creating``, the backend records this store as the volume's owner, and the
row is committed ``checkpointed``. Undo gives the volume back to its previous owner (the
intent's ``owner``) and forgets the row; the volume's data is never touched."""
TAKE_OVER = Operation("take-over", frozenset({CHECKPOINTED}), None, None, "finish",
                      (Step("fence", "take_over"),))
"""Fence the store that holds a shared volume (``restore --steal``): its clients are cut
off and its hold cleared. Cannot be rolled back (a fence is for good): a killed one is
finished by recovery, which fences again."""
IMPORT = Operation("import", None, None, None, "undo", (Step("publish"),), subject="template")
TEMPLATE_REMOVE = Operation("template-remove", None, None, None, "finish", (Step("file"),), subject="template")
"""Remove a template no volume uses: its file, then its row with the end of the intent; a
kill in between is finished by recovery (no row left whose file is gone)."""
"""Publish a template's file (templates/<id>/disk.img, immutable) and register it: the row is
committed with the end of the intent, so a kill leaves either both or an intent whose undo
removes the file."""

OPERATIONS: Mapping[str, Operation] = {o.name: o for o in
                                       (CREATE, REMOVE, CHECKPOINT, RESTORE, RESTORE_AS, FORK, FLATTEN, ADOPT,
                                        TAKE_OVER, IMPORT, TEMPLATE_REMOVE)}
"""Every operation by name: the intents' ``op`` column and recovery's handler table key."""


REATTACH: frozenset[tuple[VolumeState, VolumeState]] = frozenset({
    (ATTACHED, ATTACHED),  # recovery re-attached it after a reboot (new device path)
    (ATTACHED, ERROR),  # recovery could not attach it again
})
"""Recovery's own changes of an attached volume after a reboot (no operation, no intent)."""


def transitions(ops: Iterable[Operation], extra: Iterable[tuple[VolumeState, VolumeState]] = ()
                ) -> frozenset[tuple[VolumeState, VolumeState]]:
    """Every change of a volume's state that ``ops`` make: into the trying state from each
    state an operation starts from, trying to done, trying back to each ``back_to`` state;
    a new row is born in its trying state (not a change) and deleted when done is None."""
    out = set(extra)
    for o in ops:
        if o.subject != "volume" or o.trying is None:
            continue
        if not o.makes_volume:
            out |= {(s, o.trying) for s in o.starts_from or () if s != o.trying}
        if o.done is not None:
            out.add((o.trying, o.done))
        out |= {(o.trying, s) for s in o.back_to}
    return frozenset(out)


TRANSITIONS: frozenset[tuple[VolumeState, VolumeState]] = transitions(OPERATIONS.values(), REATTACH)
"""Every allowed change of a volume's state; :meth:`Registry.set_state` refuses the rest.
A row is born ``creating`` and deleted from ``creating`` (rolled back) or ``removing``."""
