"""A client of cowdiskd: the :class:`~cowdisk.store.Store` API over the daemon's unix socket.

``Client`` has the Store's method names, arguments and return types (``Volume``,
``Template``, ``Usage``, ``RecoveryReport``) and raises the same error types
(``NotFound``, ``InUse``..., rebuilt from the daemon's error document), so code written
against the library runs against the daemon by swapping the object::

    from cowdisk.client import Client

    with Client("/run/cowdisk/cowdisk.sock") as c:     # or COWDISK_SOCKET
        c.create_volume("sandbox-1", "base")
        c.checkpoint("sandbox-1")
        c.restore("sandbox-1", "sandbox-2")

Long operations (template import, build and verify, push and pull, fork, flatten) run as
jobs in the daemon; the client waits for them (long-polling ``/v1/jobs/{id}``), feeds their progress
to ``progress`` as the library would, and cancels the job if the wait is interrupted
(KeyboardInterrupt, or an exception raised by ``progress``).

It implements :class:`cowdisk.contract.StoreAPI`, as :class:`~cowdisk.store.Store`
does. It uses only the standard library (its own HTTP/1.1 over ``AF_UNIX``, one
keep-alive connection per thread) and imports only the contract, the model and the
errors (none of the store, the registry, SQLite or the daemon), so it imports in a few
milliseconds (``bench/startup.py``) and needs none of the daemon's dependencies. Paths in requests are the daemon's: an import source must lie
under its ``import_roots``, a jail directory under its ``jail_roots``.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Self

import _socket  # socket.py's enum conversions cost ~3 ms at import; a unix socket needs none of them

from .contract import API, DEFAULT_SOCKET, IMAGE_TRANSPORTS, LOCK_TIMEOUT_HEADER, check_backend
from .errors import CowdiskError, Unavailable, error_from_document
from .model import RecoveryReport, SharedVolume, Space, Template, Usage, Volume, VolumeState
from .progress import Progress

if TYPE_CHECKING:
    from .contract import StoreAPI

IDLE_RECONNECT = 10.0
"""Seconds after which an idle keep-alive connection is not trusted (the daemon closes at 30)."""


class ProtocolError(ConnectionError):
    """The daemon's answer is not HTTP/1.x as this client reads it, or the connection closed
    in the middle of it."""


def default_socket() -> str:
    return os.environ.get("COWDISK_SOCKET") or DEFAULT_SOCKET


class _Conn:
    """One HTTP/1.1 keep-alive connection over a unix socket: a minimal client (the daemon
    always answers with Content-Length), about 140 us cheaper per call than http.client."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self.sock: _socket.socket | None = None
        self.used = 0.0

    def connect(self) -> None:
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except OSError:
            s.close()
            raise
        self.sock = s

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def request(self, method: str, path: str, body: bytes | None, extra: str = "") -> tuple[int, bytes, bool]:
        """Send one request (``extra``: more header lines), read its answer: (status, body,
        whether the server closes)."""
        if self.sock is None:
            self.connect()
        assert self.sock is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: cowdisk\r\n{extra}"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        elif method in ("POST", "PUT", "DELETE"):
            head += "Content-Length: 0\r\n"
        data = (head + "\r\n").encode() + (body or b"")
        self.sock.sendall(data)
        buf = b""
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ProtocolError("the daemon closed the connection without an answer")
            buf += chunk
        lines = buf[:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ProtocolError(f"not an HTTP/1.x status line: {lines[0]!r:.80}")
        status = int(parts[1])
        length = -1
        close = parts[0] == "HTTP/1.0"
        chunked = False
        for line in lines[1:]:
            k, _, v = line.partition(":")
            k = k.strip().lower()
            if k == "content-length":
                length = int(v)
            elif k == "connection":
                close = v.strip().lower() == "close"
            elif k == "transfer-encoding":
                chunked = "chunked" in v.lower()
        rest = buf[end + 4:]
        if chunked:
            payload = self._chunked(rest)
        elif length >= 0:
            while len(rest) < length:
                chunk = self.sock.recv(max(65536, length - len(rest)))
                if not chunk:
                    raise ProtocolError(f"the answer ended {length - len(rest)} bytes short")
                rest += chunk
            payload = rest[:length]
        else:  # no length: the body runs to the end of the connection
            while chunk := self.sock.recv(65536):
                rest += chunk
            payload, close = rest, True
        return status, payload, close

    def _chunked(self, rest: bytes) -> bytes:
        assert self.sock is not None
        out = b""
        while True:
            while b"\r\n" not in rest:
                rest += self._recv()
            line, _, rest = rest.partition(b"\r\n")
            n = int(line.split(b";")[0], 16)
            while len(rest) < n + 2:
                rest += self._recv()
            if n == 0:
                return out
            out += rest[:n]
            rest = rest[n + 2:]

    def _recv(self) -> bytes:
        assert self.sock is not None
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ProtocolError("a chunked answer ended early")
        return chunk


@functools.cache
def _names(cls: type) -> frozenset[str]:
    return frozenset(cls._fields)  # type: ignore[attr-defined]  # the model's named tuples and RecoveryReport


def _pick(cls: type, d: Mapping[str, Any]) -> dict[str, Any]:
    names = _names(cls)
    return {k: v for k, v in d.items() if k in names}


def to_template(d: Mapping[str, Any]) -> Template:
    kw = _pick(Template, d)
    kw["names"] = tuple(kw.get("names", ()))
    kw["users"] = tuple(kw.get("users", ()))
    return Template(**kw)


def to_volume(d: Mapping[str, Any]) -> Volume:
    kw = _pick(Volume, d)
    kw["state"] = VolumeState(kw["state"])
    kw["links"] = tuple(kw.get("links", ()))
    return Volume(**kw)


def to_space(d: Mapping[str, Any]) -> Space:
    return Space(**_pick(Space, d))


def to_usage(d: Mapping[str, Any]) -> Usage:
    return Usage(**_pick(Usage, d))


def to_report(d: Mapping[str, Any]) -> RecoveryReport:
    return RecoveryReport(**_pick(RecoveryReport, d))


class Client:
    """The Store API over cowdiskd's socket (``socket``: default ``COWDISK_SOCKET`` or
    /run/cowdisk/cowdisk.sock). ``timeout`` bounds one request (a job is waited for in
    long-polls of at most 30 s each, without an overall bound)."""

    def __init__(self, socket_path: str | None = None, *, timeout: float = 300.0,
                 lock_timeout: float | None = None) -> None:
        self.socket = socket_path or default_socket()
        self.timeout = timeout
        self.lock_timeout = lock_timeout
        """Seconds each call may wait for a lock another caller holds (the daemon's
        ``lock_timeout`` when None): sent with every request."""
        self._local = threading.local()
        self._health: dict[str, Any] | None = None
        self._docs: dict[str, dict[str, Any]] = {}
        """The last template document the daemon sent of each template: what
        :meth:`template_doc` gives for the same template without asking again."""

    # -- plumbing ------------------------------------------------------------------

    def _conn(self) -> _Conn:
        c: _Conn | None = getattr(self._local, "conn", None)
        if c is None:
            c = _Conn(self.socket, self.timeout)
            self._local.conn = c
        elif c.sock is not None and time.monotonic() - c.used > IDLE_RECONNECT:
            c.close()
        return c

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, path: str, body: Any = None, *, query: Mapping[str, Any] | None = None,
             raw: bool = False) -> Any:
        """One request to the API; the decoded JSON answer, or the error it stands for raised."""
        if query:
            q = {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in query.items() if v is not None}
            if q:
                from urllib.parse import urlencode  # here: 1-3 ms of a start where no site module brought it

                path += "?" + urlencode(q)
        data = None if body is None else json.dumps(body).encode()
        extra = "" if self.lock_timeout is None else f"{LOCK_TIMEOUT_HEADER}: {self.lock_timeout:g}\r\n"
        for attempt in (0, 1):
            conn = self._conn()
            reused = conn.sock is not None
            try:
                status, payload, will_close = conn.request(method, path, data, extra)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                conn.close()
                raise Unavailable(f"no cowdiskd answers on {self.socket}: {e.strerror}", op=f"{method} {path}",
                                  obj=self.socket, hint="start it (`cowdisk serve`, or systemctl start cowdisk), "
                                                        "or point COWDISK_SOCKET at its socket") from None
            except (ProtocolError, BrokenPipeError, ConnectionResetError) as e:
                conn.close()
                if attempt == 0 and reused:
                    continue  # the daemon closed an idle keep-alive connection first: once more, fresh
                raise Unavailable(f"cowdiskd on {self.socket} closed the connection: {e}", op=f"{method} {path}",
                                  obj=self.socket, hint="the daemon stopped or was killed; its recovery at "
                                                        "the next start settles the operation") from None
            except OSError as e:
                conn.close()
                raise Unavailable(f"cowdiskd on {self.socket}: {e}", op=f"{method} {path}", obj=self.socket) from None
            conn.used = time.monotonic()
            if will_close:
                conn.close()
            if raw and status < 400:
                return payload.decode()
            try:
                doc = json.loads(payload) if payload else None
            except ValueError:
                doc = {"raw": payload[:200].decode(errors="replace")}
            if status >= 400:
                raise error_from_document(doc if isinstance(doc, dict) else {}, status)
            return doc
        raise AssertionError("unreachable")

    def answers(self, timeout: float = 1.0) -> bool:
        """Whether a daemon answers on the socket now (a health request within ``timeout``)."""
        c = Client(self.socket, timeout=timeout)
        try:
            c.health()
            return True
        except CowdiskError:
            return False
        finally:
            c.close()

    def _job(self, doc: dict[str, Any], progress: Progress | None) -> Any:
        """Wait for the job ``doc`` to end, feeding ``progress``; its result, or its error raised."""
        job_id = doc["id"]
        told: list[tuple[str, int, int]] = []
        """What ``progress`` was told of each stage so far (the stage, its last bytes)."""
        try:
            while True:
                if progress is not None:
                    _feed(progress, told, doc)
                state = doc["state"]
                if state == "succeeded":
                    return doc.get("result")
                if state in ("failed", "cancelled"):
                    raise error_from_document({"error": doc.get("error")}, 500)
                doc = self.call("GET", f"{API}/jobs/{job_id}", query={"wait": 30, "since": doc.get("seq", 0)})
        except BaseException as e:
            if not isinstance(e, CowdiskError):  # interrupted here: cancel it there
                try:
                    self.call("POST", f"{API}/jobs/{job_id}/cancel")
                except CowdiskError:
                    pass
            raise

    # -- the service -----------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        h: dict[str, Any] = self.call("GET", f"{API}/health")
        self._health = h
        return h

    @property
    def root(self) -> str:
        return str((self._health or self.health())["root"])

    @property
    def backend_name(self) -> str:
        return str((self._health or self.health())["backend"])

    @property
    def id(self) -> str:
        """The store's id (its dm devices are named ``cowdisk-<id>-<volume>``)."""
        return str((self._health or self.health())["store_id"])

    @property
    def backend(self) -> "_Backend":
        """What the store's backend is: ``.name`` and ``.block_device`` (a dm device, or a file)."""
        h = self._health or self.health()
        return _Backend(str(h["backend"]), bool(h.get("block_device")), bool(h.get("larger_volumes")))

    def link_path(self, vid: str) -> str:
        """The stable link of volume ``vid`` (whether or not it exists), as the store names it."""
        return os.path.join(self.root, "links", vid, "rootfs")

    def doctor(self) -> dict[str, Any]:
        out: dict[str, Any] = self.call("GET", f"{API}/doctor")
        return out

    def metrics(self) -> str:
        return str(self.call("GET", "/metrics", raw=True))

    def jobs(self) -> list[dict[str, Any]]:
        return list(self.call("GET", f"{API}/jobs")["jobs"])

    def job(self, job_id: str, *, wait: float = 0, since: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = self.call("GET", f"{API}/jobs/{job_id}", query={"wait": wait or None, "since": since})
        return out

    def start_job(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """Start a job without waiting for it (``POST`` to a job endpoint): its document."""
        out: dict[str, Any] = self.call(method, path, body)
        return out

    def cancel(self, job_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self.call("POST", f"{API}/jobs/{job_id}/cancel")
        return out

    def info(self) -> dict[str, Any]:
        """What the store is and holds (``cowdisk store info --json``)."""
        out: dict[str, Any] = self.call("GET", f"{API}/store")
        return out

    def space(self) -> list[Space]:
        return [to_space(s) for s in self.call("GET", f"{API}/store/space")["space"]]

    def destroy_store(self, *, force: bool = False) -> list[str]:
        """Delete the whole store through the daemon, which then stops (it has no store left)."""
        return list(self.call("DELETE", f"{API}/store", query={"force": force})["removed"])

    def recover(self) -> RecoveryReport:
        return to_report(self.call("POST", f"{API}/recover"))

    def gc(self, *, purge: bool = False, older_than_s: float = 86400.0) -> RecoveryReport:
        return to_report(self.call("POST", f"{API}/gc", query={"purge": purge, "older_than": older_than_s}))

    # -- templates -------------------------------------------------------------------

    def _template(self, doc: dict[str, Any]) -> Template:
        t = to_template(doc)
        if len(self._docs) > 1000:
            self._docs.clear()
        self._docs[t.id] = doc
        return t

    def templates(self) -> list[Template]:
        return [self._template(t) for t in self.call("GET", f"{API}/templates")["templates"]]

    def template(self, ref: str) -> Template:
        return self._template(self.call("GET", f"{API}/templates/{_q(ref)}"))

    def template_usage(self, ref: str) -> int:
        return int(self.call("GET", f"{API}/templates/{_q(ref)}")["disk_bytes"] or 0)

    def import_template(self, src: str, name: str | None = None, *, adopt: bool = False,
                        progress: Progress | None = None, shared: bool = False) -> Template:
        doc = self.call("POST", f"{API}/templates/import",
                        {"source": os.path.abspath(src), "name": name, "adopt": adopt, "shared": shared})
        return self._template(self._job(doc, progress))

    def build_template(self, source: str, name: str | None = None, *, size: int | None = None,
                       fs_type: str = "ext4", progress: Progress | None = None, shared: bool = False) -> Template:
        doc = self.call("POST", f"{API}/templates/build",
                        {"source": os.path.abspath(source), "name": name, "size": size, "fs_type": fs_type,
                         "shared": shared})
        return self._template(self._job(doc, progress))

    def build_template_from_image(self, ref: str, name: str | None = None, *, size: int | None = None,
                                  fs_type: str = "ext4", progress: Progress | None = None,
                                  shared: bool = False) -> Template:
        doc = self.call("POST", f"{API}/templates/build",
                        {"image": _abs_image(ref), "name": name, "size": size, "fs_type": fs_type,
                         "shared": shared})
        return self._template(self._job(doc, progress))

    def template_doc(self, t: Template) -> dict[str, Any]:
        """The template as the daemon gives it: its fields and ``disk_bytes`` (the document
        ``t`` came in, or asked for again when ``t`` did not come from this client)."""
        doc = self._docs.get(t.id)
        if doc is None or to_template(doc) != t:
            doc = self.call("GET", f"{API}/templates/{_q(t.id)}")
            assert doc is not None
        return dict(doc)

    def verify_template(self, ref: str, progress: Progress | None = None) -> Template:
        doc = self.call("POST", f"{API}/templates/{_q(ref)}/verify")
        return self._template(self._job(doc, progress))

    def remove_template(self, ref: str) -> None:
        self.call("DELETE", f"{API}/templates/{_q(ref)}")

    def chown_template(self, ref: str, owner: int | None = None, *, shared: bool | None = None) -> Template:
        return self._template(self.call("POST", f"{API}/templates/{_q(ref)}/chown", {"owner": owner, "shared": shared}))

    # -- templates in an object store (docs/remote.md) ------------------------------

    def push_template(self, ref: str, to: str | None = None, *, progress: Progress | None = None) -> dict[str, Any]:
        doc = self.call("POST", f"{API}/templates/{_q(ref)}/push", {"to": to})
        return dict(self._job(doc, progress))

    def pull_template(self, source: str, name: str | None = None, *, at: str | None = None,
                      progress: Progress | None = None) -> Template:
        doc = self.call("POST", f"{API}/templates/pull", {"source": source, "name": name, "at": at})
        return self._template(self._job(doc, progress))

    def remote_templates(self, url: str | None = None) -> list[dict[str, Any]]:
        return list(self.call("GET", f"{API}/remote/templates", query={"at": url})["templates"])

    def lazy_template(self, source: str, name: str | None = None, *, at: str | None = None,
                      bound: float | None = None, prefetch: bool = False,
                      progress: Progress | None = None) -> dict[str, Any]:
        doc = self.call("POST", f"{API}/lazy-templates",
                        {"source": source, "name": name, "at": at, "bound": bound, "prefetch": prefetch})
        return dict(self._job(doc, progress))

    def lazy_templates(self) -> list[dict[str, Any]]:
        return list(self.call("GET", f"{API}/lazy-templates")["templates"])

    def record_read_order(self, manifest_digest: str) -> dict[str, Any]:
        return dict(self.call("POST", f"{API}/lazy-templates/{_q(manifest_digest)}/record-order"))

    def stop_lazy_template(self, manifest_digest: str) -> bool:
        return bool(self.call("POST", f"{API}/lazy-templates/{_q(manifest_digest)}/stop")["stopped"])

    # -- volumes ---------------------------------------------------------------------

    def volumes(self) -> list[Volume]:
        return [to_volume(v) for v in self.call("GET", f"{API}/volumes")["volumes"]]

    def volume(self, vid: str) -> Volume:
        return to_volume(self.call("GET", f"{API}/volumes/{_q(vid)}"))

    def usage(self, vid: str) -> Usage:
        return to_usage(self.call("GET", f"{API}/volumes/{_q(vid)}/usage"))

    def chown_volume(self, vid: str, owner: int) -> Volume:
        return to_volume(self.call("POST", f"{API}/volumes/{_q(vid)}/chown", {"owner": owner}))

    def create_volume(self, vid: str, template: str, *, size: int | None = None, grow_fs: bool = True,
                      progress: Progress | None = None) -> Volume:
        body: dict[str, Any] = {"id": vid, "template": template}
        if size is not None:
            body.update(size=size, grow_fs=grow_fs)
        return to_volume(self.call("POST", f"{API}/volumes", body))

    def remove_volume(self, vid: str, *, deadline_s: float = 5.0) -> None:
        self.call("DELETE", f"{API}/volumes/{_q(vid)}", query={"deadline": deadline_s})

    def checkpoint(self, vid: str, *, deadline_s: float = 5.0) -> Volume:
        return to_volume(self.call("POST", f"{API}/volumes/{_q(vid)}/checkpoint", query={"deadline": deadline_s}))

    def restore(self, vid: str, new_id: str | None = None, *, retarget_source_link: bool = True,
                steal: bool = False, adopt: bool = False, progress: Progress | None = None) -> Volume:
        return to_volume(self.call("POST", f"{API}/volumes/{_q(vid)}/restore",
                                   {"new_id": new_id, "retarget_source_link": retarget_source_link,
                                    "adopt": adopt, "steal": steal}))

    def adopt_volume(self, vid: str, *, steal: bool = False) -> Volume:
        return to_volume(self.call("POST", f"{API}/volumes/{_q(vid)}/adopt", {"steal": steal}))

    def shared_volumes(self) -> list[SharedVolume]:
        return [SharedVolume(v["id"], v["size"], v["template_id"], v["template_digest"], v["template_size"],
                             v["owner"], v["holder"], tuple(v["clients"])) for v in self.call("GET", f"{API}/shared/volumes")["volumes"]]

    def fork(self, vid: str, new_ids: list[str] | tuple[str, ...] = (), *, count: int | None = None,
             prefix: str | None = None, reset_identity: bool = False, hostname_prefix: str | None = None,
             progress: Progress | None = None) -> list[Volume]:
        doc = self.call("POST", f"{API}/volumes/{_q(vid)}/fork",
                        {"new_ids": list(new_ids), "count": count, "prefix": prefix,
                         "reset_identity": reset_identity, "hostname_prefix": hostname_prefix})
        return [to_volume(v) for v in self._job(doc, progress)["volumes"]]

    def flatten(self, vid: str, name: str | None = None, *, progress: Progress | None = None) -> Template:
        doc = self.call("POST", f"{API}/volumes/{_q(vid)}/flatten", {"name": name})
        return self._template(self._job(doc, progress))

    def jail(self, vid: str, jail_dir: str, name: str = "rootfs", *, uid: int | None = None,
             gid: int | None = None) -> str:
        doc = self.call("POST", f"{API}/volumes/{_q(vid)}/jail",
                        {"dir": os.path.abspath(jail_dir), "name": name, "uid": uid, "gid": gid})
        return str(doc["path"])

    def drive(self, vid: str, fmt: str, *, readonly: bool = False, **options: Any) -> dict[str, Any]:
        """The VMM drive configuration document (``cowdisk volume drive --json``)."""
        out: dict[str, Any] = self.call("GET", f"{API}/volumes/{_q(vid)}/drive",
                                        query={"format": fmt, "readonly": readonly, **options})
        return out


class _Backend:
    """:class:`cowdisk.contract.BackendInfo` of a daemon's store."""

    __slots__ = ("name", "block_device", "larger_volumes")

    def __init__(self, name: str, block_device: bool, larger_volumes: bool) -> None:
        self.name = name
        self.block_device = block_device
        self.larger_volumes = larger_volumes


def _feed(progress: Progress, told: list[tuple[str, int, int]], doc: dict[str, Any]) -> None:
    """Tell ``progress`` what job ``doc`` did since ``told``: each new stage, and each stage's
    last byte counts (the job's ``stages``: a stage that ended between two answers still
    gets its final counts), as the library's callback would have heard them."""
    p = doc.get("progress") or {}
    stages = doc.get("stages") or [p]
    for i, st in enumerate(stages):
        stage, done, total = str(st.get("stage", "")), int(st.get("done", 0)), int(st.get("total", 0))
        if i >= len(told) or (i == 0 and stage and not told[0][0]):  # new (the first answer's "no stage
            if i or stage:                                               # yet" was no stage)
                progress(0, 0, stage)
            told[i:] = [(stage, 0, 0)]
        if (done, total) != told[i][1:] and (done or total):
            progress(done, total)
            told[i] = (stage, done, total)


def _q(s: str) -> str:
    from urllib.parse import quote

    return quote(s, safe="")



def _abs_image(ref: str) -> str:
    """An image reference ``[TRANSPORT:]PATH[:TAG]`` with its path made absolute (the daemon
    has another working directory)."""
    head, sep, tail = ref.partition(":")
    if sep and head in IMAGE_TRANSPORTS:
        return f"{head}:{_abs_image(tail)}" if not tail.startswith("/") else ref
    return ref if ref.startswith("/") else os.path.join(os.getcwd(), ref)



def for_root(root: str, say: Callable[[str], None] | None = None, socket_path: str | None = None, *,
             backend: str = "auto", lock_timeout: float | None = None) -> Client | None:
    """A Client when a daemon answers on ``socket_path`` (default ``COWDISK_SOCKET`` or
    /run/cowdisk/cowdisk.sock) and serves the store at ``root``; else None. The command
    line calls this before it opens a store itself; ``say`` is told which it is (``-v``).
    ``backend`` (``--backend``) is refused as opening the store refuses it when the
    store uses another; ``lock_timeout`` bounds each call's lock waits in the daemon."""
    sock = socket_path or default_socket()
    if not os.path.exists(sock):
        if say:
            say(f"no cowdiskd socket at {sock}: opening the store at {root} directly")
        return None
    c = Client(sock, timeout=3600)
    try:
        h = c.health()
    except CowdiskError as e:
        c.close()
        if say:
            say(f"cowdiskd on {sock} does not answer ({e.message}): opening the store at {root} directly")
        return None
    if os.path.realpath(str(h.get("root"))) != os.path.realpath(root):
        c.close()
        if say:
            say(f"cowdiskd on {sock} serves {h.get('root')}, not {root}: opening the store directly")
        return None
    try:
        check_backend(root, str(h.get("backend")), backend)
    except CowdiskError:
        c.close()
        raise
    if say:
        say(f"using cowdiskd (PID {h.get('pid')}) on {sock} for the store at {root}")
    c.lock_timeout = lock_timeout
    return c


if TYPE_CHECKING:
    _contract: type[StoreAPI] = Client  # mypy: the client keeps the store's contract

__all__ = ["Client", "for_root", "default_socket", "to_template", "to_volume", "to_usage", "to_report"]
