"""The daemon's life: one instance per store, recover, listen, tell systemd, stop cleanly.

Start, in order:

1. take ``<root>/locks/daemon.lock`` (flock, no wait): a second daemon on the same store
   is refused with the PID of the one that runs; a socket path another live daemon
   answers on is refused the same way (its PID from SO_PEERCRED);
2. fork the store worker processes (:mod:`.workers`; before this process opens the
   store or starts a thread), then open the store and run recovery, before anything can
   call (so no client ever sees a half-made volume of a killed daemon: recovery rolls it
   back or finishes it first); then each worker opens its own Store;
4. bind the unix socket (created 0600 under a umask, then given ``socket_group`` and
   ``socket_mode``; root-only when the group does not exist); no TCP listener exists;
5. serve (uvicorn, its HTTP protocol subclassed to put the caller's SO_PEERCRED into
   each request), then ``READY=1`` to systemd (``Type=notify``; nothing when
   ``NOTIFY_SOCKET`` is unset).

SIGTERM or SIGINT: ``STOPPING=1``, the socket stops accepting (and its file goes),
long-polls of jobs return at once, in-flight requests finish (``shutdown_timeout``
bound, after which uvicorn cancels them: their store call still ends in its thread or
leaves an intent that the next start's recovery completes), running jobs get the same
bound and are then cancelled (they undo themselves), the store workers end their last
call and exit (SIGKILL after the same bound), the store is closed, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import signal
import socket
import threading
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

import anyio.to_thread
import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp

from ..errors import CowdiskError, KernelError, LockTimeout
from ..kernel import procfs
from ..locks import FileLock
from ..model import SpaceEvent
from ..store import Store, modes
from .api import Service, asgi_app
from .config import Config
from .logs import in_background, setup_logging
from .metrics import Metrics
from .workers import Pool, one_malloc_arena
from .security import peercred

log = logging.getLogger("cowdisk.daemon")

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Http
except ImportError:  # httptools missing: the pure-Python parser (slower, same behaviour)
    from uvicorn.protocols.http.h11_impl import H11Protocol as _Http  # type: ignore[assignment]


class PeerCredProtocol(_Http):
    """uvicorn's HTTP protocol, with the connection's SO_PEERCRED in every request's
    ``scope["state"]["peer"]`` (read once per connection, from the kernel)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        peer = peercred(sock) if sock is not None else None
        self.app_state = {**self.app_state, "peer": peer}


def sd_notify(message: str) -> bool:
    """Send ``message`` to systemd's notify socket; False when there is none."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError as e:
        log.warning("sd_notify %r: %s", message, e)
        return False


def socket_owner(path: str) -> int | None:
    """The PID of the live process answering on unix socket ``path`` (SO_PEERCRED), else None."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except OSError:
            return None
        return peercred(s).pid or None


INSTANCE_WAIT = 2.0
"""Seconds a start waits for the instance lock: the workers of a daemon killed -9 hold it
until the kernel has delivered their PR_SET_PDEATHSIG."""


def take_instance_lock(cfg: Config) -> FileLock:
    os.makedirs(os.path.join(cfg.root, "locks"), exist_ok=True)
    path = os.path.join(cfg.root, "locks", "daemon.lock")
    # the wait: the store workers of a daemon just killed are dying with it
    lock = FileLock(path, timeout=INSTANCE_WAIT, what=f"daemon of store {cfg.root}", pid_hint=True)
    try:
        lock.acquire()
    except LockTimeout:
        holders = [p for p, _ in procfs.lock_holders(path)]
        who = ", ".join(f"PID {p} ({procfs.cmdline(p) or '?'})" for p in holders) or "another process"
        raise CowdiskError(f"a cowdiskd already serves store {cfg.root}: {who}", op="start daemon", obj=cfg.root,
                           hint=f"stop it first (kill -TERM {holders[0] if holders else 'PID'}), or use its "
                                "socket") from None
    return lock


