"""Store work in several processes: the daemon's event loop speaks HTTP, workers run the store.

One Python process cannot use more than one core for the store's own work (the GIL), so
eight clients on a 2-core host got 0.8-0.9x the operations per second of one. The
daemon therefore runs ``processes`` store worker processes; each opens its own
:class:`~cowdisk.store.Store` on the same root (after the start-up recovery), as the CLI
does beside a running daemon (the per-volume and per-template file locks and the
registry's writer lock keep them apart). The event loop sends a call to the worker
running the fewest, over a socketpair, and awaits the answer without a thread: no thread
hop, no GIL shared with the HTTP parsing. Each worker runs up to ``slots`` calls at once
(the ``workers`` setting spread over the processes), each in a thread of its own, so a
call waiting on a lock or the disk holds up no other; past that, callers wait their turn.

A call is a module-level function (:mod:`.calls`) and its arguments, pickled (by
reference: the function's module and name), run as ``fn(store, *args, **kwargs)``, and
sent with an id; its answer, ``(id, "ok", value, seconds)`` or ``(id, "err", error
document, internal, seconds)`` (``seconds``: the call's own time in the worker, for the
operation's log line), comes back by that id, in any order. The error comes back as the same exception type through
:func:`.protocol.error_from_document`, the daemon's one error model.

A worker that dies during its calls (killed by the OOM killer, a crash point of the tests)
ends each of them with a :class:`~.protocol.WorkerDied` error; before the callers get it,
another worker runs the store's recovery (once for them all), which rolls back or
finishes the dead worker's operations (their intents name the dead PID), and the error
says what recovery did. A new worker takes the dead one's place.

The first workers are forked at start, before the daemon opens the store (SQLite's state
must not cross a fork: a child that inherits an open database gets "locking protocol"
errors) and before any thread exists; they open their own store when the daemon, after
its recovery, sends them the word. A worker that replaces a dead one is started afresh
(``python -m cowdisk.daemon.workers``), as the daemon then has threads and an open store.

Workers are the daemon's children and die with it (``PR_SET_PDEATHSIG``); they keep the
daemon's instance lock open, so a new daemon cannot start on the store before the last
worker of the old one is gone (its recovery must not meet a live intent of a dying
worker). SIGTERM and SIGINT are ignored by workers: the daemon stops them by closing
their sockets once in-flight calls ended; a worker ends its calls, then exits.

``processes = 0`` runs calls in threads of the daemon's own process (one Store), as
before: for hosts where one process is enough.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import ctypes
import gc
import itertools
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Callable, NoReturn, TypeVar

from ..errors import CowdiskError
from ..store import Store
from .config import Config
from .protocol import Cancelled, WorkerDied, error_document, error_from_document

log = logging.getLogger("cowdisk.daemon.workers")

T = TypeVar("T")
Call = Callable[..., Any]

CALL_SCOPE: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("cowdisk_call_scope", default={})
"""The scope of the request being answered (:meth:`cowdisk.store.Store.scoped`'s keywords:
the caller's ``lock_timeout``), set by the API for each request; every store call made for
it runs inside it, in whichever worker."""

NO_RETURN_STAGES = ("publishing",)
"""Stages after which a cancel is no longer honoured (the work would be thrown away half-done)."""

PROGRESS_EVERY = 0.05
"""A worker sends a call's byte counts at most this often (a new stage, and the last bytes, at once)."""


class CallProgress:
    """The :class:`~cowdisk.progress.Progress` a watched store call (a job's) is given where
    it runs: each report goes to ``report``, and once ``cancelled()`` says so the next report
    raises :class:`~cowdisk.errors.Cancelled` inside the store operation, which then undoes
    itself as after any failure (unless it passed a stage of no return)."""

    def __init__(self, report: Callable[[int, int, str], None], cancelled: Callable[[], bool],
                 what: tuple[str, str]) -> None:
        self.report = report
        self.cancelled = cancelled
        self.what = what
        self.no_return = False

    def __call__(self, done: int, total: int, stage: str = "") -> None:
        if stage and stage.startswith(NO_RETURN_STAGES):
            self.no_return = True
        self.report(done, total, stage)
        if not self.no_return and self.cancelled():
            op, obj = self.what
            raise Cancelled(f"{op} {obj}: cancelled", op=op, obj=obj)


class Watch:
    """A job's side of its store call: its progress reports come in through ``report`` (in
    the event loop's thread, or the call's own with ``processes = 0``), and :meth:`cancel`
    (any thread) reaches the call wherever it runs."""

    def __init__(self, report: Callable[[int, int, str], None]) -> None:
        self.report = report
        self.cancelled = False
        self._lock = threading.Lock()
        self._send: Callable[[], None] | None = None

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            send = self._send
        if send is not None:
            send()

    def attach(self, send: Callable[[], None]) -> None:
        """The call is in a worker now: ``send`` tells it to cancel (at once, if it was asked already)."""
        with self._lock:
            self._send = send
            asked = self.cancelled
        if asked:
            send()


_LEN = struct.Struct("!I")
RECOVERY = ("recover", "store after a worker died")
ACTIONS = ("rolled_back", "finished", "reactivated", "orphans_removed", "quarantined", "adopted", "errors")
"""What a WorkerDied error says recovery did (RecoveryReport's fields that count)."""
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
M_ARENA_MAX = -8


class RemoteInternal(Exception):
    """An unexpected (non-cowdisk) exception inside a worker: a bug; its document says which."""

    def __init__(self, doc: dict[str, Any]) -> None:
        super().__init__(doc["error"].get("message", ""))
        self.doc = doc


# -- the worker's side (blocking: a thread per call) -------------------------------------


def _send(sock: socket.socket, obj: Any) -> None:
    sock.sendall(_frame(obj))


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket) -> Any:
    head = _recv_exact(sock, _LEN.size)
    if head is None:
        return None
    body = _recv_exact(sock, _LEN.unpack(head)[0])
    return None if body is None else pickle.loads(body)


