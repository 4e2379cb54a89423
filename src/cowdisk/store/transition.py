"""One mechanism for every state change of a volume (containerd devmapper's
``transition(trying, success, fn)``, vdsm's intent-then-compensation).

An :class:`~cowdisk.operations.Operation` (declared in ``cowdisk/operations.py``, below the
registry, which derives its allowed state changes from them) declares, once, everything the
store and its tests need to know about a state change: the state its subject starts in,
the *trying* state committed together with the intent before anything is touched, the named steps it runs in order
(and which backend method each calls, whose own steps count too), the *done* state
committed together with the end of the intent, and what recovery does with an intent
whose process died: ``undo`` (roll back) or ``finish`` (roll forward).

:class:`Transition` runs one operation on one volume::

    with Transition(registry, CREATE, vid, row=row) as t:   # intent + row, one transaction
        dev = t.step("volume", backend.create, ctx)          # crash points: backend steps, then "volume"
        t.step("link", set_link, vid, dev)
        t.finish(device=dev)                                 # done state + end of intent, one transaction

On an exception inside the block an ``undo`` operation runs its recovery handler at
once (the same code recovery runs after a crash); a ``finish`` operation leaves its
intent for recovery, unless a step reverted it explicitly (:meth:`Transition.revert`).
The crash matrix kills the process at every point :func:`crash_points` lists, so a new
operation is crash-tested by declaring it here.
"""

from __future__ import annotations

import contextlib
import logging
from types import TracebackType
from typing import Any, Callable, Mapping, Sequence, TypeVar

from .. import failpoints
from ..operations import (
    ADOPT as ADOPT,
    CHECKPOINT as CHECKPOINT,
    CREATE as CREATE,
    FLATTEN as FLATTEN,
    FORK as FORK,
    IMPORT as IMPORT,
    OPERATIONS as OPERATIONS,
    REMOVE as REMOVE,
    RESTORE as RESTORE,
    RESTORE_AS as RESTORE_AS,
    TAKE_OVER as TAKE_OVER,
    TEMPLATE_REMOVE as TEMPLATE_REMOVE,
    Operation as Operation,
    Step as Step,
)
from ..registry import Registry, VolumeRow, VolumeState

log = logging.getLogger(__name__)

T = TypeVar("T")

INTENT = "intent"
"""The crash point right after an operation's intent (and trying state) is committed."""


def crash_points(op: Operation, backend_steps: Mapping[str, tuple[str, ...]]) -> list[str]:
    """Every point at which ``op`` can be killed, in order: right after its intent, after
    each step a backend method it calls declares, at each point inside a step the store
    declares, and after each of its own steps."""
    out = [INTENT]
    for s in op.steps:
        if s.backend:
            out += [n for n in backend_steps.get(s.backend, ()) if n not in out]
        out += [n for n in s.points if n not in out]
        out.append(s.name)
    return out


Undo = Callable[["Transition", BaseException], None]


