"""Prometheus text at ``GET /metrics`` (prometheus-client, in its own registry).

Counted as requests run: ``cowdisk_operation_duration_seconds{operation,result}``
(a histogram: result is ``ok`` or the error type), ``cowdisk_errors_total{type,operation}``.
Set once at start: ``cowdisk_recovery_actions{action}`` (what the start-up recovery did).
Read from the store at each scrape (a collector; nothing is cached, nothing locked):

* ``cowdisk_volumes{state,backend}``, ``cowdisk_templates{state}``, ``cowdisk_jobs{state}``;
* ``cowdisk_data_bytes{kind=size|used|free}``: the filesystem holding the volumes
  (the pool's own xfs for the pool backend, also exported as ``cowdisk_pool_bytes``);
* ``cowdisk_space_bytes{area,kind=used|total}`` and ``cowdisk_space_ok{area,state}``: every
  area ``Store.space()`` reports (dm-thin: the pool's data and metadata and its mode);
* dm-snapshot: ``cowdisk_volume_cow_used_bytes{volume}`` and
  ``cowdisk_volume_cow_total_bytes{volume}`` for each attached volume (one status ioctl
  each), and ``cowdisk_snapshots_invalid`` (attached snapshots whose status is not ok);
* the process (``process_resident_memory_bytes`` and the rest of prometheus-client's
  process collector), and ``cowdisk_info{version,backend,root}``;
* lazy templates (docs/remote.md), from each cache's record and its server's counters
  (``stats.json``; a restarted server counts from 0 again, which Prometheus reads as a
  reset): ``cowdisk_lazy_cached_bytes{manifest}``, ``cowdisk_lazy_served{manifest}``,
  ``cowdisk_lazy_fetched_bytes_total{manifest}`` (bytes received, compressed),
  ``cowdisk_lazy_chunk_reads_total{manifest,source=cache|remote}``,
  ``cowdisk_lazy_check_failures_total{manifest}`` and the histogram
  ``cowdisk_lazy_fetch_seconds{manifest}``;
* the space monitor (dm-thin): ``cowdisk_space_events_total{area,pool,event}`` (grown, full,
  failing_io, ok) and ``cowdisk_space_blocked{area,pool,state,reason,volumes}``, 1 while
  writes wait (``full``) or fail (``failing_io``) because the pool cannot grow;
* the store workers: ``cowdisk_store_workers`` (running), ``cowdisk_store_worker_deaths_total``,
  ``cowdisk_store_workers_resident_bytes`` (together).
"""

from __future__ import annotations

import logging
import os
from importlib import metadata
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from ..errors import CowdiskError
from ..model import SpaceEvent
from ..store import RecoveryReport, Store
from .jobs import FINISHED, Jobs

log = logging.getLogger(__name__)

BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
RECOVERY_ACTIONS = ("rolled_back", "finished", "reactivated", "orphans_removed", "kept", "errors")

try:
    VERSION = metadata.version("cowdisk")
except metadata.PackageNotFoundError:  # run from a source tree
    VERSION = "0"


