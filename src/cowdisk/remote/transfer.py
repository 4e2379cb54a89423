"""Moving templates to and from the object store: push (chunk, skip what the bucket has,
upload the rest, then the manifest), pull (fetch and check every chunk into a sparse
file), and finding and listing manifests.

The manifest goes up last, after every chunk it names: a manifest in the bucket always
has its chunks (a push killed half way leaves only chunks, which the next push reuses).
Transfers run in a few threads (boto3's client is thread-safe; zstd and hashlib release
the GIL on large buffers), with a bounded number of chunks in memory.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .. import failpoints
from ..errors import InvalidArgument, NotFound, RemoteError, TemplateChanged
from ..progress import Progress, stage
from .chunks import Manifest, chunk_key, compress, decode, manifest_key, read_chunks
from .s3 import ObjectStore

log = logging.getLogger(__name__)

THREADS = 8


@dataclass(frozen=True)
class PushReport:
    manifest: Manifest
    url: str
    uploaded_chunks: int
    uploaded_bytes: int
    """Compressed bytes sent (chunks and manifest)."""
    present_chunks: int
    """Distinct chunks the bucket already had."""

    def as_dict(self) -> dict[str, Any]:
        return {**self.manifest.as_dict(), "url": self.url, "uploaded_chunks": self.uploaded_chunks,
                "uploaded_bytes": self.uploaded_bytes, "present_chunks": self.present_chunks}


def _bounded(jobs: Iterable[Callable[[], Any]], threads: int = THREADS) -> list[Any]:
    """Run ``jobs`` in ``threads`` threads with at most 2 x threads submitted at once (the
    iterator is consumed as they finish, so a job's buffer is held only while it runs);
    the first failure cancels the rest and is raised."""
    results: list[Any] = []
    with cf.ThreadPoolExecutor(threads, thread_name_prefix="cowdisk-transfer") as pool:
        pending: set[cf.Future[Any]] = set()
        try:
            for job in jobs:
                pending.add(pool.submit(job))
                if len(pending) >= 2 * threads:
                    done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                    results.extend(f.result() for f in done)
            for f in cf.as_completed(pending):
                results.append(f.result())
            pending = set()
        finally:
            for f in pending:
                f.cancel()
    return results


def push(path: str, digest: str, objects: ObjectStore, chunk_size: int,
         progress: Progress | None = None) -> PushReport:
    """Push the image at ``path`` whose content digest is ``digest``: every chunk of data
    the bucket lacks, then the manifest. The image is re-hashed while it is read; content
    that no longer hashes to ``digest`` is refused (TemplateChanged) before the manifest."""
    objects.ensure_bucket()
    whole = hashlib.sha256()
    names: list[str | None] = []
    lock = threading.Lock()
    seen: set[str] = set()
    counts = {"uploaded": 0, "bytes": 0, "present": 0}
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        stage(progress, f"push {size} bytes in chunks of {chunk_size}")
        zero = bytes(chunk_size)

        def upload(name: str, data: bytes) -> None:
            key = objects.cfg.key(chunk_key(name))
            if objects.exists(key):
                with lock:
                    counts["present"] += 1
                return
            blob = compress(data)
            objects.put(key, blob)
            with lock:
                counts["uploaded"] += 1
                counts["bytes"] += len(blob)

        def jobs() -> Iterable[Callable[[], None]]:
            done = 0
            for i, data in read_chunks(fd, size, chunk_size):
                n = min(chunk_size, size - i * chunk_size)
                if data is None:
                    whole.update(zero[:n])
                    names.append(None)
                else:
                    whole.update(data)
                    name = hashlib.sha256(data).hexdigest()
                    names.append(name)
                    if name not in seen:
                        seen.add(name)
                        yield lambda name=name, data=data: upload(name, data)  # type: ignore[misc]
                done += n
                if progress:
                    progress(done, size)

        _bounded(jobs())
    finally:
        os.close(fd)
    if whole.hexdigest() != digest:
        raise TemplateChanged(f"push template {digest[:16]}: {path} no longer hashes to its digest "
                              f"(read {whole.hexdigest()})", op="push template", obj=path,
                              hint="`cowdisk template verify` checks it")
    m = Manifest(digest, size, chunk_size, tuple(names))
    body = m.to_bytes()
    mkey = objects.cfg.key(manifest_key(m.digest))
    failpoints.hit("push", "manifest")  # the tests' window for a cancel: every chunk up, no manifest yet
    stage(progress, "manifest")  # a cancel's last chance (a job's): the chunks stay, the next push reuses them
    if not objects.exists(mkey):
        objects.put(mkey, body)
        counts["bytes"] += len(body)
    log.info("pushed template %s: %d chunks, %d uploaded (%d bytes), %d already there -> %s", digest[:16],
             len(names), counts["uploaded"], counts["bytes"], counts["present"], objects.url(mkey))
    return PushReport(m, objects.url(mkey), counts["uploaded"], counts["bytes"], counts["present"])


def fetch_manifest(objects: ObjectStore, digest: str) -> Manifest:
    return Manifest.from_bytes(objects.get(objects.cfg.key(manifest_key(digest))), digest)


def fetch_chunk(objects: ObjectStore, m: Manifest, index: int) -> bytes:
    """Chunk ``index`` of ``m``, fetched and checked (zeros for a chunk not stored)."""
    name = m.chunks[index]
    if name is None:
        return bytes(m.length(index))
    key = objects.cfg.key(chunk_key(name))
    return decode(objects.get(key), name, m.length(index), objects.url(key))


def pull(m: Manifest, objects: ObjectStore, fd: int, progress: Progress | None = None) -> int:
    """Write the template of ``m`` into the empty file ``fd``: each distinct chunk fetched
    once, checked, written where it occurs; zero chunks stay holes. Returns the bytes
    fetched (compressed). The caller fsyncs and checks the whole image's digest."""
    os.ftruncate(fd, m.size)
    where: dict[str, list[int]] = {}
    for i, c in enumerate(m.chunks):
        if c is not None:
            where.setdefault(c, []).append(i)
    lock = threading.Lock()
    got = {"bytes": 0, "done": 0}
    total = sum(m.length(i) for idx in where.values() for i in idx)
    stage(progress, f"pull {len(where)} chunks")

    def one(name: str, indexes: list[int]) -> None:
        key = objects.cfg.key(chunk_key(name))
        blob = objects.get(key)
        data = decode(blob, name, m.length(indexes[0]), objects.url(key))
        for i in indexes:
            os.pwrite(fd, data[:m.length(i)], i * m.chunk_size)
        with lock:
            got["bytes"] += len(blob)
            got["done"] += len(data) * len(indexes)
            if progress:
                progress(got["done"], total)

    _bounded(lambda n=n, ix=ix: one(n, ix) for n, ix in where.items())  # type: ignore[misc]
    return got["bytes"]


def order_key(digest: str) -> str:
    """The read-order sidecar of manifest ``digest``: the chunk indexes a first boot read,
    in order (JSON list), prefetched first by other hosts."""
    return f"{manifest_key(digest)}.order"


def put_order(objects: ObjectStore, m: Manifest, order: list[int]) -> str:
    key = objects.cfg.key(order_key(m.digest))
    objects.put(key, json.dumps([i for i in order if 0 <= i < len(m.chunks)]).encode())
    return objects.url(key)


def fetch_order(objects: ObjectStore, m: Manifest) -> list[int]:
    """The manifest's read-order sidecar ([] when none was recorded; a malformed one is
    ignored: it only orders a prefetch, every chunk is still checked)."""
    try:
        data = objects.get(objects.cfg.key(order_key(m.digest)))
    except RemoteError as e:
        if e.errno == errno.ENOENT:
            return []
        raise
    try:
        order = json.loads(data)
    except ValueError:
        return []
    if not isinstance(order, list):
        return []
    return [i for i in order if isinstance(i, int) and 0 <= i < len(m.chunks)]


def manifests(objects: ObjectStore) -> list[str]:
    """The digests of every manifest at the location."""
    prefix = objects.cfg.key(manifest_key(""))
    return sorted(k[len(prefix):] for k, _ in objects.list(prefix) if len(k) == len(prefix) + 64)


def listing(objects: ObjectStore) -> list[dict[str, Any]]:
    """Every template at the location: its manifest's summary and URL."""
    out = []
    for d in manifests(objects):
        m = fetch_manifest(objects, d)
        out.append({**m.as_dict(), "url": objects.url(objects.cfg.key(manifest_key(d)))})
    return out


def resolve(objects: ObjectStore, ref: str) -> Manifest:
    """The manifest ``ref`` names at the location: its digest (``sha256:`` optional), a
    unique prefix of it (8 hex digits at least), or the template's digest or id."""
    r = ref.removeprefix("sha256:").lower()
    if len(r) < 8 or not all(c in "0123456789abcdef" for c in r):
        raise InvalidArgument(f"pull template {ref!r}: not a digest (8 to 64 hex digits)", op="pull template",
                              obj=ref)
    if len(r) == 64:
        try:
            return fetch_manifest(objects, r)
        except RemoteError as e:
            if e.errno != errno.ENOENT:
                raise
    found = {}
    for d in manifests(objects):
        if d.startswith(r):
            found[d] = fetch_manifest(objects, d)
    if not found:  # by the template's digest
        for d in manifests(objects):
            m = fetch_manifest(objects, d)
            if m.template.startswith(r):
                found[d] = m
    if not found:
        raise NotFound(f"pull template {ref}: no manifest or template with that digest at {objects.cfg.location()}",
                       op="pull template", obj=ref, hint="`cowdisk template ls --remote` lists them")
    if len({m.template for m in found.values()}) > 1:
        raise InvalidArgument(f"pull template {ref}: matches {len(found)} templates: {', '.join(sorted(found))}",
                              op="pull template", obj=ref, hint="give more digits")
    return sorted(found.values(), key=lambda m: m.chunk_size)[0]