def one_malloc_arena() -> None:
    """Have glibc's malloc keep one arena for all of this process's threads (by default each
    thread that allocates gets its own, and a worker's call threads kept ~2 MiB each)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1)


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        libc.prctl(PR_SET_NAME, b"cowdisk-worker", 0, 0, 0)  # what top and ps -o comm show
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the daemon died before the prctl
        os._exit(1)


def _worker(sock: socket.socket, *, configure: bool) -> NoReturn:
    """A worker's life: wait for ``("open", cfg)``, open the store, answer calls until the
    daemon closes the socket. Never returns."""
    code = 0
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        msg = _recv(sock)
        if msg is not None:
            cid, _, cfg, slots = msg
            if configure:
                from .logs import setup_logging

                setup_logging(cfg)
            try:
                store = Store(cfg.root, backend=cfg.backend, recover=False, lock_timeout=cfg.lock_timeout,
                              limits=cfg.store_limits())
                store.daemon = os.getppid()
            except CowdiskError as e:
                _send(sock, (cid, "err", error_document(e), False))
                raise
            _send(sock, (cid, "ok", os.getpid()))
            try:
                _Served(sock, store, slots).run()
            finally:
                store.close()
    except BaseException:  # noqa: BLE001 - logged; the daemon sees the socket close
        log.exception("store worker PID %d failed", os.getpid())
        code = 1
    finally:
        with contextlib.suppress(BaseException):
            logging.shutdown()
        os._exit(code)


def _forked(sock: socket.socket, keep_fds: tuple[int, ...]) -> NoReturn:
    one_malloc_arena()
    gc.freeze()  # the daemon's objects this child inherited are never finalized here
    keep = sorted({0, 1, 2, sock.fileno(), *keep_fds})
    lo = 3
    for fd in keep:  # nothing of the daemon's is this process's to hold, but its instance lock
        if fd >= lo:
            os.closerange(lo, fd)
            lo = fd + 1
    os.closerange(lo, 65536)
    _worker(sock, configure=False)


class _Served:
    """A worker's calls: up to ``slots`` at once, each in a thread of its own (a call that
    waits on a lock or the disk does not hold up the others). The threads take turns at the
    socket: one reads the next call while the others run theirs, and the thread that read a
    call runs it and sends its answer, so no call is handed from one thread to another. A
    thread is added when none is left to read and fewer than ``slots`` exist."""

    def __init__(self, sock: socket.socket, store: Store, slots: int) -> None:
        self.sock = sock
        self.store = store
        self.slots = max(1, slots)
        self.reading = threading.Lock()
        self.sending = threading.Lock()
        self.state = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.cancels: dict[int, threading.Event] = {}
        """The watched calls running here, by id: set when the daemon cancels one."""
        self.free = 0
        """Threads not running a call (reading, or waiting to read)."""
        self.eof = False

    def run(self) -> None:
        """Serve until the daemon closes the socket and every call has answered."""
        with self.state:
            self._add()
        joined = 0
        while True:
            with self.state:
                if joined == len(self.threads):
                    return
                t = self.threads[joined]
            t.join()
            joined += 1

    def _add(self) -> None:
        t = threading.Thread(target=self._loop, name=f"store-call-{len(self.threads)}", daemon=True)
        self.threads.append(t)
        self.free += 1
        t.start()

    def _loop(self) -> None:
        while True:
            with self.reading:
                if self.eof:
                    return
                try:
                    msg = _recv(self.sock)
                except OSError:
                    msg = None
                if msg is None:
                    self.eof = True  # the daemon closed our socket: the others end too
                    return
                if msg[1] == "cancel":  # (cid, "cancel"): a watched call of ours is cancelled
                    with self.state:
                        flag = self.cancels.get(msg[0])
                    if flag is not None:
                        flag.set()
                    continue
                with self.state:
                    self.free -= 1
                    if self.free == 0 and len(self.threads) < self.slots:
                        self._add()
            try:
                self._answer(msg)
            finally:
                with self.state:
                    self.free += 1

    def _answer(self, msg: tuple[Any, ...]) -> None:
        cid, fn, args, kwargs, scope, watched = msg
        out: tuple[Any, ...]
        t0 = time.perf_counter()
        if watched is not None:  # a job's call: its progress goes back, a cancel comes in
            flag = threading.Event()
            with self.state:
                self.cancels[cid] = flag
            kwargs = {**kwargs, "progress": CallProgress(self._progress_sender(cid), flag.is_set, watched)}
        try:
            with self.store.scoped(**scope):
                value = fn(self.store, *args, **kwargs)
            out = (cid, "ok", value, time.perf_counter() - t0)
        except CowdiskError as e:
            out = (cid, "err", error_document(e), False, time.perf_counter() - t0)
        except BaseException as e:  # noqa: BLE001 - a bug: logged here with its traceback
            log.error("internal error in %s", getattr(fn, "__name__", fn), exc_info=e)
            out = (cid, "err", error_document(e), True, time.perf_counter() - t0)
        try:
            data = _frame(out)
        except (pickle.PicklingError, TypeError, AttributeError) as e:  # an answer that cannot travel: a bug
            log.error("answer of %s cannot be sent", getattr(fn, "__name__", fn), exc_info=e)
            data = _frame((cid, "err", error_document(e), True, 0.0))
        if watched is not None:
            with self.state:
                self.cancels.pop(cid, None)
        self._send(data)

    def _send(self, data: bytes) -> None:
        with self.sending:
            try:
                self.sock.sendall(data)
            except OSError:  # the daemon is gone: no one reads it
                pass

    def _progress_sender(self, cid: int) -> Callable[[int, int, str], None]:
        """A call's progress reports as ``(cid, "progress", done, total, stage)`` frames: every
        new stage and the last bytes at once, byte counts at most every :data:`PROGRESS_EVERY` s."""
        last = [0.0]

        def send(done: int, total: int, stage: str) -> None:
            now = time.monotonic()
            if stage or now - last[0] >= PROGRESS_EVERY or (total and done >= total):
                last[0] = now
                self._send(_frame((cid, "progress", done, total, stage)))

        return send


def main(argv: list[str]) -> NoReturn:
    """``python -m cowdisk.daemon.workers FD DAEMON_PID``: a worker started afresh."""
    fd, parent = int(argv[1]), int(argv[2])
    _die_with_parent(parent)
    one_malloc_arena()
    _worker(socket.socket(fileno=fd), configure=True)


# -- the daemon's side ----------------------------------------------------------------------


class Link(asyncio.Protocol):
    """The daemon's end of one worker's socket, in the event loop: calls out, each with an
    id, answers in by id, in any order (the socket stays registered with the loop: no
    syscalls per call but the write and the read)."""

    def __init__(self, freed: Callable[[], None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.pending: dict[int, asyncio.Future[Any] | None] = {}
        """Calls sent and not answered yet; None: the caller went away (the answer is dropped)."""
        self.watchers: dict[int, Callable[[int, int, str], None]] = {}
        """Where the progress reports of a watched call go, by id."""
        self.ids = itertools.count(1)
        self.lost: BaseException | None = None
        self.freed = freed
        """Called when a call ends (answered or lost): the worker can take another."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's is no asyncio.Transport subclass)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= _LEN.size:
            n = _LEN.unpack_from(self.buf)[0]
            if len(self.buf) < _LEN.size + n:
                return
            answer = pickle.loads(memoryview(self.buf)[_LEN.size:_LEN.size + n])
            del self.buf[:_LEN.size + n]
            if answer[1] == "progress":
                watcher = self.watchers.get(answer[0])
                if watcher is not None:
                    try:
                        watcher(*answer[2:])
                    except Exception:  # noqa: BLE001 - a job's bookkeeping must not stop the link
                        log.exception("progress of call %d", answer[0])
                continue
            self.watchers.pop(answer[0], None)
            fut = self.pending.pop(answer[0], None)
            if fut is not None and not fut.done():
                fut.set_result(answer[1:])
            self.freed()

    def cancel(self, cid: int) -> None:
        """Tell the worker to cancel watched call ``cid`` (at its next progress report)."""
        if cid in self.pending and self.transport is not None and not self.transport.is_closing():
            self.transport.write(_frame((cid, "cancel")))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or EOFError("the worker closed its socket")
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if fut is not None and not fut.done():
                fut.set_exception(self.lost)
        self.freed()

    async def call(self, obj: tuple[Any, ...], watch: Watch | None = None) -> Any:
        if self.lost is not None or self.transport is None:
            raise EOFError("the worker is gone")
        cid = next(self.ids)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.pending[cid] = fut
        if watch is not None:
            self.watchers[cid] = watch.report
        self.transport.write(_frame((cid, *obj)))
        if watch is not None:
            def send_cancel() -> None:
                loop.call_soon_threadsafe(self.cancel, cid)

            watch.attach(send_cancel)
        try:
            return await fut
        except asyncio.CancelledError:
            if cid in self.pending:  # still running there: its answer, when it comes, is dropped
                self.pending[cid] = None
            raise


