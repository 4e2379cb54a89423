"""What the object-store tests share (tests/ceph/test_remote.py, test_lazy.py): the remote
config a store is given, a boto3 client of the gateway as the tests' own witness of the
bucket, and a raw image with data, holes, zero and repeated chunks."""

from __future__ import annotations

import json
import os

from testutil import MiB

CHUNK = MiB


def write_config(root: str, rgw: dict[str, str], prefix: str, **extra: object) -> str:
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "remote.toml")
    fields = {**rgw, "prefix": prefix, "chunk_size": CHUNK, **extra}
    with open(path, "w") as f:
        f.write("[remote]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items()))
    os.chmod(path, 0o600)
    return path


def s3(rgw: dict[str, str]):
    """A boto3 client of the gateway: the test's own witness of the bucket."""
    import boto3
    import botocore.config

    return boto3.client("s3", endpoint_url=rgw["endpoint"], aws_access_key_id=rgw["access_key"],
                        aws_secret_access_key=rgw["secret_key"], region_name=rgw["region"],
                        config=botocore.config.Config(s3={"addressing_style": "path"}))


def keys(rgw: dict[str, str], prefix: str) -> dict[str, int]:
    out = {}
    for page in s3(rgw).get_paginator("list_objects_v2").paginate(Bucket=rgw["bucket"], Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = o["Size"]
    return out


def make_image(path: str, size: int = 16 * MiB) -> dict[int, bytes]:
    """A raw image: random chunks 0 and 3 (3 only half written), chunk 7 a copy of chunk 0,
    chunk 5 written zeros, the rest holes. Returns the data chunks."""
    a, b = os.urandom(CHUNK), os.urandom(CHUNK // 2) + bytes(CHUNK // 2)
    with open(path, "wb") as f:
        f.truncate(size)
        for i, data in ((0, a), (3, b[:CHUNK // 2]), (5, bytes(CHUNK)), (7, a)):
            f.seek(i * CHUNK)
            f.write(data)
    return {0: a, 3: b, 7: a}


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then closed): connections are refused."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def chunked(image: str, chunk_size: int = CHUNK) -> tuple[object, dict[str, bytes]]:
    """``image`` cut into chunks by the project's format (remote/chunks.py): its manifest and
    the objects a push would store (key -> compressed chunk), holes and zero chunks left out."""
    import hashlib

    from cowdisk.digest import sha256_file
    from cowdisk.remote.chunks import Manifest, chunk_key, compress, read_chunks

    size = os.path.getsize(image)
    blobs: dict[str, bytes] = {}
    names: list[str | None] = []
    fd = os.open(image, os.O_RDONLY)
    try:
        for _, data in read_chunks(fd, size, chunk_size):
            if data is None:
                names.append(None)
                continue
            name = hashlib.sha256(data).hexdigest()
            blobs[chunk_key(name)] = compress(data)
            names.append(name)
    finally:
        os.close(fd)
    return Manifest(sha256_file(image), size, chunk_size, tuple(names)), blobs


def chunk_dir(blobs: dict[str, bytes], d: str):
    """The objects written as files under ``d`` (``d/chunks/<sha256>``, as the bucket's keys),
    and a ``get(key)`` reading them: a local source for the cache's own fetch path
    (remote/cache.py ChunkCache: checked, written, synced, recorded), as the object store's
    client would hand it the bytes. A file altered in ``d`` is a chunk altered in the bucket."""
    for key, blob in blobs.items():
        os.makedirs(os.path.dirname(os.path.join(d, key)), exist_ok=True)
        with open(os.path.join(d, key), "wb") as f:
            f.write(blob)

    def get(key: str) -> bytes:
        with open(os.path.join(d, key), "rb") as f:
            return f.read()

    return get


def offline_lazy(store, image: str, *, hold: set[int] | None = None, chunk_size: int = CHUNK,
                 timeout: float = 1.0, **config: object) -> tuple[str, object]:
    """What `template pull --lazy` leaves on a host, made without an object store: the
    image cut into chunks by the project's format (remote/chunks.py), the store's cache of
    its manifest, the chunks ``hold`` (None: every data chunk) fetched into it by the
    cache's own fetch path (remote/cache.py: checked, written, synced, then recorded) from
    the chunks in memory, and a remote config whose endpoint refuses connections (a chunk
    the cache lacks is then an error to its reader, never data). Returns the manifest's
    URL (a manifest the cache holds is not fetched again) and the manifest. ``timeout``: the
    config's (a fetch's bound is three times it); ``config``: more keys of it (cache_cap)."""
    from cowdisk.remote.cache import ChunkCache

    m, blobs = chunked(image, chunk_size)
    cache = os.path.join(store.data_root, "lazy", m.digest)
    ChunkCache.create(cache, m)
    c = ChunkCache(cache, m, lambda key: blobs[key], where=lambda key: key)
    try:
        for i, name in enumerate(m.chunks):
            if name is not None and (hold is None or i in hold):
                c.ensure(i)
    finally:
        c.close()
    cfg = {"endpoint": f"http://127.0.0.1:{closed_port()}", "access_key": "k", "secret_key": "s",
           "bucket": "cowdisk-templates", "region": "default", "timeout": timeout, **config}
    path = os.path.join(store.root, "remote.toml")
    with open(path, "w") as f:
        f.write("[remote]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in cfg.items()))
    os.chmod(path, 0o600)
    return f"s3://cowdisk-templates/manifests/{m.digest}", m


def nbd_pread(sock, length: int, offset: int) -> bytes:
    """One NBD_CMD_READ on ``sock`` (a connection ``cowdisk.kernel.nbd.open_export`` made:
    in the transmission phase, simple replies): the bytes, or OSError with the server's
    errno (an NBD error number is the errno)."""
    import struct

    sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, offset, length))

    def recv(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            part = sock.recv(n - len(buf))
            if not part:
                raise ConnectionResetError(104, "the NBD server closed the connection")
            buf += part
        return buf

    magic, err, _ = struct.unpack(">IIQ", recv(16))
    assert magic == 0x67446698, hex(magic)
    if err:
        raise OSError(err, os.strerror(err))
    return recv(length)


def nbd_pread_many(sock, length: int, offsets: list[int]) -> dict[int, bytes]:
    """NBD_CMD_READs of ``length`` bytes at each of ``offsets``, all sent before any reply is
    read (the server works on them at once, in as many of its threads): offset -> bytes."""
    import struct

    sock.sendall(b"".join(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, off, length) for i, off in enumerate(offsets)))
    f = sock.makefile("rb")
    out = {}
    for _ in offsets:
        magic, err, handle = struct.unpack(">IIQ", f.read(16))
        assert magic == 0x67446698 and not err, (hex(magic), err)
        out[offsets[handle]] = f.read(length)
    return out