class StoreCollector:
    """What the store holds, read at scrape time."""

    def __init__(self, store: Store, jobs: Jobs) -> None:
        self.store = store
        self.jobs = jobs

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self.store
        info = GaugeMetricFamily("cowdisk_info", "The daemon's store", labels=["version", "backend", "root"])
        info.add_metric([VERSION, s.backend_name, s.root], 1)
        yield info
        vols = GaugeMetricFamily("cowdisk_volumes", "Volumes by state and backend", labels=["state", "backend"])
        counts: dict[tuple[str, str], int] = {}
        volumes = s.volumes()
        for v in volumes:
            counts[(str(v.state), v.backend)] = counts.get((str(v.state), v.backend), 0) + 1
        for (state, backend), n in sorted(counts.items()):
            vols.add_metric([state, backend], n)
        yield vols
        tpl = GaugeMetricFamily("cowdisk_templates", "Templates by state", labels=["state"])
        tcounts: dict[str, int] = {}
        for t in s.templates():
            tcounts[t.state] = tcounts.get(t.state, 0) + 1
        for state, n in sorted(tcounts.items()):
            tpl.add_metric([state], n)
        yield tpl
        jobs = GaugeMetricFamily("cowdisk_jobs", "Jobs the daemon knows, by state", labels=["state"])
        jcounts: dict[str, int] = {}
        for j in self.jobs.all():
            jcounts[j.state] = jcounts.get(j.state, 0) + 1
        for state in ("queued", "running", *sorted(FINISHED)):
            jobs.add_metric([state], jcounts.get(state, 0))
        yield jobs
        yield from self._lazy()
        yield from self._space()
        if s.backend_name == "dm-snapshot":
            yield from self._cow(volumes)

    def _lazy(self) -> Iterator[Any]:
        from ..remote.cache import FETCH_BUCKETS

        try:
            lazy = self.store.lazy_templates()
        except (CowdiskError, OSError) as e:
            log.warning("metrics: list lazy templates: %s", e)
            return
        cached = GaugeMetricFamily("cowdisk_lazy_cached_bytes", "Bytes a lazy template's cache holds",
                                   labels=["manifest"])
        served = GaugeMetricFamily("cowdisk_lazy_served", "1 while a server serves the lazy template",
                                   labels=["manifest"])
        fetched = CounterMetricFamily("cowdisk_lazy_fetched_bytes", "Bytes fetched from the object store "
                                      "(compressed) by the template's server", labels=["manifest"])
        reads = CounterMetricFamily("cowdisk_lazy_chunk_reads", "Chunk reads, from the cache or the object store",
                                    labels=["manifest", "source"])
        bad = CounterMetricFamily("cowdisk_lazy_check_failures", "Fetched chunks that failed their SHA-256 check",
                                  labels=["manifest"])
        hist = HistogramMetricFamily("cowdisk_lazy_fetch_seconds", "Time to fetch and check one chunk",
                                     labels=["manifest"])
        for d in lazy:
            m, st = d["manifest"], d["stats"]
            cached.add_metric([m], d["cached_bytes"])
            served.add_metric([m], 1 if d["pid"] else 0)
            fetched.add_metric([m], st.get("fetched_bytes", 0))
            reads.add_metric([m, "cache"], st.get("cache_hits", 0))
            reads.add_metric([m, "remote"], st.get("remote_reads", 0))
            bad.add_metric([m], st.get("check_failures", 0))
            counts = list(st.get("fetch_buckets") or [0] * len(FETCH_BUCKETS))
            total = st.get("fetched_chunks", 0)
            hist.add_metric([m], [(repr(b), c) for b, c in zip(FETCH_BUCKETS, counts)] + [("+Inf", total)],
                            sum_value=st.get("fetch_sum", 0.0))
        yield from (cached, served, fetched, reads, bad, hist)

    def _space(self) -> Iterator[GaugeMetricFamily]:
        try:
            st = os.statvfs(self.store.data_root)
        except OSError:
            return
        size, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        names = [("cowdisk_data_bytes", "The filesystem holding templates and volumes")]
        if self.store.backend_name == "pool":
            names.append(("cowdisk_pool_bytes", "The embedded xfs pool"))
        for name, doc in names:
            g = GaugeMetricFamily(name, doc, labels=["kind"])
            g.add_metric(["size"], size)
            g.add_metric(["used"], used)
            g.add_metric(["free"], free)
            yield g
        space = GaugeMetricFamily("cowdisk_space_bytes", "Each area the store's writes fill (Store.space): "
                                  "the store's and the data's filesystem, dm-thin's pool data and metadata",
                                  labels=["area", "kind"])
        healthy = GaugeMetricFamily("cowdisk_space_ok", "1 while the area's state is ok (a thin pool in rw "
                                    "mode, not flagged needs_check), else 0", labels=["area", "state"])
        for a in self.store.space():
            space.add_metric([a.area, "used"], a.used_bytes)
            space.add_metric([a.area, "total"], a.total_bytes)
            healthy.add_metric([a.area, a.state], 1 if a.state == "ok" else 0)
        yield space
        yield healthy

    def _cow(self, volumes: list[Any]) -> Iterator[GaugeMetricFamily]:
        used = GaugeMetricFamily("cowdisk_volume_cow_used_bytes", "COW bytes a dm-snapshot volume has used",
                                 labels=["volume"])
        total = GaugeMetricFamily("cowdisk_volume_cow_total_bytes", "COW bytes a dm-snapshot volume can use",
                                  labels=["volume"])
        invalid = 0
        for v in volumes:
            if v.state != "attached":
                continue
            try:
                u = self.store.usage(v.id)
            except (CowdiskError, OSError):
                continue  # it went away while we looked
            if u.cow_used_bytes is not None:
                used.add_metric([v.id], u.cow_used_bytes)
            if u.cow_total_bytes is not None:
                total.add_metric([v.id], u.cow_total_bytes)
            if u.health != "ok":
                invalid += 1
        yield used
        yield total
        g = GaugeMetricFamily("cowdisk_snapshots_invalid", "Attached dm-snapshot volumes whose status is not ok")
        g.add_metric([], invalid)
        yield g