def bind_socket(cfg: Config) -> socket.socket:
    path = cfg.socket
    d = os.path.dirname(path)
    os.makedirs(d, mode=0o755, exist_ok=True)
    if os.path.lexists(path):
        pid = socket_owner(path)
        if pid is not None:
            raise CowdiskError(f"socket {path} is served by a running process: PID {pid} "
                               f"({procfs.cmdline(pid) or '?'})", op="start daemon", obj=path,
                               hint="stop that daemon, or give this one another --socket")
        os.unlink(path)  # stale: its daemon is gone
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        s.bind(path)
    except OSError as e:
        s.close()
        raise KernelError.from_oserror("bind socket", path, e) from None
    finally:
        os.umask(old)
    mode = cfg.socket_mode
    try:
        gid = grp.getgrnam(cfg.socket_group).gr_gid if cfg.socket_group else None
    except KeyError:
        gid = None
    if gid is None:
        mode &= ~0o070  # no such group: no group access (the default 0660 becomes owner-only 0600)
        log.info("group %r does not exist: socket %s is %04o, no group access", cfg.socket_group, path, mode)
    else:
        os.chown(path, -1, gid)
    os.chmod(path, mode)
    s.listen(1024)
    return s


def make_incoming(cfg: Config) -> None:
    """The default import root (``<root>/incoming``) exists, writable by the socket's group
    (then the store root is 0711: searchable, not listable, so that the group reaches it)."""
    d = os.path.join(cfg.root, "incoming")
    if d not in cfg.import_roots or os.path.isdir(d):
        return
    os.makedirs(d, mode=0o700, exist_ok=True)
    with contextlib.suppress(KeyError, OSError):
        gid = grp.getgrnam(cfg.socket_group).gr_gid
        os.chown(d, -1, gid)
        os.chmod(d, 0o2770)
        modes.search_only_root(cfg.root)


class Server(uvicorn.Server):
    """uvicorn's server, telling systemd when it is ready and waking job waiters at stop."""

    def __init__(self, config: uvicorn.Config, svc: Service) -> None:
        super().__init__(config)
        self.svc = svc
        self.stop_signal: int | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            s = self.svc.store
            sd_notify(f"READY=1\nSTATUS=serving {s.root} ({s.backend_name}) on {self.svc.cfg.socket}\n"
                      f"MAINPID={os.getpid()}")
            log.info("ready", extra={"fields": {"pid": os.getpid(), "socket": self.svc.cfg.socket}})

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.stop_signal = sig
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        log.info("stopping", extra={"fields": {"signal": self.stop_signal,
                                               "jobs_running": len(self.svc.jobs.running())}})
        sd_notify("STOPPING=1")
        self.svc.stopping = True
        self.svc.pool.closing = True  # no new store worker from here on
        self.svc.jobs.stop_accepting()
        with contextlib.suppress(OSError):
            os.unlink(self.svc.cfg.socket)  # new clients fail at once (ENOENT), not after a wait
        await super().shutdown(sockets=sockets)


def build(cfg: Config, store: Store, metrics: Metrics, pool: Pool) -> tuple[ASGIApp, Service]:
    svc = Service(store, cfg, metrics, pool)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = cfg.workers
        yield
        left = await asyncio.get_running_loop().run_in_executor(None, svc.jobs.shutdown, cfg.shutdown_timeout)
        if left:
            log.warning("jobs still running at exit: %s; the next start's recovery completes them", left)
        killed = await asyncio.get_running_loop().run_in_executor(None, pool.close, cfg.shutdown_timeout)
        if killed:
            log.warning("store workers killed at exit: %s; the next start's recovery completes their calls",
                        killed)

    outer, app = asgi_app(svc)
    app.router.lifespan_context = lifespan
    metrics.attach(store, svc.jobs, pool)
    return outer, svc


def watch_space(store: Store, metrics: Metrics, stop: threading.Event) -> None:
    """The store's space monitor (dm-thin: the pool's dm event), in a thread of its own:
    each event logged (which pool, which volumes, why) and counted in the metrics."""
    def notify(ev: SpaceEvent) -> None:
        metrics.space_event(ev)
        level = logging.WARNING if ev.event in ("full", "failing_io") else logging.INFO
        log.log(level, "space %s: %s", ev.event, ev.pool, extra={"fields": ev.as_dict()})

    try:
        if store.watch_space(notify, stop):
            log.info("space monitor ended", extra={"fields": {"root": store.root}})
    except Exception as e:  # noqa: BLE001 (said; the daemon serves on, growth at operations still works)
        log.error("space monitor failed: %s", e, exc_info=True)


