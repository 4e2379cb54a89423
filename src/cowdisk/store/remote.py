"""Templates and the object store (docs/remote.md): push a template as chunks, pull one into
this store, list what a bucket holds. The format and the transfers are
:mod:`cowdisk.remote`'s; this module ties them to the store's templates (the template's
file, the lock, registering a pulled image like an import).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from typing import TYPE_CHECKING, Any, ContextManager

from .. import failpoints
from ..digest import sha256_file
from ..errors import AlreadyExists, InvalidArgument, NotFound, TemplateChanged, Unsupported
from ..progress import Progress, stage
from .model import Template, validate_id
from .templates import LAZY as LAZY_FILE, Templates, is_held, is_lazy, lazy_descriptor

HEX64 = re.compile(r"^[0-9a-f]{64}$")
LAZY = "lazy"
"""``<data root>/lazy/<manifest digest>/``: a lazy template's cache (cowdisk.remote.cache)."""

if TYPE_CHECKING:
    from ..remote.chunks import Manifest
    from ..remote.s3 import ObjectStore

log = logging.getLogger(__name__)


class RemoteTemplates:
    """The store's side of the object store: one per opened store (the config is read on
    each call: it may change under a running daemon)."""

    def __init__(self, root: str, templates: Templates) -> None:
        self.root = root
        self.templates = templates

    def _objects(self, url: str | None) -> "ObjectStore":
        from ..remote import load
        from ..remote.s3 import ObjectStore

        return ObjectStore(load(self.root, url))

    def push(self, ref: str, to: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
        """Push template ``ref`` to ``to`` (``s3://BUCKET[/PREFIX]``; default: the config's
        location): the chunks the bucket lacks, then the manifest. Returns the report
        (manifest digest, URL, chunks uploaded and already there, bytes uploaded)."""
        from ..remote.transfer import push

        validate_id(ref, "template name or id")
        t = self.templates.row(ref)  # as the caller may see it
        if is_lazy(t.path):
            raise Unsupported(f"push template {t.id}: it is lazy here, its chunks are in the object store already "
                              f"({t.source})", op="push template", obj=t.id,
                              hint="push it from the store that has its image file")
        if not t.path or is_held(t.path):
            raise Unsupported(f"push template {t.id}: its bytes are held by the backend, not in a file here",
                              op="push template", obj=t.id, hint="push it from a store that has its image file")
        objects = self._objects(to)
        with self.templates._lock(t.id):  # no remove while it is read
            self.templates.check(t)
            report = push(t.path, t.digest, objects, objects.cfg.chunk_size, progress)
        return {"id": t.id, "digest": t.digest, **report.as_dict()}

    def pull(self, source: str, name: str | None = None, *, at: str | None = None,
             progress: Progress | None = None) -> Template:
        """Pull the template ``source`` names (a manifest URL as push prints it, or a
        digest looked up at ``at`` / the config's location) into this store: every chunk
        fetched and checked, the whole image's digest checked, then registered like an
        import. A template this store has already is only named."""
        from ..remote import split_manifest_url
        from ..remote.transfer import fetch_manifest, pull, resolve

        if name is not None:
            validate_id(name, "template name")
        split = split_manifest_url(source)
        objects = self._objects(split[0] if split else at)
        m = fetch_manifest(objects, split[1]) if split else resolve(objects, source)
        have = self.templates.registry.find_template(m.template[:16])
        if have is not None and have.digest == m.template and is_lazy(have.path):
            raise AlreadyExists(f"pull template {m.digest}: it is here as lazy template {have.id}",
                                op="pull template", obj=have.id,
                                hint=f"use it as it is, or remove it (`cowdisk template rm {have.id}`, no volume "
                                     "over it) and pull it again to have it whole")
        if have is not None and have.digest == m.template:
            stage(progress, f"template {have.id} is here already")
            return self.templates.register(have.path, have.digest, owned=have.owned, source=have.source, name=name)
        staging = self.templates.staging()
        try:
            tmp = os.path.join(staging, "disk.img")
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                failpoints.hit("pull", "fetch")  # the tests' window for a cancel: staging made, nothing fetched
                fetched = pull(m, objects, fd, progress)
                os.fsync(fd)
            finally:
                os.close(fd)
            stage(progress, "digest")
            digest = sha256_file(tmp)
            if digest != m.template:
                raise TemplateChanged(f"pull template {m.digest}: the image hashes to {digest}, its manifest says "
                                      f"{m.template}", op="pull template", obj=m.digest)
            stage(progress, "register")  # a cancel's last chance: nothing is registered yet
            log.info("pulled template %s (manifest %s): %d bytes fetched", digest[:16], m.digest, fetched)
            src = objects.url(objects.cfg.key(f"manifests/{m.digest}"))
            return self.templates.register(tmp, digest, owned=True, source=src, name=name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def listing(self, url: str | None = None) -> list[dict[str, Any]]:
        """The templates at ``url`` (default: the config's location), with whether this
        store has each (``local``: one the caller may use; another owner's unshared
        template is not told)."""
        rows = remote_listing(self.root, url)
        for r in rows:
            t = self.templates.registry.find_template(r["template"][:16])
            r["local"] = t is not None and t.digest == r["template"] and t.visible_to(self.templates.viewer)
        return rows


    # -- lazy templates ------------------------------------------------------------------

    def lazy_dir(self, manifest_digest: str = "") -> str:
        if manifest_digest and not HEX64.match(manifest_digest):
            raise InvalidArgument(f"lazy template {manifest_digest!r}: not a manifest digest (64 hex digits)",
                                  op="find lazy template", obj=manifest_digest)
        d = os.path.join(os.path.dirname(self.templates.dir), LAZY)
        return os.path.join(d, manifest_digest) if manifest_digest else d

    def lazy(self, source: str, name: str | None = None, *, at: str | None = None, bound: float | None = None,
             prefetch: bool = False, progress: Progress | None = None) -> dict[str, Any]:
        """Serve the template ``source`` names (as for :meth:`pull`) lazily on this host: its
        manifest is fetched (once: a manifest this host's cache holds is its own digest's,
        checked when read), its cache made (once per host: every later caller shares the
        chunks it holds), and its nbdkit started (or found). The template is registered in
        the store as a lazy template (the caller's, like an import; ``name`` names it) unless
        a template of that content is here already. Returns the served template's document
        (``url``: ``nbd+unix:///?socket=...``; ``id``: the template's id)."""
        from ..remote import load, split_manifest_url
        from ..remote.cache import ChunkCache
        from ..remote.s3 import ObjectStore
        from ..remote.transfer import fetch_manifest, resolve

        if name is not None:
            validate_id(name, "template name")
        split = split_manifest_url(source)
        cfg = load(self.root, split[0] if split else at)
        m = self._cached_manifest(split[1]) if split else None
        if m is None:
            objects = ObjectStore(cfg)
            m = fetch_manifest(objects, split[1]) if split else resolve(objects, source)
        cache = self.lazy_dir(m.digest)
        with self._lazy_lock(m.digest):  # not while gc evicts from it
            ChunkCache.create(cache, m)
            with open(os.path.join(cache, "location"), "w") as f:
                f.write(cfg.location())
            self._serve(cache, cfg.source, cfg.location(), bound if bound is not None else 3 * cfg.timeout)
        tid = self._register_lazy(m, cfg.location(), name)
        if prefetch:
            self._prefetch(cache, m, ObjectStore(cfg), progress)
        return {**self.lazy_doc(m.digest), "id": tid}

    def _cached_manifest(self, digest: str) -> "Manifest | None":
        """The manifest ``digest`` when this host's cache of it holds it (checked against its
        name), else None."""
        from ..errors import CowdiskError
        from ..remote.cache import ChunkCache

        cache = self.lazy_dir(digest)
        if not os.path.exists(os.path.join(cache, "manifest")):
            return None
        try:
            return ChunkCache.read_manifest(cache)
        except (CowdiskError, OSError, ValueError):
            return None  # damaged: fetched again

    @staticmethod
    def _serve(cache: str, config: str, location: str, bound: float) -> str:
        from ..remote.lazy import serve

        return serve(cache, config, location, bound=bound).socket

    @staticmethod
    def _location(cache: str) -> str:
        """Where the lazy template of ``cache`` is fetched from (written by its pull)."""
        with open(os.path.join(cache, "location")) as f:
            return f.read().strip()

    def _serve_again(self, cache: str, location: str) -> str:
        """Serve ``cache`` (pulled before) with the remote config of ``location`` and its
        fetch bound, as its pull did; returns the server's socket."""
        from ..remote import load

        cfg = load(self.root, location)
        return self._serve(cache, cfg.source, location, 3 * cfg.timeout)

    def _register_lazy(self, m: "Manifest", location: str, name: str | None) -> str:
        """The template of manifest ``m`` in the registry: a lazy template (its descriptor
        published like an import's file, owned by the caller), or the template of that
        content this store has already (only named). Returns its id."""
        import json

        from ..remote.chunks import manifest_key

        have = self.templates.registry.find_template(m.template[:16])
        src = f"{location}/{manifest_key(m.digest)}"
        if have is not None and have.digest == m.template:
            return self.templates.register(have.path, have.digest, owned=have.owned, source=have.source,
                                           name=name).id
        staging = self.templates.staging()
        try:
            tmp = os.path.join(staging, LAZY_FILE)
            with open(tmp, "w") as f:
                json.dump({"manifest": m.digest, "size": m.size, "chunk_size": m.chunk_size, "source": src}, f)
                f.flush()
                os.fsync(f.fileno())
            return self.templates.register(tmp, m.template, owned=True, source=src, name=name).id
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def serve_template(self, path: str) -> str:
        """Start (or find) the server of the lazy template whose descriptor is ``path``;
        returns its unix socket (a volume's block device connects to it)."""
        from ..remote.lazy import keeper, server

        d = lazy_descriptor(path)
        cache = self.lazy_dir(d["manifest"])
        running = server(cache)
        if running is not None and keeper(cache) is not None:  # (the usual case: every create after the first)
            return running.socket
        with self._lazy_lock(d["manifest"]):
            try:
                location = self._location(cache)
            except FileNotFoundError:
                raise NotFound(f"serve lazy template {d['manifest'][:16]}: its cache {cache} is gone",
                               op="serve lazy template", obj=d["manifest"],
                               hint=f"`cowdisk template pull --lazy {d['source']}` makes it again") from None
            return self._serve_again(cache, location)  # (one whose keeper is gone: anew)

    def whole_data(self, path: str) -> ContextManager[str | None]:
        """The data file of the cache of the lazy template whose descriptor is ``path`` when
        the cache holds every data chunk, else None, in a context no eviction runs in
        (:func:`cowdisk.remote.cache.whole_data`): a loop over the file made inside it pins
        the cache (``TemplateRef.whole``)."""
        from ..remote.cache import whole_data

        return whole_data(self.lazy_dir(lazy_descriptor(path)["manifest"]))

    def keep_served(self) -> list[str]:
        """Every lazy template served on this host has its server under a keeper (recovery
        runs this; so does the daemon every few seconds): a server whose keeper was killed
        (nbdkit ends with its keeper: it sets PR_SET_PDEATHSIG itself), or that died with
        it, leaves its PID files behind (a stop removes them); such a template is served
        again, and the kernel's nbd devices that were connected to the dead server get a
        connection to the new one (their I/O waits 30 s for one). Returns what was done."""
        from ..kernel import nbd
        from ..remote.lazy import KEEPER_PIDFILE, PIDFILE, keeper

        d = self.lazy_dir()
        notes = []
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            cache = os.path.join(d, name)
            if (not HEX64.match(name) or keeper(cache) is not None
                    or not any(os.path.exists(os.path.join(cache, p)) for p in (PIDFILE, KEEPER_PIDFILE))):
                continue  # kept, or never served, or stopped
            with self._lazy_lock(name):
                if keeper(cache) is not None:
                    continue
                sock = self._serve_again(cache, self._location(cache))
                again = nbd.reconnect_noted(sock) if nbd.available()[0] else []
                notes.append(f"lazy template {name[:16]}: its keeper was gone; served again"
                             + "".join(f", nbd{i} reconnected" for i in again))
        return notes

    def _lazy_lock(self, manifest_digest: str) -> Any:
        return self.templates._lock(f"lazy-{manifest_digest[:16]}")

    def _prefetch(self, cache: str, m: "Manifest", objects: "ObjectStore", progress: Progress | None) -> None:
        """Fill the cache: the chunks of the read-order sidecar first (the order a first
        boot read them in, when one was recorded), then the rest; 8 at a time."""
        import concurrent.futures as cf

        from ..remote.cache import ChunkCache
        from ..remote.transfer import fetch_order

        order = fetch_order(objects, m)
        rest = [i for i, c in enumerate(m.chunks) if c is not None and i not in set(order)]
        todo = [i for i in order if i < len(m.chunks) and m.chunks[i] is not None] + rest
        stage(progress, f"prefetch {len(todo)} chunks ({len(order)} in the recorded read order first)")
        failpoints.hit("prefetch", "start")  # the tests' window for a cancel: nothing fetched yet
        c = ChunkCache(cache, m, lambda key: objects.get(objects.cfg.key(key)),
                       where=lambda key: objects.url(objects.cfg.key(key)), bound=3 * objects.cfg.timeout)
        first = todo[:len(todo) - len(rest)]
        pool = cf.ThreadPoolExecutor(8)
        try:
            done = 0
            for batch in (first, rest):  # the recorded ones all in before the rest starts
                for f in [pool.submit(c.ensure, i) for i in batch]:
                    f.result()
                    done += 1
                    if progress:
                        progress(done, len(todo))  # a cancel (a job's) raises here
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # a failure or a cancel: the fetches not begun never start
            c.close()

    def record_order(self, manifest_digest: str) -> dict[str, Any]:
        """Upload the order this host's cache fetched the template's chunks in (its first
        boot's reads) as the manifest's sidecar: other hosts prefetch in that order."""
        from ..remote import load
        from ..remote.cache import ChunkCache, read_record
        from ..remote.s3 import ObjectStore
        from ..remote.transfer import put_order

        cache = self._cache(manifest_digest, "record read order")
        m = ChunkCache.read_manifest(cache)
        order = read_record(cache)
        url = put_order(ObjectStore(load(self.root, self._location(cache))), m, order)
        return {"manifest": m.digest, "chunks": len(order), "url": url}

    def trim_lazy(self) -> list[str]:
        """Trim the lazy templates' caches to the remote config's ``cache_cap``: first the
        chunks of templates no server serves (no volume needs them), the least recently
        fetched cache first, whole; then single chunks of served templates, the least
        recently used first, while their servers read on (a reader of an evicted chunk
        fetches it again: :func:`cowdisk.remote.cache.evict`). Bytes a kill left in a cache
        unlisted are punched first, cap or not. A cache whose data file a loop reads (the
        origin of volumes over a whole cache) loses nothing while it does: it is passed
        over here, and :func:`~cowdisk.remote.cache.evict` refuses it (EBUSY) under the lock
        a loop's setup takes. Returns what was done."""
        from ..errors import NotFound
        from ..remote import load
        from ..remote.cache import ChunkCache, last_used, loops_over, read_record, unlisted
        from ..remote.lazy import server

        d = self.lazy_dir()
        if not os.path.isdir(d):
            return []
        caches = [os.path.join(d, n) for n in os.listdir(d)
                  if HEX64.match(n) and os.path.exists(os.path.join(d, n, "held"))]
        manifests = {c: ChunkCache.read_manifest(c) for c in caches}
        pinned = {c: n for c in caches if (n := loops_over(c))}
        notes: list[str] = []
        for c, m in manifests.items():  # what kills left unlisted first: space the cap does not count
            stray = set() if c in pinned else unlisted(c, m)
            if stray and self._evict(c, m, set(), stray, notes) is not None:
                notes.append(f"lazy template {os.path.basename(c)[:16]}: punched {len(stray)} chunks a kill left "
                             "unlisted")
        try:
            cap = load(self.root).cache_cap
        except NotFound:
            return notes
        if not cap:
            return notes
        total = sum(int(self.lazy_doc(os.path.basename(c))["cached_bytes"]) for c in caches)
        served = []
        for c in sorted(caches, key=lambda p: os.stat(os.path.join(p, "held")).st_mtime):
            if total <= cap:
                break
            name = os.path.basename(c)
            if c in pinned:
                notes.append(f"lazy template {name[:16]}: not evicted: its cache file backs /dev/loop{pinned[c][0]} "
                             "(the origin of volumes over it)")
                continue
            with self._lazy_lock(name):  # not while it is started
                if server(c) is not None:
                    served.append(c)
                    continue
                held = read_record(c)
                freed = self._evict(c, manifests[c], set(held), set(), notes)
            if freed is None:
                continue
            total -= freed
            notes.append(f"lazy template {name[:16]}: evicted {len(held)} chunks ({freed} bytes) to keep the cache "
                         f"under {cap} bytes")
        if total > cap and served:
            used = []
            for c in served:
                when = last_used(c, manifests[c])
                used += [(when[i], c, i) for i in read_record(c)]
            drop: dict[str, set[int]] = {}
            for _, c, i in sorted(used):
                if total <= cap:
                    break
                drop.setdefault(c, set()).add(i)
                total -= manifests[c].length(i)
            for c, chunks in drop.items():
                name = os.path.basename(c)
                with self._lazy_lock(name):
                    freed = self._evict(c, manifests[c], chunks, set(), notes)
                if freed is None:
                    total += sum(manifests[c].length(i) for i in chunks)
                    continue
                notes.append(f"lazy template {name[:16]} (served): evicted {len(chunks)} chunks ({freed} bytes), "
                             f"the least recently used, to keep the cache under {cap} bytes")
        if total > cap:
            notes.append(f"lazy templates: {total} bytes cached, over the cap of {cap}")
        return notes

    @staticmethod
    def _evict(cache: str, m: "Manifest", drop: set[int], stray: set[int], notes: list[str]) -> int | None:
        """:func:`cowdisk.remote.cache.evict`; None, with a note, when it refuses because a
        loop reads the cache (made since trim_lazy looked): the other caches go on."""
        from ..errors import RemoteError
        from ..remote.cache import evict

        try:
            return evict(cache, m, drop, stray)
        except RemoteError as e:
            if e.errno != errno.EBUSY:
                raise
            notes.append(f"lazy template {os.path.basename(cache)[:16]}: not evicted: {e}")
            return None

    def lazy_doc(self, manifest_digest: str) -> dict[str, Any]:
        """A lazy template on this host: its manifest's summary, the bytes its cache holds,
        whether it is whole and the loops reading it, whether (and where) it is served, the
        serving process's counters."""
        from ..remote.cache import ChunkCache, holds_every_chunk, loops_over, parse_record
        from ..remote.lazy import server, stats

        cache = self._cache(manifest_digest, "find lazy template")
        m = ChunkCache.read_manifest(cache)
        with open(os.path.join(cache, "held"), "rb") as f:
            held = parse_record(f.read())
        s = server(cache)
        return {**m.as_dict(), "cache": cache, "cached_chunks": len(held),
                "cached_bytes": sum(m.length(i) for i in held),
                "data_chunks": len(m.chunks) - m.as_dict()["zero_chunks"],
                # every data chunk here: a volume made now reads the cache through a loop, not the server
                "whole": holds_every_chunk(m, held),  # the record read above, not read again
                "loops": loops_over(cache),  # the loops reading it (the origin of volumes over it)
                "url": s.url if s else None, "pid": s.pid if s else None, "stats": stats(cache)}

    def lazy_served(self, path: str) -> bool:
        """Whether the lazy template whose descriptor is ``path`` is served now."""
        from ..remote.lazy import server

        return server(self.lazy_dir(lazy_descriptor(path)["manifest"])) is not None

    def lazy_summary(self, path: str) -> dict[str, Any]:
        """A lazy template's cache, as ``template ls`` and ``inspect`` show it: its manifest,
        the bytes and chunks its cache holds, whether it is whole (new volumes then read it
        through a loop) and the loops that read it, whether it is served."""
        d = lazy_descriptor(path)
        doc = self.lazy_doc(d["manifest"])
        return {"manifest": d["manifest"], "source": d["source"], "cached_bytes": doc["cached_bytes"],
                "cached_chunks": doc["cached_chunks"], "data_chunks": doc["data_chunks"], "whole": doc["whole"],
                "loops": doc["loops"], "served": doc["pid"] is not None}

    def _cache(self, manifest_digest: str, op: str) -> str:
        """The cache of lazy template ``manifest_digest`` on this host (NotFound when there is none)."""
        cache = self.lazy_dir(manifest_digest)
        if not os.path.exists(os.path.join(cache, "held")):  # made last
            raise NotFound(f"{op} {manifest_digest}: no lazy template of that manifest on this host",
                           op=op, obj=manifest_digest, hint="`cowdisk template ls --lazy` lists them")
        return cache

    def lazy_templates(self) -> list[dict[str, Any]]:
        d = self.lazy_dir()
        names = sorted(os.listdir(d)) if os.path.isdir(d) else []
        return [self.lazy_doc(n) for n in names if HEX64.match(n) and os.path.exists(os.path.join(d, n, "held"))]

    def lazy_stop(self, manifest_digest: str) -> bool:
        """Stop serving a lazy template (its cache stays); True when it was served."""
        from ..remote.lazy import stop

        return stop(self._cache(manifest_digest, "stop lazy template"))

    def drop_lazy(self) -> None:
        """Stop every lazy template's server and delete the caches (store teardown)."""
        from ..remote.lazy import stop

        d = self.lazy_dir()
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            stop(os.path.join(d, name))
        shutil.rmtree(d, ignore_errors=True)


def remote_listing(root: str, url: str | None = None) -> list[dict[str, Any]]:
    """The templates at ``url`` (default: the location of the remote config of the store
    root ``root``, which need not hold a store yet)."""
    from ..remote import load
    from ..remote.s3 import ObjectStore
    from ..remote.transfer import listing

    return listing(ObjectStore(load(root, url)))
