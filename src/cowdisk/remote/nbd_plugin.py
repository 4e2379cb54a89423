"""nbdkit's Python plugin serving a lazy template, read-only, from its chunk cache
(:mod:`cowdisk.remote.cache`): ``nbdkit python .../nbd_plugin.py cache=DIR config=FILE
location=s3://... src=DIR bound=SECONDS stats=FILE``.

Run by nbdkit's embedded Python (Debian's python3 with its zstandard and boto3), not by
cowdisk's own interpreter: ``src`` puts cowdisk's sources on its path. A read of a chunk
the cache lacks fetches and checks it first; one that cannot be had is an error to the
client, never data: EIO (NBD carries only a few errnos), the reason (a failed check,
the bound passed, the object store's errno) in the server's log (``nbdkit.log``). ``stats`` is rewritten (temp + rename) after each fetch and every
second of reads: the counters the daemon's metrics and ``template ls`` read.
"""

# This file is loaded by nbdkit, not imported by cowdisk: no annotations nbdkit's Python
# would have to resolve at runtime beyond the standard library.
from __future__ import annotations

import builtins
import ctypes
import errno
import json
import os
import sys
import threading
import time
from typing import Any

import nbdkit  # type: ignore[import-not-found]  # provided by nbdkit's python plugin

API_VERSION = 2

_cfg: dict[str, str] = {}
_cache: Any = None
_stats_lock = threading.Lock()
_stats_at = 0.0
_last: list[tuple[int, int, int]] = [(-1, -1, -1)]  # the fetch counts the file was last written with


def config(key: str, value: str) -> None:
    if key not in ("cache", "config", "location", "src", "bound", "stats"):
        raise RuntimeError(f"cowdisk lazy template: unknown parameter {key}")
    _cfg[key] = value


def config_complete() -> None:
    for k in ("cache", "config", "src"):
        if k not in _cfg:
            raise RuntimeError(f"cowdisk lazy template: {k}= is missing")


def get_ready() -> None:
    global _cache
    sys.path.insert(0, _cfg["src"])
    from cowdisk.remote.cache import ChunkCache
    from cowdisk.remote.config import read

    bound = float(_cfg.get("bound", "30"))
    cfg = read(_cfg["config"]).at(_cfg.get("location"))
    manifest = ChunkCache.read_manifest(_cfg["cache"])
    objects: list[Any] = []
    made = threading.Lock()

    def get(key: str) -> bytes:
        # the object store's client (boto3) is made at the first fetch, not at start: a
        # server whose chunks are all cached never imports boto3 (seconds under emulation)
        with made:
            if not objects:
                from cowdisk.remote.s3 import ObjectStore

                objects.append(ObjectStore(cfg, timeout=min(cfg.timeout, bound), attempts=2))
        return bytes(objects[0].get(cfg.key(key)))

    _cache = ChunkCache(_cfg["cache"], manifest, get, where=lambda key: f"s3://{cfg.bucket}/{cfg.key(key)}",
                        bound=bound)


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


class Connection:
    """The handle of one client connection: the Python thread states its nbdkit worker
    threads keep (:func:`_keep_thread_state`), deleted at its close."""

    def __init__(self) -> None:
        self.kept: list[int] = []


_capi = ctypes.pythonapi  # nbdkit's Python's own C API (the plugin holds the GIL while calling it)
_capi.PyThreadState_Get.restype = ctypes.c_void_p
_capi.PyThreadState_Clear.argtypes = [ctypes.c_void_p]
_capi.PyThreadState_Delete.argtypes = [ctypes.c_void_p]
_capi.PyGILState_Release.argtypes = [ctypes.c_int]
_PYGILSTATE_LOCKED = 0
_worker = threading.local()