class Worker:
    def __init__(self, pid: int, sock: socket.socket, proc: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self.sock = sock
        self.proc = proc
        self.link: Link | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ready = False
        """Its store is open: it takes calls."""
        self.connecting = asyncio.Lock()
        self.loss: asyncio.Future[str] | None = None
        """Once it died: how it ended (reaped once, for every call it was running)."""
        self.recovery: asyncio.Future[str] | None = None
        """Once it died: what the recovery after it did (run once, for every call it was running)."""

    @property
    def busy(self) -> int:
        """Calls it runs now (including those whose caller went away)."""
        return len(self.link.pending) if self.link is not None else 0

    async def connect(self, freed: Callable[[], None]) -> Link:
        if self.link is None:
            async with self.connecting:  # once: a second transport on the socket would close it
                if self.link is None:
                    self.loop = asyncio.get_running_loop()
                    _, self.link = await self.loop.connect_accepted_socket(lambda: Link(freed), self.sock)
        return self.link

    def close(self) -> None:
        """Close the daemon's end (from the event loop or, at stop, from another thread)."""
        t = self.link.transport if self.link is not None else None
        if t is None:
            self.sock.close()
            return
        loop = self.loop
        try:
            if loop is not None and loop.is_running() and not _in_loop(loop):
                loop.call_soon_threadsafe(t.close)
            else:
                t.close()
        except RuntimeError:  # the loop is closed: the socket goes with the process
            pass

    def reap(self) -> str:
        """Wait for the process to end; how it ended."""
        try:
            if self.proc is not None:
                st = self.proc.wait()
                return f"killed by {signal.Signals(-st).name}" if st < 0 else f"exit code {st}"
            _, st = os.waitpid(self.pid, 0)
        except ChildProcessError:
            return "exit status unknown"
        if os.WIFSIGNALED(st):
            return f"killed by {signal.Signals(os.WTERMSIG(st)).name}"
        return f"exit code {os.WEXITSTATUS(st)}"

    def ended(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is not None
        try:
            return os.waitpid(self.pid, os.WNOHANG)[0] != 0
        except ChildProcessError:
            return True


class Pool:
    """Where the daemon's store calls run: ``processes`` workers, or (0) threads.

    :meth:`fork` before the daemon opens its store, :meth:`open` once it has recovered,
    :meth:`run` from the event loop, :meth:`close` at the end."""

    def __init__(self, cfg: Config, keep_fds: tuple[int, ...] = ()) -> None:
        self.cfg = cfg
        self.keep_fds = keep_fds
        self.size = cfg.processes
        self.store: Store | None = None
        self.workers: dict[int, Worker] = {}
        self.slots = -(-cfg.workers // max(1, self.size))
        """Calls one worker runs at once (``workers`` spread over the processes)."""
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        """Callers waiting for a free slot, in order."""
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._in_threads = 0
        self._lock: asyncio.Lock | None = None
        self.died = 0
        self.closing = False

    # life

    def fork(self) -> None:
        """Fork the workers: before this process opens the store and before any thread exists."""
        for _ in range(self.size):
            parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            parent = os.getpid()
            pid = os.fork()
            if pid == 0:
                parent_sock.close()
                _die_with_parent(parent)
                _forked(child_sock, self.keep_fds)
            child_sock.close()
            self.workers[pid] = Worker(pid, parent_sock)

    def open(self, store: Store) -> None:
        """Have every worker open its store (blocking; before serving). ``store`` is the
        daemon's own: with ``processes = 0`` calls run on it in threads."""
        self.store = store
        if self.size == 0:
            self._threads = concurrent.futures.ThreadPoolExecutor(self.cfg.workers, thread_name_prefix="store")
            return
        for w in self.workers.values():
            _send(w.sock, (0, "open", self.cfg, self.slots))
        for w in list(self.workers.values()):
            w.sock.settimeout(max(60.0, self.cfg.lock_timeout * 2))
            try:
                answer = _recv(w.sock)
            except OSError as e:
                answer = None
                log.error("store worker PID %d: %s", w.pid, e)
            if answer is None or answer[1] != "ok":
                self.close(1.0)
                if answer is not None:
                    raise error_from_document(answer[2])
                raise CowdiskError(f"store worker PID {w.pid} did not open store {self.cfg.root}",
                                   op="start daemon", obj=self.cfg.root, hint="the daemon's log says why")
            w.sock.setblocking(False)
            w.ready = True

    def _spawn(self) -> None:
        """Start a worker afresh in place of one that died (the daemon has threads and an
        open store now: no fork); it joins the idle queue once its store is open."""
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            proc = subprocess.Popen([sys.executable, "-m", "cowdisk.daemon.workers", str(child_sock.fileno()),
                                     str(os.getpid())], pass_fds=(child_sock.fileno(), *self.keep_fds),
                                    stdin=subprocess.DEVNULL)
        except OSError as e:
            parent_sock.close()
            log.error("cannot start a store worker: %s", e)
            return
        finally:
            child_sock.close()
        w = Worker(proc.pid, parent_sock, proc)
        self.workers[w.pid] = w
        asyncio.get_running_loop().create_task(self._join(w))

    async def _join(self, w: Worker) -> None:
        loop = asyncio.get_running_loop()
        try:
            w.sock.setblocking(False)
            answer = await (await w.connect(self._freed)).call(("open", self.cfg, self.slots))
        except (OSError, EOFError) as e:
            answer = ("err", str(e))
        if answer[0] != "ok":
            self.workers.pop(w.pid, None)
            w.close()
            status = await loop.run_in_executor(None, w.reap)
            log.error("a new store worker (PID %d) could not open the store: %s", w.pid, status)
            return
        log.info("store worker PID %d started in place of a dead one", w.pid)
        w.ready = True
        self._freed()

    def pids(self) -> list[int]:
        return sorted(self.workers)

    def calls(self) -> tuple[int, int, int]:
        """(calls running, callers waiting for a slot, slots): for the metrics."""
        if self._threads is not None:
            running = min(self._in_threads, self.cfg.workers)
            return running, self._in_threads - running, self.cfg.workers
        return (sum(w.busy for w in list(self.workers.values())), len(self._waiting),
                self.slots * sum(w.ready for w in list(self.workers.values())))

    def close(self, timeout: float) -> list[int]:
        """Stop every worker (each ends its current call first); SIGKILL those still there
        after ``timeout`` seconds (their intents stay for the next start's recovery).
        Returns the PIDs that had to be killed."""
        self.closing = True
        if self._threads is not None:
            self._threads.shutdown(wait=True)
            return []
        for w in self.workers.values():
            with contextlib.suppress(OSError):
                w.sock.shutdown(socket.SHUT_WR)  # the worker reads EOF, ends its calls, exits
        end = time.monotonic() + timeout
        killed = []
        for w in self.workers.values():
            while not w.ended():
                if time.monotonic() >= end:
                    log.warning("store worker PID %d still busy at exit: killing it", w.pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(w.pid, signal.SIGKILL)
                    killed.append(w.pid)
                    w.reap()
                    break
                time.sleep(0.01)
            w.close()
        self.workers.clear()
        return killed

    # calls

    async def run(self, fn: Call, *args: Any, what: tuple[str, str] = ("", ""), info: dict[str, Any] | None = None,
                  watch: Watch | None = None, scope: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """``fn(store, *args, **kwargs)`` in a worker; its exception, re-raised here.
        ``what`` (op, object) names the call in a WorkerDied error; ``info`` gets the
        call's own seconds in the store (``store_s``) and the worker's PID (``worker``).
        ``watch``: a job's call, given a ``progress`` (:class:`CallProgress`) whose reports
        reach ``watch.report`` and which ``watch.cancel()`` cancels. ``scope``: the caller's
        (default: the request's, :data:`CALL_SCOPE`)."""
        loop = asyncio.get_running_loop()
        if scope is None:
            scope = CALL_SCOPE.get()
        if self._threads is not None:
            store = self.store
            assert store is not None
            if watch is not None:
                w_ = watch
                kwargs["progress"] = CallProgress(w_.report, lambda: w_.cancelled, what)

            def timed() -> Any:
                t0 = time.perf_counter()
                try:
                    with store.scoped(**scope):
                        return fn(store, *args, **kwargs)
                finally:
                    if info is not None:
                        info["store_s"] = time.perf_counter() - t0

            self._in_threads += 1
            try:
                return await loop.run_in_executor(self._threads, timed)
            finally:
                self._in_threads -= 1
        w = await self._take()
        try:
            answer = await (await w.connect(self._freed)).call(
                (fn, args, kwargs, scope, what if watch is not None else None), watch)
        except (ConnectionError, EOFError, OSError) as e:
            await self._lost(w, e, what)
            raise AssertionError("unreachable") from None
        if info is not None:
            info["store_s"] = answer[-1]
            info["worker"] = w.pid
        if answer[0] == "ok":
            return answer[1]
        if answer[2]:
            raise RemoteInternal(answer[1])
        raise error_from_document(answer[1])

    async def _take(self) -> Worker:
        """The ready worker running the fewest calls, once one has a free slot (callers
        wait their turn in order)."""
        w = None if self._waiting else self._best()
        turn = self._waiting.append
        while w is None:
            fut = asyncio.get_running_loop().create_future()
            turn(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._freed()  # woken, but gone: the turn passes on
                else:
                    with contextlib.suppress(ValueError):
                        self._waiting.remove(fut)
                raise
            w = self._best()
            turn = self._waiting.appendleft  # woken first but beaten to it: still first
        return w

    def _best(self) -> Worker | None:
        best: Worker | None = None
        for w in self.workers.values():
            if w.ready and w.busy < self.slots and (best is None or w.busy < best.busy):
                best = w
        return best

    def _freed(self) -> None:
        """Slots may be free (a call ended, a worker joined): wake as many waiting callers."""
        if not self._waiting:  # (every answer comes here: nobody waits, nothing to count)
            return
        free = sum(self.slots - w.busy for w in self.workers.values() if w.ready and w.busy < self.slots)
        while free > 0 and self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_result(None)
                free -= 1

    async def _lost(self, w: Worker, e: BaseException, what: tuple[str, str]) -> None:
        """Worker ``w`` died during a call: reap it, start another and run recovery (once,
        for every call it was running), raise WorkerDied."""
        if w.loss is None:
            w.loss = asyncio.ensure_future(self._bury(w))
        status = await asyncio.shield(w.loss)
        op, obj = what
        log.error("store worker PID %d died during %s %s: %s", w.pid, op, obj, status,
                  extra={"fields": {"worker": w.pid, "op": op, "object": obj, "exit": status}})
        done = "recovery did not run: the daemon is stopping; the next start's recovery completes it"
        if what == RECOVERY:
            done = "the next start's recovery, or `cowdisk recover`, completes it"
        elif not self.closing:
            if w.recovery is None:
                w.recovery = asyncio.ensure_future(self._recover_after())
            done = await asyncio.shield(w.recovery)
        raise WorkerDied(f"{op} {obj}: the store worker running it (PID {w.pid}) died: {status}; {done}",
                         op=op, obj=obj, hint="the daemon's log has the worker's last lines") from e

    async def _bury(self, w: Worker) -> str:
        self.workers.pop(w.pid, None)
        w.close()
        status = await asyncio.get_running_loop().run_in_executor(None, w.reap)
        self.died += 1
        if not self.closing:
            self._spawn()
        return status

    async def _recover_after(self) -> str:
        """Recovery after a worker died, in another worker; what it did, in words."""
        from . import calls

        try:
            async with self._recovering():  # one recovery at a time
                rep = await self.run(calls.recover, what=RECOVERY)
        except CowdiskError as e:
            return f"recovery failed too: {e}; `cowdisk recover` retries it"
        acts = [f"{k.replace('_', ' ')}: {', '.join(rep[k])}" for k in ACTIONS if rep.get(k)]
        return "recovery ran: " + ("; ".join(acts) if acts else "nothing to do")

    def _recovering(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock


def _in_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(data)) + data


__all__ = ["Pool", "RemoteInternal", "CALL_SCOPE", "CallProgress", "Watch", "NO_RETURN_STAGES"]

if __name__ == "__main__":
    main(sys.argv)
