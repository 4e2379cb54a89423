"""Recovery: reconcile the registry, the kernel and the files after a crash or a restart.

Two parts:

* **Intents of dead processes** go through :data:`HANDLERS`, a table from operation
  name to the handler that undoes or finishes it (the operation's ``after_crash``).
  The same handler is what an operation runs in-process when a step fails, so the
  code path a crash takes is the one every failure test already exercises.
* **Reconciliation** of what no intent explains: volume and template data the registry
  lost is registered again from its manifest, or else moved to the quarantine (never
  deleted); kernel objects of this store that no volume accounts for are released (a
  detach loses no data); attached volumes whose device is gone (a reboot) are attached
  again, and a device a killed copy left suspended is resumed; link rows and files are
  made to agree; staging debris of dead processes goes; owned templates stay immutable;
  a lazy template's server whose keeper was killed gets a new keeper.
  Anything a live process may be working on (its volume lock is held, or its intent's
  process runs) is left alone, and a failure on one item is reported and never stops the
  others.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from typing import Any, Callable, ContextManager, Mapping

from ..backends import KernelObject, Shared, Thaw, VolumeCtx
from ..errors import CowdiskError
from ..kernel import fs
from ..kernel.procfs import process_alive
from ..registry import (
    ATTACHED,
    CHECKPOINTED,
    CHECKPOINTING,
    CREATING,
    ERROR,
    RESTORING,
    Intent,
    VolumeRow,
    VolumeState,
)
from . import manifest
from .model import RecoveryReport
from .parts import LINK_TMP, QUARANTINE, StoreParts
from .templates import HELD, STAGING_PREFIX, staging_owner_alive
from .transition import (
    ADOPT,
    CHECKPOINT,
    CREATE,
    FLATTEN,
    FORK,
    IMPORT,
    OPERATIONS,
    REMOVE,
    RESTORE,
    RESTORE_AS,
    TAKE_OVER,
    TEMPLATE_REMOVE,
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
    if v is not None:
        store.write_manifest(v.id)


def _drop_flat(store: StoreParts, intent: int, data: Mapping[str, Any], v: VolumeRow | None,
               ctx: VolumeCtx | None) -> None:
    """Undo flatten: drop the staging directory (and the thin a held template's descriptor
    there names), and the template if this flatten registered it."""
    staging = str(data.get("staging", ""))
    if staging and store.holder is not None:
        store.holder.drop_held(os.path.join(staging, HELD))
    shutil.rmtree(staging, ignore_errors=True)
    tid = data.get("template_id")
    if tid and not data.get("existed") and store.registry.find_template(tid) is not None:
        store.remove_template(tid)
    store.registry.end_intent(intent)


def _unpublish(store: StoreParts, intent: int, data: Mapping[str, Any], v: VolumeRow | None,
               ctx: VolumeCtx | None) -> None:
    """Undo import: a template file published without its row goes, immutable flag included."""
    store.undo_import(intent, str(data["template_id"]))


def _template_gone(store: StoreParts, intent: int, data: Mapping[str, Any], v: VolumeRow | None,
                   ctx: VolumeCtx | None) -> None:
    """Finish template-remove: the file and the row go."""
    store.finish_template_remove(intent, str(data["template_id"]))


def _unadopt(store: StoreParts, intent: int, data: Mapping[str, Any], v: VolumeRow | None,
              ctx: VolumeCtx | None) -> None:
    """Undo adopt: the volume goes back to the owner it had (the intent's ``owner``) and
    this store forgets it. Its data is another store's: never detached, never deleted."""
    if v is not None and ctx is not None:
        if isinstance(store.backend, Shared):
            store.backend.unclaim(ctx, str(data.get("owner") or ""))
        shutil.rmtree(ctx.data_dir, ignore_errors=True)  # only its manifest: nothing was attached
    with store.registry.tx():
        if v is not None:
            store.registry.delete_volume(v.id)
        store.registry.end_intent(intent)


def _fenced(store: StoreParts, intent: int, data: Mapping[str, Any], v: VolumeRow | None,
            ctx: VolumeCtx | None) -> None:
    """Finish take-over: fence again (idempotent) and end the intent; the volume stays
    checkpointed, free for the restore that asked for the fence."""
    if v is not None and ctx is not None and isinstance(store.backend, Shared):
        store.backend.take_over(ctx)
    store.registry.end_intent(intent)


HANDLERS: Mapping[str, Handler] = {
    CREATE.name: _forget,
    RESTORE_AS.name: _forget,
    FORK.name: _forget,
    REMOVE.name: _forget,
    CHECKPOINT.name: _detached,
    RESTORE.name: _detached,
    FLATTEN.name: _drop_flat,
    ADOPT.name: _unadopt,
    TAKE_OVER.name: _fenced,
    IMPORT.name: _unpublish,
    TEMPLATE_REMOVE.name: _template_gone,
}
assert set(HANDLERS) == set(OPERATIONS), "every operation needs its recovery handler"


def recover_intent(store: StoreParts, it: Intent, rep: RecoveryReport) -> None:
    """Undo or finish the operation of one intent whose process is gone, under the lock of
    what it names (the volume, or the template)."""
    op = legacy_op(it.op, it.data)
    handler = HANDLERS.get(op)
    label = f"{it.op} {it.volume_id or it.template_id}"
    if handler is None:  # an operation this cowdisk does not know: never guess
        rep.errors.append(f"{label}: unknown operation {it.op!r} (intent {it.id} kept)")
        return
    if OPERATIONS[op].subject == "template":
        with store.lock("template", str(it.template_id)):
            handler(store, it.id, it.data, None, None)
    else:
        with store.lock("volume", it.volume_id) if it.volume_id else contextlib.nullcontext():
            v = store.registry.find_volume(it.volume_id) if it.volume_id else None
            ctx = store.ctx(v, op="recover") if v is not None else None
            handler(store, it.id, it.data, v, ctx)
    (rep.rolled_back if OPERATIONS[op].after_crash == "undo" else rep.finished).append(label)


def recover(store: StoreParts) -> RecoveryReport:
    """Reconcile registry, kernel and files (see the module docstring). Never raises for one
    item: each failure is recorded in the report's errors and the others go on."""
    rep = RecoveryReport()
    for it in store.registry.intents():
        if not process_alive(it.pid, it.pid_start):
            _each(rep, f"{it.op} {it.volume_id or it.template_id}", recover_intent, store, it, rep)
    for step in (_orphan_template_dirs, _orphan_volume_dirs, _release_orphan_objects, _reactivate,
                 _reconcile_links, _remove_staging_debris, _protect_templates, _writer_debris, _lazy_servers,
                 sweep_lock_files):
        _each(rep, step.__name__.strip("_").replace("_", " "), step, store, rep)
    _each(rep, "list quarantine", _list_quarantine, store, rep)
    for what, items in rep.as_dict().items():
        if what == "in_quarantine":
            continue
        for item in items:
            (log.warning if what == "errors" else log.info)("recover: %s %s", what.replace("_", " "), item)
    return rep


def _each(rep: RecoveryReport, what: str, fn: Callable[..., object], *args: object) -> None:
    """Run one item of recovery; record its failure (with the errno where there is one) and go on."""
    try:
        fn(*args)
    except Exception as e:  # one bad item never stops the others, nor the store's open
        rep.errors.append(f"{what}: {type(e).__name__}: {e}")


def _idle_volume(store: StoreParts, vid: str) -> ContextManager[bool]:
    """Hold volume ``vid``'s lock if nobody else does; yield False (and hold nothing) when
    another process or thread is working on that volume: recovery then leaves it alone."""
    return store.lock_if_free("volume", vid)


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
        _each(rep, f"release {obj.kind} {obj.name}", _release_one, store, obj, rep)


def _release_one(store: StoreParts, obj: KernelObject, rep: RecoveryReport) -> None:
    vid = obj.volume_id
    guard: ContextManager[bool]
    if obj.template_id is not None:
        guard = store.lock_if_free("template", obj.template_id)
    else:
        guard = _idle_volume(store, vid) if vid else contextlib.nullcontext(True)
    with guard as idle:
        if not idle or (vid and not _orphan_now(store, vid)):
            return
        store.backend.release(obj)  # a detach loses no data
        rep.orphans_removed.append(f"{obj.kind} {obj.name}")


def _reactivate(store: StoreParts, rep: RecoveryReport) -> None:
    """Attached volumes whose device is gone (host reboot): attach them again."""
    live = store.registry.live_intent_volumes()
    for v in store.registry.volumes():
        if v.state == ATTACHED and v.id not in live:
            _each(rep, f"reactivate {v.id}", _reactivate_one, store, v.id, rep)


def _reactivate_one(store: StoreParts, vid: str, rep: RecoveryReport) -> None:
    with _idle_volume(store, vid) as idle:
        # under the lock, fresh: a concurrent remove may have taken it away meanwhile
        cur = store.registry.find_volume(vid) if idle else None
        if cur is None or cur.state != ATTACHED or vid in store.registry.live_intent_volumes():
            return
        ctx = store.ctx(cur, op="recover")
        if store.backend.is_attached(ctx):
            # a kill while it was suspended for a copy
            if isinstance(store.backend, Thaw) and store.backend.thaw(ctx):
                rep.finished.append(f"device {vid}: resumed")
            if cur.device and not _link_ok(store.link_path(vid), cur.device):
                store.set_link(vid, store.link_path(vid), cur.device)  # removed by hand
                rep.finished.append(f"link {vid}: made again")
            rep.kept.append(vid)
            return
        try:
            dev = store.backend.attach(ctx)
            store.set_link(vid, store.link_path(vid), dev)
            store.registry.set_state(vid, ATTACHED, device=dev)
            rep.reactivated.append(vid)
        except (CowdiskError, OSError) as e:
            store.registry.set_state(vid, ERROR, error=str(e))
            rep.errors.append(f"reactivate {vid}: {e}")
        store.write_manifest(vid)


def _link_ok(path: str, target: str) -> bool:
    try:
        return os.readlink(path) == target
    except OSError:
        return False


def _reconcile_links(store: StoreParts, rep: RecoveryReport) -> None:
    """Link rows whose owner is gone or no longer attached, or whose file was removed by
    hand: drop them (an attached owner's own link is made again by reactivation)."""
    live = store.registry.live_intent_volumes()
    vols = {v.id: v for v in store.registry.volumes()}
    for path, owner, target in store.registry.links():
        v = vols.get(owner)
        if owner in live:
            continue
        if v is None or v.state != ATTACHED or v.device != target:
            source = os.path.basename(os.path.dirname(path))
            with _idle_volume(store, owner) as idle:
                if not idle or owner in store.registry.live_intent_volumes():
                    continue
                if path == store.link_path(owner) or source == owner:
                    store.drop_link(path)
                    rep.orphans_removed.append(f"link {path}")
                    continue
                with _idle_volume(store, source) as free:  # a source's link: as the operations settle it
                    if free and store.registry.link(path) == (path, owner, target):
                        if store.settle_link(path, owner, source):
                            rep.orphans_removed.append(f"link {path}")
                        else:
                            rep.finished.append(f"link {path}: given back to the copy it pointed at")
        elif os.path.basename(os.path.dirname(path)) not in vols:
            with _idle_volume(store, owner) as idle:  # its directory's volume was removed
                if idle:
                    store.drop_link(path)
                    rep.orphans_removed.append(f"link {path}")
        elif not _link_ok(path, target) and path != store.link_path(owner):
            store.set_link(owner, path, target)  # a retargeted source link removed by hand
            rep.finished.append(f"link {path}: made again")


def _orphan_volume_dirs(store: StoreParts, rep: RecoveryReport) -> None:
    """Volume directories no volume accounts for: registered again from their manifest when
    it is this store's and its template is known (the registry lost the row), else moved to
    the quarantine (their data may be the only copy of a disk); link directories of no
    volume are removed (a link holds no data)."""
    live = store.registry.live_intent_volumes()
    known = {v.id for v in store.registry.volumes()}
    vbase = os.path.join(store.data_root, "volumes")
    for name in os.listdir(vbase):
        if name not in known and name not in live:
            _each(rep, f"quarantine volume dir {name}", _orphan_dir, store, vbase, name, rep, True)
    lbase = os.path.join(store.root, "links")
    for name in os.listdir(lbase):
        if name not in known and name not in live:
            _each(rep, f"remove link dir {name}", _orphan_dir, store, lbase, name, rep, False)
        elif os.path.isdir(os.path.join(lbase, name)):
            _each(rep, f"link debris in {name}", _tmp_debris, os.path.join(lbase, name), rep)


def _tmp_debris(d: str, rep: RecoveryReport) -> None:
    """``<name>.tmp-<pid>[-<start>]`` files in ``d`` left by a process killed between
    writing a file (a link, a manifest, the reserve) and renaming it into place: removed
    once that process is gone, never a live writer's."""
    for entry in os.listdir(d):
        _, sep, who = entry.rpartition(LINK_TMP)
        if not sep:
            continue
        pid, _, start = who.partition("-")
        path = os.path.join(d, entry)
        if (pid.isdigit() and (not start or start.isdigit()) and not os.path.isdir(path)
                and not process_alive(int(pid), start or None)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                rep.orphans_removed.append(path)


def _writer_debris(store: StoreParts, rep: RecoveryReport) -> None:
    """Temporary files of killed writers beside the store's own files: in the root
    (``store.json``, the reserve), in each volume's and template's directory (its
    manifest) and in each lazy template's cache (its record rewritten by an eviction, its
    manifest, its server's counters). Link directories are swept with the links
    (:func:`_orphan_volume_dirs`)."""
    dirs = [store.root, store.data_root]
    for kind in ("volumes", "templates", "lazy"):
        base = os.path.join(store.data_root, kind)
        if os.path.isdir(base):
            dirs += [os.path.join(base, n) for n in sorted(os.listdir(base)) if not n.startswith(STAGING_PREFIX)]
    for d in dict.fromkeys(dirs):
        if os.path.isdir(d):
            _each(rep, f"writer debris in {d}", _tmp_debris, d, rep)


def _lazy_servers(store: StoreParts, rep: RecoveryReport) -> None:
    """Lazy templates' servers whose keeper was killed get a new one; one that died with
    its keeper is served again (store/remote.py ``keep_served``)."""
    rep.finished.extend(store._remote().keep_served())


def sweep_lock_files(store: StoreParts, rep: RecoveryReport) -> None:
    """Lock files of volumes and templates that no longer exist (left by a process killed
    between removing its object and its lock file, or made by a look at a gone id). Each
    is taken without waiting and removed while held, the way :meth:`FileLock.unlink` lets
    a waiter go on with the file made anew; one somebody holds is left alone. Runs last:
    recovery's own looks at gone ids (under their lock) make such files too."""
    ldir = os.path.join(store.root, "locks")
    vols = {v.id for v in store.registry.volumes()}
    tpls = {t.id for t in store.registry.templates()}
    live = store.registry.live_intent_volumes()
    for name in sorted(os.listdir(ldir)):
        kind, sep, rest = name.partition("-")
        oid = rest.removesuffix(".lock")
        if not sep or oid == rest or oid in live:
            continue
        if (kind == "volume" and oid not in vols) or (kind == "template" and oid not in tpls
                                                         and not oid.startswith("recipe-")):
            _each(rep, f"remove lock file {name}", _drop_lock_file, store, kind, oid, rep)


def _drop_lock_file(store: StoreParts, kind: str, oid: str, rep: RecoveryReport) -> None:
    lk = store.lock(kind, oid)
    if not lk.try_acquire():
        return
    try:  # looked up again under the lock: nobody made it meanwhile
        reg = store.registry
        gone = reg.find_volume(oid) is None if kind == "volume" else reg.find_template(oid) is None
        if gone and oid not in reg.live_intent_volumes():
            lk.unlink()  # not reported: recovery's own looks at gone ids make such files too
            log.debug("recover: removed lock file %s (no %s %s)", lk.path, kind, oid)
    finally:
        lk.release()


def _orphan_dir(store: StoreParts, base: str, name: str, rep: RecoveryReport, keep: bool) -> None:
    with _idle_volume(store, name) as idle:  # not a volume being created right now
        if not idle or not _orphan_now(store, name, files=True):
            return
        path = os.path.join(base, name)
        if keep and _adopt_volume(store, name, rep):
            return
        if keep:
            rep.quarantined.append(f"{path} -> {store.quarantine(path, 'no volume in the registry')}")
        else:
            shutil.rmtree(path)
            rep.orphans_removed.append(path)


def _orphan_template_dirs(store: StoreParts, rep: RecoveryReport) -> None:
    """Template directories no template accounts for (a kill between publishing the file
    and registering it): quarantined, never deleted."""
    base = os.path.join(store.data_root, "templates")
    live = store.registry.live_intent_volumes()  # template ids of live imports too
    known = {t.id for t in store.registry.templates()}
    for name in os.listdir(base):
        if name.startswith(STAGING_PREFIX) or name in known or name in live:
            continue
        path = os.path.join(base, name)
        _each(rep, f"quarantine template dir {name}", _quarantine_template_dir, store, path, rep)


def _adopt_volume(store: StoreParts, vid: str, rep: RecoveryReport) -> bool:
    """Register volume ``vid`` again from its manifest. A volume caught in a trying state
    comes back where its undo or finish would leave its data (checkpointing and restoring:
    checkpointed, its device released by the orphan pass); a half-made or half-removed one
    comes back in ``error`` with the reason, for a person to remove."""
    m = manifest.read(os.path.join(store.vol_dir(vid), manifest.MANIFEST))
    if m is None or m.get("store") != store.id or m.get("id") != vid or m.get("backend") != store.backend_name:
        return False
    t = store.registry.find_template(str(m.get("template_id")))
    if t is None or (m.get("template_digest") and m["template_digest"] != t.digest):
        return False
    state = VolumeState(m["state"])
    error = None
    if state in (CHECKPOINTING, RESTORING):
        state = CHECKPOINTED
    elif state not in (ATTACHED, CHECKPOINTED, ERROR):
        error = f"the registry was rebuilt while the volume was {state.value}; remove it"
        state = ERROR
    now = time.time()
    store.registry.adopt_volume(VolumeRow(vid, t.id, store.backend_name, state, int(m["size"]), store.vol_dir(vid),
                                          m.get("device") if state == ATTACHED else None,
                                          float(m.get("created") or now), now, m.get("parent"), error,
                                          int(m.get("owner") or 0)))
    if state == ATTACHED:
        for path, target in m.get("links") or []:
            store.registry.set_link(str(path), vid, str(target))
    store.write_manifest(vid)
    rep.adopted.append(f"volume {vid} ({state.value})")
    return True


def _quarantine_template_dir(store: StoreParts, path: str, rep: RecoveryReport) -> None:
    if store.adopt_template(os.path.basename(path)) is not None:
        rep.adopted.append(f"template {os.path.basename(path)}")
        return
    for img in (os.path.join(path, "disk.img"), os.path.join(path, HELD)):
        if os.path.exists(img):
            fs.set_immutable(img, False)  # the quarantine may be purged; the flag would forbid it
    rep.quarantined.append(f"{path} -> {store.quarantine(path, 'no template in the registry')}")


def _remove_staging_debris(store: StoreParts, rep: RecoveryReport) -> None:
    """Staging directories of imports and flattens whose process is gone."""
    base = os.path.join(store.data_root, "templates")
    for name in os.listdir(base):
        if name.startswith(STAGING_PREFIX) and not staging_owner_alive(name):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
            rep.orphans_removed.append(os.path.join(base, name))


def _list_quarantine(store: StoreParts, rep: RecoveryReport) -> None:
    qdir = os.path.join(store.data_root, QUARANTINE)
    if os.path.isdir(qdir):
        rep.in_quarantine.extend(os.path.join(qdir, n) for n in sorted(os.listdir(qdir)))


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
