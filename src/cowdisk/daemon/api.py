"""The HTTP API: one endpoint per Store operation, one error model, jobs, metrics.

Endpoints are ``async`` functions that never block: each store call is sent to a store
worker process (:mod:`.workers`; or a thread with ``processes = 0``) and awaited, so
requests on different volumes run in parallel, on several cores, and the event loop
never waits for the kernel (FastAPI's own thread hop for plain ``def`` endpoints cost
0.17 ms per request). A mutating call goes through :meth:`Service.call`, which times
it, counts it in the metrics and writes one log line (op, object, duration, result,
peer); a read goes through :meth:`Service.read`. Every error, from the store or from
request validation, is answered with the ``{"error": {...}}`` document and the status
from :mod:`.protocol`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
import signal
from typing import Any, Callable, Literal, TypeVar

from fastapi import Body, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import drive as drive_mod
from ..contract import LOCK_TIMEOUT_HEADER
from ..errors import CowdiskError, InvalidArgument, KernelError, NotFound
from ..remote import check_source, parse_location
from ..store import Store, fork_ids, validate_id
from . import calls
from . import models as m
from .models import Size
from .config import Config
from .jobs import Job, JobContext, Jobs
from .metrics import VERSION, Metrics
from .protocol import API, Cancelled, Forbidden, error_document, status_of
from .security import UNKNOWN, Peer, caller_of, check_jail_ids, check_path, check_peer, refused
from .workers import CALL_SCOPE, Pool, RemoteInternal

T = TypeVar("T")

oplog = logging.getLogger("cowdisk.daemon.ops")

ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": m.ErrorDoc, "description": "The request was refused: 400 invalid, 403 not allowed, 404 not "
                                                "found, 409 exists / in use / wrong state, 423 lock timeout"},
    "5XX": {"model": m.ErrorDoc, "description": "500 kernel or internal error, 501 unsupported here, "
                                                "503 shutting down, 507 no space"},
}


class Service:
    """What the endpoints share: the store, the settings, jobs, metrics."""

    def __init__(self, store: Store, cfg: Config, metrics: Metrics, pool: Pool, jobs: Jobs | None = None) -> None:
        self.store = store
        """The daemon's own store: jobs and the metrics' scrape use it; requests go to ``pool``."""
        self.pool = pool
        self.cfg = cfg
        self.metrics = metrics
        self.jobs = jobs or Jobs(cfg.job_retention, on_done=self._job_done)
        self.started = time.time()
        self.recovery: dict[str, list[str]] = {}
        self.stopping = False

    # the two calls a platform makes most, shared by their FastAPI endpoints and :class:`Direct`

    async def create(self, peer: Peer, body: m.CreateIn) -> Response:
        _ids((body.id, "volume id"), (body.template, "template name or id"))
        return Encoded(await self.call("create", body.id, peer, calls.create, body.id, body.template, body.size,
                                       body.grow_fs), 201)

    async def remove(self, peer: Peer, vid: str, deadline: float) -> Response:
        validate_id(vid)
        return Encoded(await self.call("remove", vid, peer, calls.remove, vid, deadline))

    async def call(self, op: str, obj: str, peer: Peer, fn: Callable[..., T], *args: Any, mutating: bool = True,
                   **kwargs: Any) -> T:
        """Run one store operation ``fn(store, *args, **kwargs)`` (a function of :mod:`.calls`)
        in a store worker: timed, counted, logged once."""
        t0 = time.monotonic()
        err: BaseException | None = None
        info: dict[str, Any] = {}
        try:
            out: T = await self.pool.run(calls.as_caller, peer.uid, fn, *args, what=(op, obj), info=info, **kwargs)
            return out
        except BaseException as e:
            err = e
            raise
        finally:
            # counted and logged at the event loop's next turn: the answer is written in this one
            asyncio.get_running_loop().call_soon(self._done, op, obj, peer, time.monotonic() - t0, err, mutating,
                                                 info)

    def _done(self, op: str, obj: str, peer: Peer, seconds: float, err: BaseException | None, mutating: bool,
              info: dict[str, Any]) -> None:
        self.metrics.observe(op, err, seconds)
        self.log(op, obj, peer, seconds, err, level=logging.INFO if mutating or err else logging.DEBUG, **info)

    async def read(self, peer: Peer, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A read of the store as ``peer`` sees it (not logged, not counted) in a store worker."""
        out: T = await self.pool.run(calls.as_caller, peer.uid, fn, *args,
                                     what=(getattr(fn, "__name__", "read"), ""), **kwargs)
        return out

    def sees_job(self, peer: Peer, job: Job) -> bool:
        """A caller sees its own jobs; root (and the store directory's owner) every job."""
        return job.peer.uid == peer.uid or peer.uid in (0, self.store.root_uid)

    def log(self, op: str, obj: str, peer: Peer, seconds: float, err: BaseException | None, *,
            level: int = logging.INFO, job: str | None = None, store_s: float | None = None,
            worker: int | None = None) -> None:
        """One line for one operation; ``store_s``: the part spent in the store itself (the
        rest is waiting for a free store worker and passing the call to it), in the store
        worker process ``worker``."""
        if not oplog.isEnabledFor(level):
            return
        rec: dict[str, Any] = {"op": op, "object": obj, "duration_ms": round(seconds * 1000, 3),
                               "result": "ok" if err is None else type(err).__name__, "peer": peer.as_dict()}
        if store_s is not None:
            rec["store_ms"] = round(store_s * 1000, 3)
        if worker is not None:
            rec["worker"] = worker
        if job:
            rec["job"] = job
        if err is not None:
            rec["error"] = str(err)
        oplog.log(level, "%s %s: %s", op, obj, rec["result"], extra={"fields": rec})

    def _job_done(self, job: Job, err: BaseException | None, seconds: float) -> None:
        self.metrics.observe(job.op, err, seconds)
        self.log(job.op, job.object, job.peer, seconds, err, job=job.id, worker=job.worker)

    def start_job(self, op: str, obj: str, peer: Peer, fn: Callable[..., Any], *args: Any) -> JSONResponse:
        """Start a job running ``fn(store, *args, progress=...)`` (a function of :mod:`.calls`)
        in a store worker, as ``peer`` and in the request's scope: its document (202)."""
        loop = asyncio.get_running_loop()
        scope = CALL_SCOPE.get()
        info: dict[str, Any] = {}

        def run(ctx: JobContext) -> Any:
            fut = asyncio.run_coroutine_threadsafe(self.pool.run(
                calls.as_caller, peer.uid, fn, *args, what=(op, obj), info=info, watch=ctx.watch, scope=scope), loop)
            try:
                return fut.result()
            finally:
                ctx.job.worker = info.get("worker")

        job = self.jobs.start(op, obj, peer, run)
        oplog.info("%s %s: job %s started", op, obj, job.id,
                   extra={"fields": {"op": op, "object": obj, "job": job.id, "result": "started",
                                     "peer": peer.as_dict()}})
        return JSONResponse(job.as_dict(), status_code=202, headers={"Location": f"{API}/jobs/{job.id}"})