def keep_lazy_served(store: Store, interval: float, stop: threading.Event) -> None:
    """The daemon's periodic look at its lazy templates (``Store.keep_lazy_served``, every
    ``interval`` seconds): one whose keeper was killed is served again, logged."""
    while interval and not stop.wait(interval):
        try:
            for note in store.keep_lazy_served():
                log.warning("%s", note, extra={"fields": {"root": store.root}})
        except Exception as e:  # noqa: BLE001 (said; tried again at the next look)
            log.error("keeping lazy templates served: %s", e, exc_info=True)


def run(cfg: Config) -> int:
    """Run the daemon until SIGTERM/SIGINT; 0 on a clean stop."""
    setup_logging(cfg)
    # the signals that stop us must not kill us before the store is closed: uvicorn
    # re-raises the captured signal after serving, into these handlers
    early: list[int] = []  # a stop asked for during recovery: honoured before serving
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda n, _f: early.append(n))
    t0 = time.monotonic()
    lock = take_instance_lock(cfg)
    pool = Pool(cfg, keep_fds=(lock.fd,))
    stop_logging: Callable[[], None] = lambda: None  # noqa: E731
    watching = threading.Event()  # set at stop; the monitor is a daemon thread: it never holds up the exit
    try:
        pool.fork()
        one_malloc_arena()  # the daemon's threads (log writer, jobs) too
        stop_logging = in_background()  # after the fork: no thread exists before it
        store = Store(cfg.root, backend=cfg.backend, recover=False, lock_timeout=cfg.lock_timeout,
                      limits=cfg.store_limits())
        store.daemon = os.getpid()
        try:
            metrics = Metrics()
            rep = store.recover()
            metrics.recovered(rep)
            pool.open(store)
            app, svc = build(cfg, store, metrics, pool)
            svc.recovery = rep.as_dict()
            log.info("recovered store %s", store.root, extra={"fields": {
                "root": store.root, "backend": store.backend_name, "recovery": rep.as_dict(),
                "config": cfg.source}})
            make_incoming(cfg)
            threading.Thread(target=watch_space, args=(store, metrics, watching), name="cowdisk-space",
                             daemon=True).start()
            threading.Thread(target=keep_lazy_served, args=(store, cfg.lazy_keep_interval, watching),
                             name="cowdisk-lazy-keep", daemon=True).start()
            if early:
                log.info("stopped before serving", extra={"fields": {"signal": early[0]}})
                return 0
            sock = bind_socket(cfg)
            try:
                server = Server(uvicorn.Config(
                    app, http=PeerCredProtocol, lifespan="on", log_config=None, access_log=False,
                    proxy_headers=False,  # a unix socket: no proxy in front, no forwarded headers to read
                    timeout_graceful_shutdown=int(cfg.shutdown_timeout) or 1, timeout_keep_alive=30,
                    server_header=False, date_header=False), svc)
                log.info("listening", extra={"fields": {"socket": cfg.socket, "store_workers": pool.pids(),
                                                         "start_ms": round((time.monotonic() - t0) * 1000, 1)}})
                server.run(sockets=[sock])
            finally:
                sock.close()
                with contextlib.suppress(FileNotFoundError):
                    if socket_owner(cfg.socket) is None:
                        os.unlink(cfg.socket)
        finally:
            watching.set()
            store.close()
    finally:
        pool.close(cfg.shutdown_timeout)  # (a no-op after a normal stop: the lifespan closed it)
        lock.release()
        log.info("stopped", extra={"fields": {"pid": os.getpid()}})
        stop_logging()
    return 0


def check(cfg: Config) -> list[str]:
    """What ``--check-config`` reports besides the parsed settings: problems that would stop a start."""
    problems = []
    if os.path.exists(cfg.root) and not os.path.isdir(cfg.root):
        problems.append(f"root {cfg.root} is not a directory")
    if os.path.lexists(cfg.socket):
        pid = socket_owner(cfg.socket)
        if pid is not None:
            problems.append(f"socket {cfg.socket} is served by PID {pid} ({procfs.cmdline(pid) or '?'})")
    for r in cfg.jail_roots:
        if not os.path.isdir(r):
            problems.append(f"jail root {r} does not exist")
    try:
        if cfg.socket_group:
            grp.getgrnam(cfg.socket_group)
    except KeyError:
        problems.append(f"note: group {cfg.socket_group!r} does not exist: the socket will be owner-only")
    return problems


__all__ = ["run", "check", "sd_notify"]
