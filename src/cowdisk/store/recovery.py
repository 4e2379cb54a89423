"""Recovery: reconcile the registry, the kernel and the files after a crash or a restart.

Two parts:

* **Intents of dead processes** go through :data:`HANDLERS`, a table from operation
  name to the handler that undoes or finishes it (the operation's ``after_crash``).
  The same handler is what an operation runs in-process when a step fails, so the
  code path a crash takes is the one every failure test already exercises.
* **Reconciliation** of what no intent explains: kernel objects of this store that no
  volume accounts for are released, attached volumes whose device is gone (a reboot)
  are attached again, files and links of volumes that do not exist are removed, and
  staging debris of dead processes goes. Anything a live process may be working on
  (its volume lock is held, or its intent's process runs) is left alone, and a
  failure on one item is reported and never stops the others.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from typing import Any, Callable, Iterator, Mapping

from ..backends import VolumeCtx
from ..errors import CowdiskError
from ..kernel import fs
from ..kernel.procfs import process_alive
from ..locks import FileLock
from ..registry import ATTACHED, CHECKPOINTED, CREATING, ERROR, Intent, VolumeRow
from .model import RecoveryReport
from .parts import StoreParts
from .templates import STAGING_PREFIX, staging_owner_alive
from .transition import (
    CHECKPOINT,
    CREATE,
    FLATTEN,
    FORK,
    OPERATIONS,
    REMOVE,
    RESTORE,
    RESTORE_AS,
    Transition,
    legacy_op,
)


log = logging.getLogger(__name__)

Handler = Callable[[StoreParts, int, Mapping[str, Any], "VolumeRow | None", "VolumeCtx | None"], None]
"""(store, intent id, intent data, the volume's row or None, its context). Runs with the
volume's lock held and ends the intent in the transaction that records the outcome.
Whether that outcome is a roll-back or a roll-forward is the operation's ``after_crash``."""

Undo = Callable[[Transition, BaseException], None]


def _forget(store: StoreParts, intent: int, data: Mapping[str, Any], v: VolumeRow | None,
            ctx: VolumeCtx | None) -> None:
    """Tear down whatever of the volume exists and forget it: undoes create, restore-as and
    fork, finishes remove."""
    if v is not None and ctx is not None:
        store.teardown(v, ctx)
    with store.registry.tx():
        if v is not None:
            store.registry.delete_volume(v.id)
        store.registry.end_intent(intent)


def _detached(store: StoreParts, intent: int, data: Mapping[str, Any], v: VolumeRow | None,
              ctx: VolumeCtx | None) -> None:
    """Release the device, keep the data, record the volume checkpointed: finishes
    checkpoint, undoes restore."""
    if v is not None and ctx is not None:
        store.teardown(v, ctx, keep_data=True)
    with store.registry.tx():
        cur = store.registry.find_volume(v.id) if v is not None else None
        if cur is not None and cur.state != CHECKPOINTED:
            store.registry.set_state(cur.id, CHECKPOINTED, device=None)
        store.registry.end_intent(intent)


def _drop_flat(store: StoreParts, intent: int, data: Mapping[str, Any], v: VolumeRow | None,
               ctx: VolumeCtx | None) -> None:
    """Undo flatten: drop the staging directory, and the template if this flatten registered it."""
    shutil.rmtree(data.get("staging", ""), ignore_errors=True)
    tid = data.get("template_id")
    if tid and not data.get("existed") and store.registry.find_template(tid) is not None:
        store.remove_template(tid)
    store.registry.end_intent(intent)


HANDLERS: Mapping[str, Handler] = {
    CREATE.name: _forget,
    RESTORE_AS.name: _forget,
    FORK.name: _forget,
    REMOVE.name: _forget,
    CHECKPOINT.name: _detached,
    RESTORE.name: _detached,
    FLATTEN.name: _drop_flat,
}
assert set(HANDLERS) == set(OPERATIONS), "every operation needs its recovery handler"


def recover_intent(store: StoreParts, it: Intent, rep: RecoveryReport) -> None:
    """Undo or finish the operation of one intent whose process is gone."""
    op = legacy_op(it.op, it.data)
    handler = HANDLERS.get(op)
    label = f"{it.op} {it.volume_id}"
    if handler is None:  # an operation this cowdisk does not know: never guess
        rep.errors.append(f"{label}: unknown operation {it.op!r} (intent {it.id} kept)")
        return
    with store.lock("volume", it.volume_id) if it.volume_id else contextlib.nullcontext():
        v = store.registry.find_volume(it.volume_id) if it.volume_id else None
        ctx = store.ctx(v, op="recover") if v is not None else None
        handler(store, it.id, it.data, v, ctx)
    (rep.rolled_back if OPERATIONS[op].after_crash == "undo" else rep.finished).append(label)


def recover(store: StoreParts) -> RecoveryReport:
    """Reconcile registry, kernel and files (see the module docstring)."""
    rep = RecoveryReport()
    for it in store.registry.intents():
        if process_alive(it.pid, it.pid_start):
            continue
        try:
            recover_intent(store, it, rep)
        except CowdiskError as e:
            rep.errors.append(f"{it.op} {it.volume_id}: {e}")
    _release_orphan_objects(store, rep)
    _reactivate(store, rep)
    _remove_orphan_files(store, rep)
    _remove_staging_debris(store, rep)
    _protect_templates(store, rep)
    for what, items in rep.as_dict().items():
        for item in items:
            (log.warning if what == "errors" else log.info)("recover: %s %s", what.replace("_", " "), item)
    return rep


@contextlib.contextmanager
def _idle_volume(store: StoreParts, vid: str) -> Iterator[bool]:
    """Hold volume ``vid``'s lock if nobody else does; yield False (and hold nothing) when
    another process or thread is working on that volume: recovery then leaves it alone."""
    lk = FileLock(os.path.join(store.root, "locks", f"volume-{vid}.lock"), timeout=0, what=f"volume {vid}")
    try:
        lk.acquire()
    except CowdiskError:
        yield False
        return
    try:
        yield True
    finally:
        lk.release()


def _orphan_now(store: StoreParts, vid: str, *, files: bool = False) -> bool:
    """Looked up again (under the volume's lock): nothing of ``vid`` is in use.
    Kernel objects are orphans unless the volume is attached or being created; files
    and links are orphans only when no volume ``vid`` exists at all."""
    if vid in store.registry.live_intent_volumes():
        return False
    v = store.registry.find_volume(vid)
    if files:
        return v is None
    return v is None or v.state not in (ATTACHED, CREATING)


def _release_orphan_objects(store: StoreParts, rep: RecoveryReport) -> None:
    """Kernel objects of this store that no volume accounts for."""
    live = store.registry.live_intent_volumes()
    known = {v.id: v for v in store.registry.volumes()}
    for obj in list(store.backend.scan()):
        vid = obj.volume_id
        if vid in live:
            continue
        v = known.get(vid) if vid else None
        if v is not None and v.state in (ATTACHED, CREATING):
            continue
        if obj.kind == "loop" and vid is None:
            continue  # a template loop: kept alive only by the dm tables that use it
        # another process or thread may be creating this volume right now: look again
        # under its lock (and leave it alone if someone holds that lock)
        with _idle_volume(store, vid) if vid else contextlib.nullcontext(True) as idle:
            if not idle or (vid and not _orphan_now(store, vid)):
                continue
            try:
                store.backend.release(obj)
                rep.orphans_removed.append(f"{obj.kind} {obj.name}")
            except CowdiskError as e:
                rep.errors.append(f"release {obj.kind} {obj.name}: {e}")


def _reactivate(store: StoreParts, rep: RecoveryReport) -> None:
    """Attached volumes whose device is gone (host reboot): attach them again."""
    live = store.registry.live_intent_volumes()
    for v in store.registry.volumes():
        if v.state != ATTACHED or v.id in live:
            continue
        with _idle_volume(store, v.id) as idle:
            # under the lock, fresh: a concurrent remove may have taken it away meanwhile
            cur = store.registry.find_volume(v.id) if idle else None
            if cur is None or cur.state != ATTACHED or v.id in store.registry.live_intent_volumes():
                continue
            ctx = store.ctx(cur, op="recover")
            if store.backend.is_attached(ctx):
                rep.kept.append(v.id)
                continue
            try:
                dev = store.backend.attach(ctx)
                store.set_link(v.id, store.link_path(v.id), dev)
                store.registry.set_state(v.id, ATTACHED, device=dev)
                rep.reactivated.append(v.id)
            except (CowdiskError, OSError) as e:
                store.registry.set_state(v.id, ERROR, error=str(e))
                rep.errors.append(f"reactivate {v.id}: {e}")


def _remove_orphan_files(store: StoreParts, rep: RecoveryReport) -> None:
    """Files and links of volumes that do not exist."""
    live = store.registry.live_intent_volumes()
    known = {v.id for v in store.registry.volumes()}
    for base in (os.path.join(store.data_root, "volumes"), os.path.join(store.root, "links")):
        for name in os.listdir(base):
            if name in known or name in live:
                continue
            with _idle_volume(store, name) as idle:  # not a volume being created right now
                if not idle or not _orphan_now(store, name, files=True):
                    continue
                shutil.rmtree(os.path.join(base, name), ignore_errors=True)
                rep.orphans_removed.append(os.path.join(base, name))


def _remove_staging_debris(store: StoreParts, rep: RecoveryReport) -> None:
    """Staging directories of imports and flattens whose process is gone."""
    base = os.path.join(store.data_root, "templates")
    for name in os.listdir(base):
        if name.startswith(STAGING_PREFIX) and not staging_owner_alive(name):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
            rep.orphans_removed.append(os.path.join(base, name))


def _protect_templates(store: StoreParts, rep: RecoveryReport) -> None:
    """Owned template files are immutable (chattr +i). A process killed while it removed a
    cache entry that shares the template's inode (the flag is cleared for the unlink and
    set again right after) leaves it mutable: set it again."""
    for t in store.registry.templates():
        if not t.owned:
            continue
        try:
            if os.path.exists(t.path) and not fs.is_immutable(t.path):
                fs.set_immutable(t.path, True)
                rep.finished.append(f"template {t.id}: immutable again")
        except (CowdiskError, OSError) as e:
            rep.errors.append(f"protect template {t.id}: {e}")