def J(doc: Any, status: int = 200) -> JSONResponse:
    """The answer as JSON, as is: endpoints declare their ``response_model`` for the OpenAPI
    document, but a Response skips FastAPI's re-validation of it (~0.1 ms per request)."""
    return JSONResponse(doc, status_code=status)


def Encoded(body: bytes, status: int = 200) -> Response:
    """An answer encoded by the store worker (:func:`.calls.encoded`)."""
    return Response(body, status_code=status, media_type="application/json")


def peer_of(request: Request) -> Peer:
    return _peer(request.scope)


_LOCK_TIMEOUT = LOCK_TIMEOUT_HEADER.lower().encode()
MAX_LOCK_TIMEOUT = 3600.0


def call_scope(scope: Scope) -> dict[str, Any]:
    """The store scope a request asks for (:meth:`cowdisk.store.Store.scoped`): its
    ``X-Cowdisk-Lock-Timeout`` (seconds, 0 to an hour)."""
    for k, v in scope["headers"]:
        if k == _LOCK_TIMEOUT:
            try:
                t = float(v)
            except ValueError:
                t = -1.0
            if not 0 <= t <= MAX_LOCK_TIMEOUT:
                raise InvalidArgument(f"{LOCK_TIMEOUT_HEADER} {v.decode(errors='replace')!r}: seconds from 0 to "
                                      f"{MAX_LOCK_TIMEOUT:g}", op=f"{scope['method']} {scope['path']}",
                                      obj=LOCK_TIMEOUT_HEADER)
            return {"lock_timeout": t}
    return {}


class PeerGate:
    """ASGI middleware: the allowlist, before anything else runs (403, nothing changes);
    then the request's store scope (:func:`call_scope`) for every store call made for it."""

    def __init__(self, app: ASGIApp, cfg: Config) -> None:
        self.app = app
        self.cfg = cfg

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (self.cfg.allow_uids or self.cfg.allow_gids):
            peer = scope.get("state", {}).get("peer", UNKNOWN)
            try:
                check_peer(peer, self.cfg)
            except CowdiskError as e:
                oplog.warning("refused %s %s", scope.get("method"), scope.get("path"), extra={"fields": {
                    "op": f"{scope.get('method')} {scope.get('path')}", "result": "Forbidden",
                    "peer": peer.as_dict()}})
                await JSONResponse(error_document(e), status_code=403)(scope, receive, send)
                return
        if scope["type"] == "http":
            try:
                CALL_SCOPE.set(call_scope(scope))
            except CowdiskError as e:
                await JSONResponse(error_document(e), status_code=status_of(e))(scope, receive, send)
                return
        await self.app(scope, receive, send)


def internal_error(method: str, path: str, e: BaseException) -> JSONResponse:
    """The answer to an unexpected exception (a bug): 500, logged with its traceback."""
    logging.getLogger("cowdisk.daemon").error("internal error on %s %s", method, path, exc_info=e)
    doc = e.doc if isinstance(e, RemoteInternal) else error_document(e)
    doc["error"]["exit_code"] = 1
    doc["error"]["hint"] = "a bug in cowdiskd: the daemon's log has the traceback"
    return JSONResponse(doc, status_code=500)


