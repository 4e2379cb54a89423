"""A real cowdiskd for the daemon tests: a ``python -m cowdisk serve`` process from this
checkout on a real unix socket under the test's tmp dir, talked to over that socket
(cowdisk.client.Client, curl, Go); never an in-process test client."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterator

from cowdisk.client import Client
from cowdisk.errors import CowdiskError
from cowdisk.store import Store

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def env(**extra: str) -> dict[str, str]:
    e = {**os.environ, "NO_COLOR": "1", "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for k in ("COWDISK_ROOT", "COWDISK_BACKEND", "COWDISK_SOCKET", "COWDISK_CONFIG", "COWDISK_CRASH_AT",
              "COWDISK_PAUSE_AT", "COWDISK_PAUSE_S", "COWDISK_PAUSE_MARK", "COWDISK_PROCESSES", "NOTIFY_SOCKET"):
        e.pop(k, None)
    e.update(extra)
    return e


class Daemon:
    """One daemon process on ``root`` serving ``sock``."""

    def __init__(self, root: str, sock: str, *args: str, backend: str = "copy", log: str | None = None,
                 extra_env: dict[str, str] | None = None) -> None:
        self.root = root
        self.sock = sock
        self.args = args
        self.backend = backend
        self.log_path = log or os.path.join(os.path.dirname(sock), f"daemon-{os.path.basename(sock)}.log")
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = Client(sock, timeout=120)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "cowdisk", "--root", self.root, "--backend", self.backend, "serve",
                "--socket", self.sock, "--log-format", "json", "--config", os.devnull, *self.args]

    def start(self, wait: bool = True, timeout: float = 60) -> "Daemon":
        self.logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv(), stdout=self.logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env(**self.extra_env))
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        assert self.proc is not None
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode} before answering:\n{self.log()}")
            if os.path.exists(self.sock) and self.client.answers(timeout=2):
                return
            time.sleep(0.05)
        raise AssertionError(f"daemon did not answer within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log_records(self, until: Any = None, timeout: float = 10) -> list[dict[str, Any]]:
        """The daemon's JSON log lines so far; with ``until`` (a predicate on them), once it
        holds (a thread writes the daemon's lines, a moment after the answer)."""
        end = time.monotonic() + timeout
        while True:
            out = []
            for line in self.log().splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
            if until is None or until(out) or time.monotonic() > end:
                return out
            time.sleep(0.02)

    def worker_pids(self) -> list[int]:
        """The daemon's store worker processes (its children named cowdisk-worker)."""
        assert self.proc is not None
        pid = self.proc.pid
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:  # its main thread forks and spawns them
                kids = [int(x) for x in f.read().split()]
        except OSError:
            return []
        out = []
        for k in kids:
            try:
                with open(f"/proc/{k}/comm") as f:
                    if f.read().strip() == "cowdisk-worker":
                        out.append(k)
            except OSError:
                pass
        return sorted(out)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self.client.close()
        self.logf.close()
        return code

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait; the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc is not None else 0
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> int:
        self.signal(signal.SIGKILL)
        return self.wait()

    def __enter__(self) -> "Daemon":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.client.close()


@contextlib.contextmanager
def public_tmpdir(prefix: str) -> Iterator[str]:
    """A new directory under /tmp that other users can search (the tests' tmp dirs are
    root's alone): sockets (sun_path is 108 bytes), and what another uid must reach."""
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Daemons:
    """One cowdiskd per backend for the module, started when a test first wants it, on a
    store under the module's tmp dir; its import and jail roots cover the tests' tmp dirs."""

    def __init__(self, top: str, base: str) -> None:
        self.top = top
        self.base = base
        self.running: dict[str, Daemon] = {}

    def get(self, backend: str) -> Daemon:
        if backend not in self.running:
            root = os.path.join(self.top, f"store-{backend}")
            Store(root, backend=backend).close()
            d = Daemon(root, os.path.join(self.top, f"{backend}.sock"), "--import-root", self.base, "--jail-root",
                       root, "--jail-root", self.base, backend=backend)
            self.running[backend] = d.start()
        return self.running[backend]

    def empty(self, d: Daemon) -> None:
        """What a test left in the daemon's store, removed through it."""
        c = d.client
        for v in c.volumes():
            c.remove_volume(v.id)
        for t in c.templates():
            c.remove_template(t.id)
        c.gc()
        assert c.volumes() == [] and c.templates() == []

    def stop(self) -> None:
        for d in self.running.values():
            with d:
                assert d.stop() == 0, d.log()
            with Store(d.root) as s:
                s.destroy()

    @classmethod
    @contextlib.contextmanager
    def for_module(cls, tmp_path_factory: Any) -> Iterator["Daemons"]:
        """The module's daemons under a short /tmp directory (socket paths), stopped and their
        stores destroyed at the end."""
        top = tempfile.mkdtemp(prefix="cdcli-", dir="/tmp")
        ds = cls(top, str(tmp_path_factory.getbasetemp()))
        try:
            yield ds
        finally:
            ds.stop()
            shutil.rmtree(top, ignore_errors=True)


def call_as(sock: str, uid: int, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    """``method path`` on the daemon's socket from a child running as ``uid`` (curl after
    setgroups/setgid/setuid): the HTTP status and the JSON answer."""
    argv = ["curl", "-sS", "--unix-socket", sock, "-X", method, "-w", "\n%{http_code}", f"http://cowdisk{path}"]
    if body is not None:
        argv += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]

    def drop() -> None:
        if uid:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, preexec_fn=drop, cwd="/")
    assert r.returncode == 0, r.stderr
    text, _, code = r.stdout.rpartition("\n")
    return int(code), json.loads(text)


def job_as(sock: str, uid: int, doc: dict[str, Any]) -> dict[str, Any]:
    """The ended job ``doc`` started, waited for as ``uid``."""
    while doc["state"] in ("queued", "running"):
        code, doc = call_as(sock, uid, "GET", f"/v1/jobs/{doc['id']}?wait=30")
        assert code == 200, doc
    return doc


def wait_for(pred: Any, timeout: float = 30, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def raises(fn: Any, *args: Any, **kw: Any) -> CowdiskError:
    try:
        fn(*args, **kw)
    except CowdiskError as e:
        return e
    raise AssertionError(f"{fn} did not raise")


def errors_in_threads(fn: Callable[[int], object], n: int, timeout: float = 120) -> list[BaseException]:
    """Run ``fn(0)`` ... ``fn(n - 1)`` at once, each in a thread of its own; what they raised."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            fn(i)
        except BaseException as e:  # noqa: BLE001 - the caller judges them
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return errors