def _keep_thread_state(h: Connection) -> None:
    """Keep this nbdkit worker thread's Python thread state for its next calls.

    nbdkit's Python plugin takes the GIL for each call with PyGILState_Ensure and gives it
    back with PyGILState_Release. A worker thread (nbdkit's, 16 per connection) has no
    Python thread state of its own, so each call made one and deleted it again, with its
    16 KiB frame stack mmapped and unmapped (page faults, and TLB-shootdown IPIs across
    the process's threads): about 40% of nbdkit's CPU time per 4 KiB read. One more
    PyGILState_Ensure, once per worker thread, keeps its state (and this thread-local's
    value) for the thread's later calls; :func:`close` deletes them once the
    connection's workers have ended (nbdkit joins them before it calls close)."""
    if getattr(_worker, "kept", False):
        return
    h.kept.append(_capi.PyThreadState_Get())
    _capi.PyGILState_Ensure()
    _worker.kept = True


def open(readonly: bool) -> Connection:
    return Connection()


def close(h: Connection) -> None:
    current = _capi.PyThreadState_Get()
    for ts in h.kept:
        if ts == current:  # no workers (nbdkit --threads 1): this very thread kept it
            _capi.PyGILState_Release(_PYGILSTATE_LOCKED)  # the extra hold: deleted as this call returns
            _worker.kept = False
        else:  # the state of a worker thread that has ended
            _capi.PyThreadState_Clear(ts)
            _capi.PyThreadState_Delete(ts)
    h.kept.clear()


def get_size(h: Connection) -> int:
    return int(_cache.m.size)


def can_write(h: Connection) -> bool:
    return False


def can_multi_conn(h: Connection) -> bool:
    return True


def can_cache(h: Connection) -> int:
    return int(nbdkit.CACHE_NATIVE)


def pread(h: Connection, buf: Any, offset: int, flags: int) -> None:
    _keep_thread_state(h)
    try:
        _cache.read_into(buf, offset)
    except OSError as e:  # NBD carries few errnos (ETIMEDOUT, ECONNREFUSED would become EINVAL): EIO
        nbdkit.set_error(errno.EIO)
        sys.stderr.write(f"cowdisk lazy template: read {len(buf)} at {offset}: {e}\n")
        raise
    finally:
        _write_stats()


def cache(h: Connection, count: int, offset: int, flags: int) -> None:
    """NBD_CMD_CACHE: fetch the chunks of the range ahead (prefetch), no data returned."""
    _keep_thread_state(h)
    try:
        cs = _cache.m.chunk_size
        for i in range(offset // cs, (offset + count + cs - 1) // cs):
            _cache.ensure(i)
    except OSError as e:
        nbdkit.set_error(errno.EIO)
        sys.stderr.write(f"cowdisk lazy template: cache {count} at {offset}: {e}\n")
        raise
    finally:
        _write_stats()


def _write_stats() -> None:
    global _stats_at
    path = _cfg.get("stats")
    if not path:
        return
    now = time.monotonic()
    s = _cache.stats
    if now - _stats_at < 1.0 and (s.remote_reads, s.fetched_chunks, s.check_failures) == _last[0]:
        return  # the common case (a read of cached chunks within the second), without the lock
    with _stats_lock:
        # every change of a fetch count is written: keyed on remote_reads alone, a fetch that
        # ended just after another thread wrote (its read counted, not yet its chunk) was never
        # written within the second (test_lazy saw 2 fetched of 3 held)
        counts = (s.remote_reads, s.fetched_chunks, s.check_failures)
        if now - _stats_at < 1.0 and counts == _last[0]:
            return
        _stats_at = now
        _last[0] = counts
        doc = {"pid": os.getpid(), "fetched_chunks": s.fetched_chunks, "fetched_bytes": s.fetched_bytes,
               "cache_hits": s.cache_hits, "remote_reads": s.remote_reads, "check_failures": s.check_failures,
               "fetch_seconds": s.fetch_seconds[-1000:], "fetch_buckets": s.fetch_buckets, "fetch_sum": s.fetch_sum}
        tmp = f"{path}.tmp-{os.getpid()}"
        with builtins.open(tmp, "w") as f:  # this module's open() is nbdkit's callback
            json.dump(doc, f)
        os.replace(tmp, path)