class Direct:
    """ASGI middleware in front of FastAPI: the two calls a platform makes most
    (``POST /v1/volumes`` and ``DELETE /v1/volumes/{id}``, with at most a ``deadline``),
    answered without FastAPI's middleware stack, routing and dependency solving (about
    0.2 ms of a create here), by the same handlers its endpoints call
    (:meth:`Service.create`, :meth:`Service.remove`), with the same validation (the same
    pydantic model, the same id checks) and the same error documents. Anything else, and
    any request the plain form does not cover (another query, a body the model refuses or
    longer than :data:`MAX_BODY`), goes on to FastAPI unchanged (its body replayed), which
    answers it as the reference. Every request declaring a body longer than
    :data:`MAX_BODY` is refused here (413, the error document), before it is read."""

    def __init__(self, app: ASGIApp, svc: Service) -> None:
        self.app = app
        self.svc = svc
        self.prefix = f"{API}/volumes/"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path, query = scope["method"], scope["path"], scope["query_string"]
        if _declared_length(scope) > MAX_BODY:
            e = InvalidArgument(f"{method} {path}: the request body is longer than {MAX_BODY} bytes",
                                op=f"{method} {path}", obj=path, hint="see /openapi.json for the API")
            await JSONResponse(error_document(e), status_code=413)(scope, receive, send)
            return
        if method == "POST" and path == f"{API}/volumes" and not query and _json_body(scope):
            raw = b""
            while True:
                msg = await receive()
                raw += msg.get("body", b"")
                if not msg.get("more_body"):
                    break
                if len(raw) > MAX_BODY:  # FastAPI's body limit answers it (413)
                    await self.app(scope, _replay(raw, receive, more=True), send)
                    return
            try:
                body = m.CreateIn.model_validate_json(raw)
            except ValueError:  # pydantic's ValidationError: FastAPI words the 400
                await self.app(scope, _replay(raw, receive), send)
                return
            call = self.svc.create(_peer(scope), body)
        elif (method == "DELETE" and path.startswith(self.prefix) and "/" not in path[len(self.prefix):]
              and (deadline := _deadline(query)) is not None):
            call = self.svc.remove(_peer(scope), path[len(self.prefix):], deadline)
        else:
            await self.app(scope, receive, send)
            return
        try:
            answer = await call
        except CowdiskError as e:
            answer = JSONResponse(error_document(e), status_code=status_of(e))
        except Exception as e:  # noqa: BLE001 - a bug: answered and logged as FastAPI would
            answer = internal_error(method, path, e)
        await answer(scope, receive, send)


MAX_BODY = 1 << 20
"""The longest request body the daemon reads: one declared longer is refused (413) before
it is read; one sent in chunks is cut off there by FastAPI's own limit."""


def _declared_length(scope: Scope) -> int:
    for k, v in scope["headers"]:
        if k == b"content-length":
            return int(v) if v.isdigit() else 0
    return 0


def _deadline(query: bytes) -> float | None:
    """A remove's deadline from its query string when that is empty (the default, 5 s) or
    exactly ``deadline=<seconds>`` within the endpoint's bounds; None for FastAPI to read."""
    if not query:
        return 5.0
    key, _, value = query.partition(b"=")
    if key != b"deadline" or not _SECONDS.fullmatch(value):
        return None
    d = float(value)
    return d if d <= 300 else None


_SECONDS = re.compile(rb"[0-9]{1,6}(\.[0-9]{1,9})?")


def _json_body(scope: Scope) -> bool:
    """The body is JSON as FastAPI reads it: no content type, or application/json."""
    for k, v in scope["headers"]:
        if k == b"content-type":
            return bool(v.split(b";", 1)[0].strip().lower() == b"application/json")
    return True


def _peer(scope: Scope) -> Peer:
    peer: Peer = scope.get("state", {}).get("peer", UNKNOWN)
    return peer


def _replay(raw: bytes, receive: Receive, *, more: bool = False) -> Receive:
    """``receive`` with the body read so far given again first (``more``: the rest follows)."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": more}
        return await receive()

    return again


def check_image_ref(ref: str, roots: list[str]) -> tuple[str, str]:
    """A container image reference (``[TRANSPORT:]PATH[:TAG]``) whose path's name lies under
    the daemon's ``import_roots`` (:func:`.security.check_path`: nothing is looked up here;
    the store opens it once, beneath the root, as the caller), and that path."""
    from ..cache.oci import TRANSPORTS

    head, sep, tail = ref.partition(":")
    path = tail if sep and head in TRANSPORTS else ref
    if not path.startswith("/"):
        raise Forbidden(f"build template {ref!r}: the image's path must be absolute", op="build template",
                        obj=repr(ref))
    cut = path.rfind("/")
    return ref, check_path(path[:cut] + path[cut:].partition(":")[0], roots, "build template", "import_roots")


def _location(url: str | None, op: str) -> None:
    """A request's object-store location: only ``s3://BUCKET[/PREFIX]`` (400 otherwise)."""
    if url is not None:
        try:
            parse_location(url)
        except InvalidArgument as e:
            raise InvalidArgument(f"{op}: {e.message}", op=op, obj=e.obj, hint=e.hint) from None