class WorkerCollector:
    """The store worker processes (:mod:`.workers`), read at scrape time."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        pids = self.pool.pids()
        g = GaugeMetricFamily("cowdisk_store_workers", "Store worker processes running")
        g.add_metric([], len(pids))
        yield g
        c = CounterMetricFamily("cowdisk_store_worker_deaths", "Store workers that died during a call")
        c.add_metric([], self.pool.died)
        yield c
        running, waiting, slots = self.pool.calls()
        for name, value, what in (
                ("cowdisk_store_calls_running", running, "Store calls running now (in the workers' threads)"),
                ("cowdisk_store_calls_waiting", waiting, "Requests waiting for a free store call slot"),
                ("cowdisk_store_call_slots", slots, "Store calls that can run at once (the workers setting)")):
            g = GaugeMetricFamily(name, what)
            g.add_metric([], value)
            yield g
        page = os.sysconf("SC_PAGE_SIZE")
        rss = 0
        for pid in pids:
            try:
                with open(f"/proc/{pid}/statm") as f:
                    rss += int(f.read().split()[1]) * page
            except (OSError, ValueError, IndexError):
                pass
        m = GaugeMetricFamily("cowdisk_store_workers_resident_bytes",
                              "Resident memory of the store workers together (the daemon's own process: "
                              "process_resident_memory_bytes)")
        m.add_metric([], rss)
        yield m


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.duration = Histogram("cowdisk_operation_duration_seconds", "Duration of store operations",
                                  ["operation", "result"], buckets=BUCKETS, registry=self.registry)
        self.errors = Counter("cowdisk_errors", "Failed operations by error type", ["type", "operation"],
                              registry=self.registry)
        self.recovery = Gauge("cowdisk_recovery_actions", "What the recovery at start did, by action",
                              ["action"], registry=self.registry)
        self.space_events = Counter("cowdisk_space_events", "What the space monitor saw and did (dm-thin: grown, "
                                    "full, failing_io, ok)", ["area", "pool", "event"], registry=self.registry)
        self.space_blocked = Gauge("cowdisk_space_blocked", "1 while writes to the area wait (state full) or fail "
                                   "(state failing_io) because it cannot grow: why, and the volumes writing to it",
                                   ["area", "pool", "state", "reason", "volumes"], registry=self.registry)
        ProcessCollector(registry=self.registry)

    def attach(self, store: Store, jobs: Jobs, pool: Any = None) -> None:
        self.registry.register(StoreCollector(store, jobs))
        if pool is not None:
            self.registry.register(WorkerCollector(pool))

    def observe(self, op: str, error: BaseException | None, seconds: float) -> None:
        result = "ok" if error is None else type(error).__name__
        self.duration.labels(op, result).observe(seconds)
        if error is not None:
            self.errors.labels(type(error).__name__, op).inc()

    def space_event(self, ev: SpaceEvent) -> None:
        self.space_events.labels(ev.area, ev.pool, ev.event).inc()
        if ev.event in ("full", "failing_io"):
            self.space_blocked.clear()
            self.space_blocked.labels(ev.area, ev.pool, ev.event, ev.reason, ",".join(ev.volumes)).set(1)
        elif ev.event in ("ok", "gone"):
            self.space_blocked.clear()

    def recovered(self, rep: RecoveryReport) -> None:
        d = rep.as_dict()
        for k in dict.fromkeys((*RECOVERY_ACTIONS, *d)):
            if isinstance(d.get(k, []), list):
                self.recovery.labels(k).set(len(d.get(k, ())))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