class Transition:
    """One run of ``op`` on volume ``vid`` (see the module docstring).

    ``row`` is the new volume's row for operations that make one; ``undo`` is the
    recovery handler an ``undo`` operation runs on an exception inside the block."""

    def __init__(self, registry: Registry, op: Operation, vid: str, *, row: VolumeRow | None = None,
                 data: dict[str, Any] | None = None, undo: Undo | None = None,
                 on_change: Callable[[str], None] | None = None, begin: Callable[[], None] | None = None) -> None:
        if op.makes_volume != (row is not None):
            raise TypeError(f"{op.name}: a new row is {'required' if op.makes_volume else 'not expected'}")
        self.registry = registry
        self.op = op
        self.vid = vid
        self.row = row
        self.data = dict(data or {})
        self.undo = undo
        self.on_change = on_change
        """Called with the subject's id once its done (or reverted) state is committed (the
        volume's manifest: it records done states only, so a registry lost in the middle of
        an operation is rebuilt at the operation's last done state)."""
        self.begin = begin
        """Adds its own writes to the intent's transaction (records known ahead)."""
        self.intent = 0
        self.before: VolumeState | None = None
        self._next = 0
        self._ended = False
        self._deferring = contextlib.ExitStack()

    def __enter__(self) -> "Transition":
        with self.registry.tx():
            if self.op.subject == "template":
                self.intent = self.registry.begin_intent(self.op.name, template_id=self.vid, data=self.data)
            else:
                self.intent = self.registry.begin_intent(self.op.name, volume_id=self.vid, data=self.data)
            if self.row is not None:
                self.registry.add_volume(self.row)
            elif self.op.trying is not None:
                self.before = self.registry.set_state(self.vid, self.op.trying)
            if self.begin is not None:
                self.begin()
        log.debug("%s %s: intent %d", self.op.name, self.vid, self.intent)
        self._opened()
        return self

    def _opened(self) -> None:
        """After the intent is committed: records of objects and links the steps remove are
        written with the done state (or the undo's commit), not each in its own transaction
        (the intent explains them); then the intent's crash point."""
        self._deferring.enter_context(self.registry.deferring())
        try:
            failpoints.hit(self.op.name, INTENT)
        except BaseException:
            self._deferring.close()
            raise

    def step(self, name: str, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run the declared step ``name`` (steps run in their declared order; an optional
        one may be left out), then pass its crash point."""
        names = [s.name for s in self.op.steps]
        try:
            i = names.index(name, self._next)
        except ValueError:
            raise TypeError(f"{self.op.name}: step {name!r} is not declared after "
                            f"{names[self._next - 1] if self._next else INTENT!r}") from None
        self._next = i + 1
        out = fn(*args, **kw)
        log.debug("%s %s: %s done", self.op.name, self.vid, name)
        failpoints.hit(self.op.name, name)
        return out

    def note(self, **data: Any) -> None:
        """Add facts to the intent that recovery will need (a staging path, a new template id)."""
        self.data.update(data)
        self.registry.update_intent(self.intent, self.data)

    def finish(self, commit: Callable[[], None] | None = None, **fields: Any) -> None:
        """Commit the done state (with ``fields``: device, error) and end the intent at once;
        ``commit`` adds its own writes to that one transaction (a template's row).

        The commit is durable (fsync) only for an operation recovery would undo: if a power
        loss took that commit, recovery would roll back an operation the caller was told is
        done (and a volume a guest already wrote to). An operation recovery finishes
        (remove, checkpoint, template remove) commits without an fsync: after a power loss
        the intent, durable since the start, is still there and recovery finishes it to the
        same done state; the next durable commit of any operation makes this one durable."""
        with self.registry.tx(durable=self.op.after_crash == "undo"):
            if commit is not None:
                commit()
            if self.op.done is not None:
                self.registry.set_state(self.vid, self.op.done, **fields)
            elif self.op.trying is not None:  # the operation deletes its subject
                self.registry.delete_volume(self.vid)
            self.registry.end_intent(self.intent)
        self._ended = True
        if self.op.done is None and self.op.trying is not None:
            return  # the subject's row is gone (its manifest went with its directory)
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None and (self.row is not None or self.op.trying is not None
                                           or self.op.done is not None):
            self.on_change(self.vid)

    def revert(self, **fields: Any) -> None:
        """Put the subject back in the state it started from and end the intent (a step found
        it cannot go on, and nothing was changed yet: a device still open)."""
        with self.registry.tx():
            if self.before is not None:
                self.registry.set_state(self.vid, self.before, **fields)
            self.registry.end_intent(self.intent)
        self._ended = True
        self._changed()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self._exit(e)
        finally:
            self._deferring.__exit__(t, e, tb)  # writes what is still deferred; an error stays the error

    def _exit(self, e: BaseException | None) -> None:
        if self._ended:
            return
        if e is None:
            raise TypeError(f"{self.op.name} {self.vid}: the block ended without finish()")
        if self.op.after_crash != "undo" or self.undo is None:
            return  # the intent stays: recovery finishes the operation
        try:
            self.undo(self, e)
            self._ended = True
        except Exception as e2:  # keep the intent: recovery retries
            e.add_note(f"undo of {self.op.name} {self.vid} failed too: {e2}; `cowdisk recover` retries it")
            log.warning("%s %s: undo failed: %s", self.op.name, self.vid, e2)


class Batch(Transition):
    """One run of a batch operation (fork into N) making the volumes ``rows`` at once.

    The intents (one per new volume, each naming its volume, all with the same data) and
    the new rows are committed in one transaction; each step runs for every member and
    passes its crash point once, after the last; :meth:`finish` commits every done state
    and ends every intent in one transaction. A kill anywhere leaves every member either
    whole (after that commit) or undone by recovery, intent by intent. On an exception
    inside the block ``undo(row, intent, data)`` runs for each member, last first; a
    member whose undo fails keeps its intent for recovery and the others go on."""

    def __init__(self, registry: Registry, op: Operation, rows: Sequence[VolumeRow], *,
                 data: dict[str, Any] | None = None,
                 undo: Callable[[VolumeRow, int, Mapping[str, Any]], None] | None = None,
                 on_change: Callable[[str], None] | None = None, begin: Callable[[], None] | None = None) -> None:
        if not op.batch or not rows:
            raise TypeError(f"{op.name}: a batch needs a batch operation and at least one new row")
        super().__init__(registry, op, rows[0].id, row=rows[0], data=data, on_change=on_change, begin=begin)
        self.rows = list(rows)
        self.intents: list[int] = []
        self.undo_one = undo

    def __enter__(self) -> "Batch":
        with self.registry.tx():
            for r in self.rows:
                self.intents.append(self.registry.begin_intent(self.op.name, volume_id=r.id, data=self.data))
                self.registry.add_volume(r)
            if self.begin is not None:  # its own writes and checks, in the same transaction
                self.begin()
        self.intent = self.intents[0]
        log.debug("%s %s: intents %s", self.op.name, ",".join(r.id for r in self.rows), self.intents)
        self._opened()
        return self

    def note(self, **data: Any) -> None:
        self.data.update(data)
        for i in self.intents:
            self.registry.update_intent(i, self.data)

    def finish(self, commit: Callable[[], None] | None = None, *,  # type: ignore[override]
               fields: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Commit every member's done state (with its ``fields[id]``) and end every intent in
        one durable transaction (recovery would undo a member otherwise: see
        :meth:`Transition.finish`)."""
        assert self.op.done is not None
        with self.registry.tx(durable=True):
            if commit is not None:
                commit()
            for r, i in zip(self.rows, self.intents):
                self.registry.set_state(r.id, self.op.done, **dict((fields or {}).get(r.id, {})))
                self.registry.end_intent(i)
        self._ended = True
        if self.on_change is not None:
            for r in self.rows:
                self.on_change(r.id)

    def revert(self, **fields: Any) -> None:
        raise TypeError(f"{self.op.name}: a batch makes new volumes; it is undone, never reverted")

    def _exit(self, e: BaseException | None) -> None:
        if self._ended:
            return
        if e is None:
            raise TypeError(f"{self.op.name} {self.vid}: the block ended without finish()")
        if self.undo_one is None:
            return
        for r, i in reversed(list(zip(self.rows, self.intents))):
            try:
                self.undo_one(r, i, self.data)
            except Exception as e2:  # keep its intent: recovery retries
                e.add_note(f"undo of {self.op.name} {r.id} failed too: {e2}; `cowdisk recover` retries it")
                log.warning("%s %s: undo failed: %s", self.op.name, r.id, e2)
        self._ended = True


def legacy_op(op: str, data: Mapping[str, Any]) -> str:
    """The operation an intent written by an older cowdisk stands for."""
    if op == "restore" and not data.get("in_place"):
        return RESTORE_AS.name
    if op == "create" and data.get("fork_of"):
        return FORK.name
    return op

