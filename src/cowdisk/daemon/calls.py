"""What the daemon's endpoints ask of the store, as functions a store worker runs.

Each takes the worker's :class:`~cowdisk.store.Store` first and returns plain data (the
documents the API answers with; :func:`encoded` already, for the hot ones), so that it
travels between processes: the function by reference, its arguments and its answer
pickled (:mod:`.workers`).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from .. import doctor as doctor_mod
from ..errors import KernelError
from ..progress import Progress
from ..store import Store
from ..store.sources import Caller
from .security import refused


def encoded(doc: Any) -> bytes:
    """``doc`` as the JSON the daemon answers with (as Starlette's JSONResponse renders
    it). The hot calls (create, remove) answer with it already encoded: the encoding runs in
    the worker, beside the daemon's event loop, and the bytes travel without pickling a dict."""
    return json.dumps(doc, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()


def as_caller(store: Store, uid: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn`` run on ``store`` as caller ``uid`` sees it (:meth:`Store.as_caller`: the
    peer's SO_PEERCRED uid): every call of the daemon goes through it."""
    return fn(store.as_caller(uid), *args, **kwargs)


def doctor(store: Store) -> dict[str, Any]:
    rep = doctor_mod.check(store.root)
    rep.checks += doctor_mod.space_checks(store.space())
    return rep.as_dict()


def recover(store: Store) -> dict[str, Any]:
    return store.recover().as_dict()


def gc(store: Store, purge: bool = False, older_than_s: float = 86400.0) -> dict[str, Any]:
    return store.gc(purge=purge, older_than_s=older_than_s).as_dict()


def templates(store: Store) -> dict[str, Any]:
    return {"templates": [store.template_doc(t) for t in store.templates()]}


def template(store: Store, ref: str) -> dict[str, Any]:
    return store.template_doc(store.template(ref))


def remove_template(store: Store, ref: str) -> dict[str, Any]:
    tid = store.template(ref).id
    store.remove_template(tid)
    return {"removed": [tid]}


def chown_template(store: Store, ref: str, owner: int | None, shared: bool | None) -> dict[str, Any]:
    return store.template_doc(store.chown_template(ref, owner, shared=shared))


def chown_volume(store: Store, vid: str, owner: int) -> dict[str, Any]:
    return store.chown_volume(vid, owner).as_dict()


def volumes(store: Store, template: str | None) -> dict[str, Any]:
    vols = store.volumes()
    if template is not None:
        tid = store.template(template).id
        vols = [v for v in vols if v.template_id == tid]
    return {"volumes": [v.as_dict() for v in vols]}


def volume(store: Store, vid: str) -> dict[str, Any]:
    return store.volume(vid).as_dict()


def create(store: Store, vid: str, template: str, size: int | None, grow_fs: bool) -> bytes:
    return encoded(store.create_volume(vid, template, size=size, grow_fs=grow_fs).as_dict())


def remove(store: Store, vid: str, deadline: float) -> bytes:
    store.remove_volume(vid, deadline_s=deadline)
    return encoded({"removed": [vid]})


def usage(store: Store, vid: str) -> dict[str, Any]:
    return store.usage(vid).as_dict()


def checkpoint(store: Store, vid: str, deadline: float) -> dict[str, Any]:
    return store.checkpoint(vid, deadline_s=deadline).as_dict()


def restore(store: Store, vid: str, new_id: str | None, retarget_source_link: bool, adopt: bool,
            steal: bool) -> dict[str, Any]:
    return store.restore(vid, new_id, retarget_source_link=retarget_source_link, adopt=adopt,
                         steal=steal).as_dict()


def adopt(store: Store, vid: str, steal: bool) -> dict[str, Any]:
    return store.adopt_volume(vid, steal=steal).as_dict()


def shared_volumes(store: Store) -> dict[str, Any]:
    return {"volumes": [sv.as_dict() for sv in store.shared_volumes()]}


def jail(store: Store, vid: str, jdir: str, name: str, uid: int | None, gid: int | None,
         caller: Caller) -> dict[str, Any]:
    try:
        with store.reading_as(caller):
            return {"volume": vid, "path": store.jail(vid, jdir, name, uid=uid, gid=gid)}
    except KernelError as e:
        raise refused(e, "jail volume", jdir) from None


def info(store: Store) -> dict[str, Any]:
    return store.info()


def space(store: Store) -> dict[str, Any]:
    return {"space": [s.as_dict() for s in store.space()]}


def destroy_store(store: Store, force: bool) -> dict[str, Any]:
    return {"removed": store.destroy_store(force=force)}


# -- jobs: long calls, given the job's progress (which a cancel makes raise) ------------------


def import_template(store: Store, src: str, name: str | None, adopt: bool, shared: bool, caller: Caller, *,
                    progress: Progress | None = None) -> dict[str, Any]:
    """The source opened once and read as ``caller`` (the peer: store/sources.py); a refusal
    by the kernel (EACCES, a symlink...) is the 403 it is."""
    try:
        with store.reading_as(caller):
            return store.template_doc(store.import_template(src, name, adopt=adopt, progress=progress,
                                                            shared=shared))
    except KernelError as e:
        raise refused(e, "import template", src) from None


def build_template(store: Store, src: str, name: str | None, size: int | None, fs_type: str, shared: bool,
                   caller: Caller, *, progress: Progress | None = None) -> dict[str, Any]:
    try:
        with store.reading_as(caller):
            return store.template_doc(store.build_template(src, name, size=size, fs_type=fs_type, progress=progress,
                                                           shared=shared))
    except KernelError as e:
        raise refused(e, "build template", src) from None


def build_template_from_image(store: Store, ref: str, name: str | None, size: int | None, fs_type: str,
                              shared: bool, caller: Caller, path: str, *,
                              progress: Progress | None = None) -> dict[str, Any]:
    try:
        with store.reading_as(caller):
            return store.template_doc(store.build_template_from_image(ref, name, size=size, fs_type=fs_type,
                                                                      progress=progress, shared=shared))
    except KernelError as e:
        raise refused(e, "build template", path) from None


def verify_template(store: Store, ref: str, *, progress: Progress | None = None) -> dict[str, Any]:
    return store.template_doc(store.verify_template(ref, progress=progress))


def fork(store: Store, vid: str, ids: list[str], reset_identity: bool, hostname_prefix: str | None, *,
         progress: Progress | None = None) -> dict[str, Any]:
    if progress is not None:
        progress(0, 0, f"fork {vid} -> {len(ids)} volumes")
    return {"volumes": [v.as_dict() for v in store.fork(vid, ids, reset_identity=reset_identity,
                                                        hostname_prefix=hostname_prefix, progress=progress)]}


def flatten(store: Store, vid: str, name: str | None, *, progress: Progress | None = None) -> dict[str, Any]:
    return store.template_doc(store.flatten(vid, name, progress=progress))


# -- templates in an object store (docs/remote.md) ---------------------------------------------


def push_template(store: Store, ref: str, to: str | None, *, progress: Progress | None = None) -> dict[str, Any]:
    return store.push_template(ref, to, progress=progress)


def pull_template(store: Store, source: str, name: str | None, at: str | None, *,
                  progress: Progress | None = None) -> dict[str, Any]:
    return store.template_doc(store.pull_template(source, name, at=at, progress=progress))


def lazy_template(store: Store, source: str, name: str | None, at: str | None, bound: float | None,
                  prefetch: bool, *, progress: Progress | None = None) -> dict[str, Any]:
    return store.lazy_template(source, name, at=at, bound=bound, prefetch=prefetch, progress=progress)


def remote_templates(store: Store, at: str | None) -> dict[str, Any]:
    return {"templates": store.remote_templates(at)}


def lazy_templates(store: Store) -> dict[str, Any]:
    return {"templates": store.lazy_templates()}


def record_read_order(store: Store, manifest: str) -> dict[str, Any]:
    return store.record_read_order(manifest)


def stop_lazy_template(store: Store, manifest: str) -> dict[str, Any]:
    return {"manifest": manifest, "stopped": store.stop_lazy_template(manifest)}