_HEX64 = re.compile("[0-9a-f]{64}")


def _manifest(digest: str, op: str) -> None:
    if not _HEX64.fullmatch(digest):
        raise InvalidArgument(f"{op} {digest!r:.100}: not a manifest digest (64 lower-case hex digits)", op=op,
                              obj=digest[:100], hint="`cowdisk template ls --lazy` lists them")


def _ids(*pairs: tuple[str | None, str]) -> None:
    for value, what in pairs:
        if value is not None:
            validate_id(value, what)


def create_app(svc: Service) -> FastAPI:
    cfg = svc.cfg
    store = svc.store
    app = FastAPI(
        title="cowdiskd", version=VERSION,
        description="Copy-on-write root disks for microVM sandboxes, as a local service on a unix socket. "
                    "Every store operation is an endpoint under /v1; long ones (template import, build, "
                    "verify, push, pull, lazy serve, volume fork, flatten) return a job. Errors are one document: "
                    "{\"error\": {type, exit_code, message, hint, op, object, errno, notes}}. "
                    "See docs/daemon.md.",
        docs_url=None, redoc_url=None, openapi_url="/openapi.json", max_body_size=MAX_BODY,
    )
    @app.exception_handler(CowdiskError)
    async def _cowdisk_error(request: Request, e: CowdiskError) -> JSONResponse:
        return JSONResponse(error_document(e), status_code=status_of(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        obj = ".".join(str(x) for x in (e.errors()[0].get("loc", ()) if e.errors() else ()))
        err2 = InvalidArgument(f"invalid request: {'; '.join(parts)}", op=f"{request.method} {request.url.path}",
                               obj=obj)
        return JSONResponse(error_document(err2), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        cls = NotFound if e.status_code == 404 else InvalidArgument
        err2 = cls(f"{request.method} {request.url.path}: {e.detail}", op=f"{request.method}",
                   obj=request.url.path, hint="see /openapi.json for the API" if e.status_code in (404, 405) else "")
        doc = error_document(err2)
        return JSONResponse(doc, status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        return internal_error(request.method, request.url.path, e)

    # -- the service -------------------------------------------------------------------

    @app.get(f"{API}/health", response_model=m.HealthOut, tags=["service"], responses=ERRORS)
    async def health() -> JSONResponse:
        """Whether the daemon runs, on which store, and what its start-up recovery did."""
        return J({"status": "stopping" if svc.stopping else "ok", "pid": os.getpid(), "version": VERSION,
                  "root": store.root, "store_id": store.id, "backend": store.backend_name,
                  "block_device": bool(store.backend.block_device),
                  "larger_volumes": bool(store.backend.larger_volumes),
                  "uptime_s": round(time.time() - svc.started, 3),
                  "recovery": svc.recovery})

    @app.get(f"{API}/doctor", tags=["service"], responses=ERRORS)
    async def doctor(request: Request) -> JSONResponse:
        """What this host can do: kernel features, tools, the backend `auto` picks (`cowdisk doctor --json`)."""
        return J(await svc.call("doctor", store.root, peer_of(request), calls.doctor, mutating=False))

    @app.get("/metrics", tags=["service"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    async def metrics() -> Response:
        """Prometheus metrics: volumes, templates, operation latencies, errors, recovery, space."""
        body, ctype = await asyncio.get_running_loop().run_in_executor(None, svc.metrics.render)
        return Response(body, media_type=ctype)

    @app.post(f"{API}/recover", response_model=m.RecoveryReportOut, tags=["service"], responses=ERRORS)
    async def recover(request: Request) -> JSONResponse:
        """Reconcile registry, kernel and files (operations of this daemon still running are left alone)."""
        return J(await svc.call("recover", store.root, peer_of(request), calls.recover))

    @app.post(f"{API}/gc", response_model=m.RecoveryReportOut, tags=["service"], responses=ERRORS)
    async def gc(request: Request, purge: bool = Query(False, description=(
            "Also delete quarantined data older than older_than")),
                 older_than: float = Query(86400.0, ge=0, description="Seconds (with purge)")) -> JSONResponse:
        """Recover, then remove templates that no volume uses and that have no name (`cowdisk gc`)."""
        return J(await svc.call("gc", store.root, peer_of(request), calls.gc, purge, older_than))

    @app.get(f"{API}/store", response_model=m.StoreInfoOut, tags=["service"], responses=ERRORS)
    async def store_info(request: Request) -> JSONResponse:
        """What the store is and holds: id, backend, places, volumes by state, space (`cowdisk store info`)."""
        return J(await svc.read(peer_of(request), calls.info))

    @app.get(f"{API}/store/space", response_model=m.SpaceList, tags=["service"], responses=ERRORS)
    async def store_space(request: Request) -> JSONResponse:
        """How full each area the store's writes fill is (the store's filesystem, the data's, a thin pool)."""
        return J(await svc.read(peer_of(request), calls.space))

    @app.delete(f"{API}/store", response_model=m.Removed, tags=["service"], responses=ERRORS)
    async def store_destroy(request: Request, force: bool = Query(False, description=(
            "Also remove attached volumes (never a device a VM holds open)"))) -> JSONResponse:
        """Delete the whole store (`cowdisk store destroy`): volumes (409 while any is attached,
        unless ``force``), templates, cache, pool, registry and the root itself. The daemon
        then stops: it has no store left to serve."""
        out = await svc.call("destroy store", store.root, peer_of(request), calls.destroy_store, force)
        svc.stopping = True
        return JSONResponse(out, background=BackgroundTask(os.kill, os.getpid(), signal.SIGTERM))

    # -- jobs --------------------------------------------------------------------------

    @app.get(f"{API}/jobs", response_model=m.JobList, tags=["jobs"], responses=ERRORS)
    async def jobs_list(request: Request) -> JSONResponse:
        """Running jobs and those that ended in the last `job_retention` seconds (a caller
        other than root: its own)."""
        peer = peer_of(request)
        return J({"jobs": [j.as_dict() for j in svc.jobs.all() if svc.sees_job(peer, j)]})

    def _job(job_id: str, peer: Peer) -> Job:
        job = svc.jobs.get(job_id)
        if job is None or not svc.sees_job(peer, job):  # another's: the same 404 as a missing one
            raise NotFound(f"job {job_id} not found", op="get job", obj=job_id,
                           hint="finished jobs are kept for job_retention seconds")
        return job

    @app.get(f"{API}/jobs/{{job_id}}", response_model=m.JobOut, tags=["jobs"], responses=ERRORS)
    async def job_get(request: Request, job_id: str, wait: float = Query(0, ge=0, le=60, description=(
            "Hold the answer up to this many seconds until the job changes or ends")),
                      since: int | None = Query(None, description="With wait: return once the job's seq passes "
                                                                  "this (default: its seq now)")) -> JSONResponse:
        """A job's state and progress (bytes done of total in the current stage)."""
        job = _job(job_id, peer_of(request))
        if wait:
            await asyncio.get_running_loop().run_in_executor(None, svc.jobs.wait, job, wait, since)
        return J(job.as_dict())

    @app.post(f"{API}/jobs/{{job_id}}/cancel", response_model=m.JobOut, tags=["jobs"], responses=ERRORS)
    async def job_cancel(request: Request, job_id: str) -> JSONResponse:
        """Cancel a job: it stops at its next progress report and undoes what it made."""
        job = _job(job_id, peer_of(request))
        svc.log("cancel job", f"{job.op} {job.object} ({job.id})", peer_of(request), 0, None)
        return J(svc.jobs.cancel(job).as_dict())

    # -- templates ---------------------------------------------------------------------

    @app.get(f"{API}/templates", response_model=m.TemplateList, tags=["templates"], responses=ERRORS)
    async def templates_list(request: Request) -> JSONResponse:
        """Every template the caller may use (its own and the shared ones; root: all), with
        what its file takes on disk."""
        return J(await svc.read(peer_of(request), calls.templates))

    @app.get(f"{API}/templates/{{ref}}", response_model=m.TemplateOut, tags=["templates"], responses=ERRORS)
    async def template_get(request: Request, ref: str) -> JSONResponse:
        """One template by id, digest prefix or name (404 for one the caller may not use)."""
        validate_id(ref, "template name or id")
        return J(await svc.read(peer_of(request), calls.template, ref))

    @app.post(f"{API}/templates/import", status_code=202, response_model=m.JobOut, tags=["templates"],
              responses=ERRORS)
    async def template_import(request: Request, body: m.ImportIn) -> JSONResponse:
        """Import a raw disk image (copied sparsely, digested, made read-only): a job."""
        peer = peer_of(request)
        _ids((body.name, "template name"))
        src = check_path(body.source, cfg.import_roots, "import template", "import_roots")
        caller = caller_of(peer, cfg.import_roots)

        return svc.start_job("import template", body.source, peer, calls.import_template, src, body.name, body.adopt,
                             body.shared, caller)

    @app.post(f"{API}/templates/build", status_code=202, response_model=m.JobOut, tags=["templates"],
              responses=ERRORS)
    async def template_build(request: Request, body: m.BuildIn) -> JSONResponse:
        """Build an ext4 template through the template cache from a directory tree or tarball
        (``source``) or a container image (``image``, `template build --from-image`): a job."""
        peer = peer_of(request)
        _ids((body.name, "template name"))
        if (body.source is None) == (body.image is None):
            raise InvalidArgument("build template: give a source (directory or tarball) or an image, one of them",
                                  op="build template", obj=body.source or body.image or "")
        if body.image is not None:
            ref, path = check_image_ref(body.image, cfg.import_roots)
            image_caller = caller_of(peer, cfg.import_roots)

            return svc.start_job("build template", body.image, peer, calls.build_template_from_image, ref,
                                 body.name, body.size, body.fs_type, body.shared, image_caller, path)
        assert body.source is not None
        src = check_path(body.source, cfg.import_roots, "build template", "import_roots")
        caller = caller_of(peer, cfg.import_roots)

        return svc.start_job("build template", body.source, peer, calls.build_template, src, body.name, body.size,
                             body.fs_type, body.shared, caller)

    @app.post(f"{API}/templates/{{ref}}/verify", status_code=202, response_model=m.JobOut, tags=["templates"],
              responses=ERRORS)
    async def template_verify(request: Request, ref: str) -> JSONResponse:
        """Re-read a template: size, mtime and the full content digest (fails TemplateChanged): a job."""
        validate_id(ref, "template name or id")
        peer = peer_of(request)
        await svc.read(peer, calls.template, ref)  # a 404 now rather than a failed job

        return svc.start_job("verify template", ref, peer, calls.verify_template, ref)

    @app.delete(f"{API}/templates/{{ref}}", response_model=m.Removed, tags=["templates"], responses=ERRORS)
    async def template_remove(request: Request, ref: str) -> JSONResponse:
        """Remove a template (refused with 409 while volumes use it)."""
        validate_id(ref, "template name or id")
        return J(await svc.call("remove template", ref, peer_of(request), calls.remove_template, ref))

    @app.post(f"{API}/templates/{{ref}}/chown", response_model=m.TemplateOut, tags=["templates"], responses=ERRORS)
    async def template_chown(request: Request, ref: str, body: m.TemplateChownIn) -> JSONResponse:
        """Hand a template to another owner and/or mark it shared (usable by every caller) or
        not: root only (403 otherwise)."""
        validate_id(ref, "template name or id")
        return J(await svc.call("chown template", ref, peer_of(request), calls.chown_template, ref, body.owner,
                                body.shared))

    # -- templates in an object store (docs/remote.md) ------------------------------------

    @app.post(f"{API}/templates/{{ref}}/push", status_code=202, response_model=m.JobOut, tags=["remote"],
              responses=ERRORS)
    async def template_push(request: Request, ref: str, body: m.PushIn | None = Body(None)) -> JSONResponse:
        """Push a template the caller may use to the object store as content-addressed chunks
        (only those the bucket lacks, then the manifest): a job; its result is the push's report.
        A cancelled push leaves at most chunks, never a manifest without its chunks."""
        body = body or m.PushIn()
        validate_id(ref, "template name or id")
        _location(body.to, "push template")
        peer = peer_of(request)
        await svc.read(peer, calls.template, ref)  # a 404 now rather than a failed job

        return svc.start_job("push template", ref, peer, calls.push_template, ref, body.to)

    @app.post(f"{API}/templates/pull", status_code=202, response_model=m.JobOut, tags=["remote"],
              responses=ERRORS)
    async def template_pull(request: Request, body: m.PullIn) -> JSONResponse:
        """Pull a template from the object store into this store (every chunk and the whole
        image checked, registered like an import, the caller's): a job; its result is the
        template. A cancelled pull leaves nothing (no template, no staging file)."""
        _ids((body.name, "template name"))
        check_source(body.source)
        _location(body.at, "pull template")
        return svc.start_job("pull template", body.source, peer_of(request), calls.pull_template, body.source,
                             body.name, body.at)

    @app.get(f"{API}/remote/templates", response_model=m.RemoteTemplateList, tags=["remote"], responses=ERRORS)
    async def remote_templates(request: Request, at: str | None = Query(
            None, max_length=600, description="s3://BUCKET[/PREFIX] (default: the remote config's location)")
                               ) -> JSONResponse:
        """Every template in the object store (`template ls --remote`): its manifest's summary,
        its URL and whether this store has it."""
        _location(at, "list remote templates")
        return J(await svc.read(peer_of(request), calls.remote_templates, at))

    @app.get(f"{API}/lazy-templates", response_model=m.LazyList, tags=["remote"], responses=ERRORS)
    async def lazy_templates(request: Request) -> JSONResponse:
        """The lazy templates on this host (`template ls --lazy`): cached bytes, served or not,
        the server's counters."""
        return J(await svc.read(peer_of(request), calls.lazy_templates))

    @app.post(f"{API}/lazy-templates", status_code=202, response_model=m.JobOut, tags=["remote"], responses=ERRORS)
    async def lazy_template(request: Request, body: m.LazyIn) -> JSONResponse:
        """Serve a template of the object store lazily on this host (`template pull --lazy`):
        its manifest fetched, its cache made, its nbdkit started; with ``prefetch`` the cache
        filled, the recorded read order first. The template is registered in the store, the
        caller's (``name`` names it), unless the store has that content already. A job; its
        result is the lazy template (its NBD ``url``, its ``id``)."""
        _ids((body.name, "template name"))
        check_source(body.source, "serve lazy template")
        _location(body.at, "serve lazy template")
        return svc.start_job("serve lazy template", body.source, peer_of(request), calls.lazy_template,
                             body.source, body.name, body.at, body.bound, body.prefetch)

    @app.post(f"{API}/lazy-templates/{{manifest}}/record-order", response_model=m.OrderOut, tags=["remote"],
              responses=ERRORS)
    async def lazy_record_order(request: Request, manifest: str) -> JSONResponse:
        """Upload the order this host fetched the lazy template's chunks in as its manifest's
        sidecar (`template record-order`): other hosts prefetch in that order. Root only."""
        _manifest(manifest, "record read order")
        return J(await svc.call("record read order", manifest, peer_of(request), calls.record_read_order, manifest))

    @app.post(f"{API}/lazy-templates/{{manifest}}/stop", response_model=m.StopOut, tags=["remote"],
              responses=ERRORS)
    async def lazy_stop(request: Request, manifest: str) -> JSONResponse:
        """Stop serving a lazy template (its cache stays for the next start). Root only."""
        _manifest(manifest, "stop lazy template")
        return J(await svc.call("stop lazy template", manifest, peer_of(request), calls.stop_lazy_template,
                                manifest))

    # -- volumes -----------------------------------------------------------------------

    @app.get(f"{API}/volumes", response_model=m.VolumeList, tags=["volumes"], responses=ERRORS)
    async def volumes_list(request: Request, template: str | None = Query(
            None, description="Only volumes of this template")) -> JSONResponse:
        """Every volume the caller owns (root: every volume)."""
        if template is not None:
            validate_id(template, "template name or id")
        return J(await svc.read(peer_of(request), calls.volumes, template))

    @app.post(f"{API}/volumes", status_code=201, response_model=m.VolumeOut, tags=["volumes"], responses=ERRORS)
    async def volume_create(request: Request, body: m.CreateIn) -> Response:
        """Create a volume over a template, attached, with its stable link."""
        return await svc.create(peer_of(request), body)

    @app.get(f"{API}/volumes/{{vid}}", response_model=m.VolumeOut, tags=["volumes"], responses=ERRORS)
    async def volume_get(request: Request, vid: str) -> JSONResponse:
        """One volume (404 for another owner's, as for a missing one)."""
        validate_id(vid)
        return J(await svc.read(peer_of(request), calls.volume, vid))

    @app.delete(f"{API}/volumes/{{vid}}", response_model=m.Removed, tags=["volumes"], responses=ERRORS)
    async def volume_remove(request: Request, vid: str, deadline: float = Query(5.0, ge=0, le=300, description=(
            "Seconds to wait for a briefly busy device"))) -> Response:
        """Detach and delete a volume and its data (409 InUse while a VM holds it)."""
        return await svc.remove(peer_of(request), vid, deadline)

    @app.get(f"{API}/volumes/{{vid}}/usage", response_model=m.UsageOut, tags=["volumes"], responses=ERRORS)
    async def volume_usage(request: Request, vid: str) -> JSONResponse:
        """What the volume costs on disk (real allocation; COW fill on dm-snapshot)."""
        validate_id(vid)
        return J(await svc.read(peer_of(request), calls.usage, vid))

    @app.post(f"{API}/volumes/{{vid}}/chown", response_model=m.VolumeOut, tags=["volumes"], responses=ERRORS)
    async def volume_chown(request: Request, vid: str, body: m.ChownIn) -> JSONResponse:
        """Hand a volume to another owner (uid): root only (403 otherwise)."""
        validate_id(vid)
        return J(await svc.call("chown", vid, peer_of(request), calls.chown_volume, vid, body.owner))

    @app.post(f"{API}/volumes/{{vid}}/checkpoint", response_model=m.VolumeOut, tags=["volumes"],
              responses=ERRORS)
    async def volume_checkpoint(request: Request, vid: str, deadline: float = Query(5.0, ge=0, le=300)
                                ) -> JSONResponse:
        """Detach a volume and keep its data (pause or stop the VM first)."""
        validate_id(vid)
        return J(await svc.call("checkpoint", vid, peer_of(request), calls.checkpoint, vid, deadline))

    @app.post(f"{API}/volumes/{{vid}}/restore", response_model=m.VolumeOut, tags=["volumes"], responses=ERRORS)
    async def volume_restore(request: Request, vid: str, body: m.RestoreIn | None = Body(None)) -> JSONResponse:
        """Attach a checkpointed volume again, in place or as a new volume ``new_id``."""
        body = body or m.RestoreIn(new_id=None, retarget_source_link=True, adopt=False, steal=False)
        _ids((vid, "volume id"), (body.new_id, "new volume id"))
        op = "restore" if body.new_id in (None, vid) else "restore-as"
        return J(await svc.call(op, vid if op == "restore" else f"{vid} as {body.new_id}", peer_of(request),
                                calls.restore, vid, body.new_id, body.retarget_source_link, body.adopt, body.steal))

    @app.post(f"{API}/volumes/{{vid}}/adopt", status_code=201, response_model=m.VolumeOut, tags=["volumes"],
              responses=ERRORS)
    async def volume_adopt(request: Request, vid: str, body: m.AdoptIn | None = Body(None)) -> JSONResponse:
        """rbd: register a checkpointed volume another store made in the shared pool (this store
        becomes its owner; nothing is copied). 409 naming the holder's store and host while
        another store holds it attached, unless ``steal`` (fencing)."""
        body = body or m.AdoptIn(steal=False)
        validate_id(vid)
        return J(await svc.call("adopt", vid, peer_of(request), calls.adopt, vid, body.steal), 201)

    @app.get(f"{API}/shared/volumes", response_model=m.SharedVolumeList, tags=["volumes"], responses=ERRORS)
    async def shared_volumes(request: Request) -> JSONResponse:
        """rbd: every volume in the shared pool and namespace, whichever store made it, with its
        owner, holder and open clients."""
        return J(await svc.read(peer_of(request), calls.shared_volumes))

    @app.post(f"{API}/volumes/{{vid}}/fork", status_code=202, response_model=m.JobOut, tags=["volumes"],
              responses=ERRORS)
    async def volume_fork(request: Request, vid: str, body: m.ForkIn) -> JSONResponse:
        """New volumes that all start from this volume's contents at one instant (``new_ids``,
        or ``count`` named ``<prefix><n>``): a job. Cancelling it undoes the whole fork."""
        validate_id(vid)
        ids = fork_ids(vid, body.new_ids, body.count, body.prefix)  # a 400 now rather than a failed job
        peer = peer_of(request)
        await svc.read(peer, calls.volume, vid)  # a 404 now rather than a failed job

        return svc.start_job("fork", vid, peer, calls.fork, vid, ids, body.reset_identity, body.hostname_prefix)

    @app.post(f"{API}/volumes/{{vid}}/flatten", status_code=202, response_model=m.JobOut, tags=["volumes"],
              responses=ERRORS)
    async def volume_flatten(request: Request, vid: str, body: m.FlattenIn | None = Body(None)) -> JSONResponse:
        """Materialise a volume (template + its changes) as a new template: a job."""
        body = body or m.FlattenIn()
        _ids((vid, "volume id"), (body.name, "template name"))
        peer = peer_of(request)
        await svc.read(peer, calls.volume, vid)

        return svc.start_job("flatten", vid, peer, calls.flatten, vid, body.name)

    @app.post(f"{API}/volumes/{{vid}}/jail", response_model=m.JailOut, tags=["volumes"], responses=ERRORS)
    async def volume_jail(request: Request, vid: str, body: m.JailIn) -> JSONResponse:
        """Stage an attached volume inside a jail directory under the daemon's jail_roots."""
        validate_id(vid)
        peer = peer_of(request)
        if not body.name or "/" in body.name or body.name in (".", "..") or "\0" in body.name:
            raise InvalidArgument(f"invalid jail file name {body.name!r}", op="jail", obj=repr(body.name),
                                  hint="a plain file name, no '/'")
        jdir = check_path(body.dir, cfg.jail_roots, "jail volume", "jail_roots")
        check_jail_ids(peer, body.uid, body.gid)
        return J(await svc.call("jail", vid, peer, calls.jail, vid, jdir, body.name, body.uid, body.gid,
                                caller_of(peer, cfg.jail_roots)))

    @app.get(f"{API}/volumes/{{vid}}/drive", response_model=m.DriveOut, tags=["volumes"], responses=ERRORS)
    async def volume_drive(request: Request, vid: str, format: Literal[drive_mod.FORMATS] = Query(  # type: ignore[valid-type]
                               description="The VMM and form, as `cowdisk volume drive --format`"),
                           readonly: bool = False, drive_id: str | None = None, cache: str | None = None,
                           io_engine: str | None = None, iops: int | None = Query(None, gt=0),
                           bandwidth: Size | None = Query(None, description="bytes/s, or with a unit (50M)"),
                           machine: str | None = Query(None, description="QEMU only: q35, pc or microvm"),
                           jail_path: str | None = Query(None, description="Firecracker only: the path in the jail")
                           ) -> JSONResponse:
        """A VMM's drive configuration for the volume's stable link (`cowdisk volume drive --json`)."""
        validate_id(vid)
        v = await svc.read(peer_of(request), calls.volume, vid)
        opts = drive_mod.DriveOptions(read_only=readonly, drive_id=drive_id, cache=cache, io_engine=io_engine,
                                      iops=iops, bandwidth=bandwidth, machine=machine, jail_path=jail_path)
        try:
            config, text = drive_mod.for_link(format, v["link"], opts,
                                              backend_block_device=bool(store.backend.block_device))
        except ValueError as e:
            raise InvalidArgument(f"volume drive {vid}: {e}", op="volume drive", obj=vid,
                                  hint=f"formats: {', '.join(drive_mod.FORMATS)}") from None
        return J({"volume": vid, "format": format, "path": v["link"], "state": str(v["state"]), "config": config,
                  "text": text})

    # Routes are tried in order, about 2 us each: the hot ones first (a create was tried
    # against 16 routes before its own).
    hot = {(f"{API}/volumes", "POST"), (f"{API}/volumes/{{vid}}", "DELETE"), (f"{API}/volumes/{{vid}}", "GET"),
           (f"{API}/volumes/{{vid}}/checkpoint", "POST"), (f"{API}/volumes/{{vid}}/restore", "POST")}
    app.router.routes.sort(key=lambda r: not any((getattr(r, "path", ""), meth) in hot
                                                 for meth in getattr(r, "methods", None) or ()))
    return app


def asgi_app(svc: Service) -> tuple[ASGIApp, FastAPI]:
    """What uvicorn serves: the allowlist (:class:`PeerGate`) first, then :class:`Direct`,
    then FastAPI with every endpoint (and its own middleware stack: error handling,
    telemetry, the body limit), which a plain create or remove never enters. Also the
    FastAPI app itself (its router runs the lifespan)."""
    app = create_app(svc)
    return PeerGate(Direct(app, svc), svc.cfg), app
