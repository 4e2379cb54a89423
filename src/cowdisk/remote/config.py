"""Where the object store is and how to reach it: one TOML file with a ``[remote]`` table.

The file is, first found: ``$COWDISK_REMOTE_CONFIG``, ``<store root>/remote.toml``,
``/etc/cowdisk/remote.toml``. It holds a secret key, so it must be readable by its
owner only (mode 0600 or stricter); a wider file is refused, naming it::

    [remote]
    endpoint = "http://127.0.0.1:7480"   # any S3-compatible endpoint (Ceph's RADOS Gateway...)
    access_key = "..."
    secret_key = "..."
    region = "default"
    bucket = "cowdisk-templates"
    prefix = "templates"                 # optional: keys live under this prefix
    timeout = 10                         # seconds one request may take (connect, then each read)
    chunk_size = 524288                  # bytes per chunk when pushing (a power of two, 64 KiB..16 MiB)
    cache_cap = 10737418240              # bytes lazy templates' caches may hold (gc trims; 0: no cap)

A location on the command line, ``s3://BUCKET[/PREFIX]``, overrides the file's bucket and
prefix (the endpoint and keys still come from the file).
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import tomllib
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidArgument, NotFound

ENV = "COWDISK_REMOTE_CONFIG"
FILE = "remote.toml"
SYSTEM_FILE = "/etc/cowdisk/remote.toml"
SCHEME = "s3://"
DEFAULT_CHUNK_SIZE = 512 << 10
"""512 KiB: measured against 64 KiB, 256 KiB, 1 MiB and 4 MiB (docs/remote.md, bench/remote.py)."""
MIN_CHUNK, MAX_CHUNK = 64 << 10, 16 << 20


@dataclass(frozen=True)
class RemoteConfig:
    endpoint: str
    access_key: str
    secret_key: str = dataclasses.field(repr=False)
    bucket: str
    region: str = "default"
    prefix: str = ""
    timeout: float = 10.0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    cache_cap: int = 0
    """Bytes the lazy templates' caches of a store may hold (0: no cap); ``gc`` trims to it."""
    source: str = dataclasses.field(default="", compare=False)
    """The file the settings came from (named in errors)."""

    def location(self) -> str:
        """``s3://BUCKET[/PREFIX]``: where templates are pushed and looked up."""
        return SCHEME + self.bucket + (f"/{self.prefix}" if self.prefix else "")

    def key(self, *parts: str) -> str:
        """The object key of ``parts`` under the prefix."""
        return "/".join(([self.prefix] if self.prefix else []) + list(parts))

    def at(self, url: str | None) -> "RemoteConfig":
        """This config pointed at location ``url`` (``s3://BUCKET[/PREFIX]``), or itself."""
        if url is None:
            return self
        bucket, prefix = parse_location(url)
        return dataclasses.replace(self, bucket=bucket, prefix=prefix)


def parse_location(url: str) -> tuple[str, str]:
    """``s3://BUCKET[/PREFIX]`` -> (bucket, prefix without slashes at its ends)."""
    if not url.startswith(SCHEME):
        raise InvalidArgument(f"remote location {url!r}: not an s3:// URL", op="parse remote location", obj=url,
                              hint="s3://BUCKET or s3://BUCKET/PREFIX")
    bucket, _, prefix = url[len(SCHEME):].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise InvalidArgument(f"remote location {url!r:.300}: bad bucket name {bucket!r:.80} (ASCII letters, digits, "
                              "'.' and '-', 1 to 63)", op="parse remote location", obj=url[:300])
    prefix = prefix.strip("/")
    if prefix and (not _PREFIX.fullmatch(prefix) or any(p in ("", ".", "..") for p in prefix.split("/"))):
        raise InvalidArgument(f"remote location {url!r:.300}: bad prefix {prefix!r:.300} (ASCII letters, digits, "
                              "'.', '_', '-' and '/' between parts, at most 512)", op="parse remote location",
                              obj=url[:300])
    return bucket, prefix


_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}")
_PREFIX = re.compile(r"[A-Za-z0-9._/-]{1,512}")
"""What a location may name: a request field is hostile (the daemon takes it from any
allowed caller), so only plain ASCII names reach an object key."""


def find(root: str) -> str | None:
    """The config file in effect for the store at ``root`` (None: there is none)."""
    env = os.environ.get(ENV)
    if env:
        return env
    for path in (os.path.join(root, FILE), SYSTEM_FILE):
        if os.path.exists(path):
            return path
    return None


def load(root: str, url: str | None = None) -> RemoteConfig:
    """The remote config for the store at ``root``, pointed at ``url`` when given."""
    path = find(root)
    if path is None:
        raise NotFound(f"no remote config: neither ${ENV}, {os.path.join(root, FILE)} nor {SYSTEM_FILE} exists",
                       op="load remote config", obj=root,
                       hint="write the [remote] table (endpoint, access_key, secret_key, bucket); see docs/remote.md")
    return read(path).at(url)


def read(path: str) -> RemoteConfig:
    """Read and check one config file (opened once; its mode checked on that descriptor)."""
    op = "read remote config"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise NotFound(f"remote config {path}: no such file", op=op, obj=path) from None
    except OSError as e:
        raise InvalidArgument(f"remote config {path}: {e.strerror}", op=op, obj=path) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"remote config {path}: not a regular file", op=op, obj=path)
        if st.st_mode & 0o077:
            raise InvalidArgument(f"remote config {path}: mode {stat.S_IMODE(st.st_mode):04o} lets others read its "
                                  "secret key", op=op, obj=path, hint=f"chmod 600 {path}")
        try:
            doc = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise InvalidArgument(f"remote config {path}: {e}", op=op, obj=path) from None
    table = doc.get("remote")
    if not isinstance(table, dict):
        raise InvalidArgument(f"remote config {path}: no [remote] table", op=op, obj=path)
    return from_dict(table, path)


def from_dict(table: dict[str, Any], source: str = "") -> RemoteConfig:
    op = "read remote config"
    fields = {f.name: f for f in dataclasses.fields(RemoteConfig) if f.name != "source"}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise InvalidArgument(f"remote config {source}: unknown keys {', '.join(unknown)}", op=op, obj=source,
                              hint=f"known: {', '.join(fields)}")
    missing = [k for k in ("endpoint", "access_key", "secret_key", "bucket") if not table.get(k)]
    if missing:
        raise InvalidArgument(f"remote config {source}: missing {', '.join(missing)}", op=op, obj=source)
    kw: dict[str, Any] = {}
    for k, v in table.items():
        want = float if k == "timeout" else int if k in ("chunk_size", "cache_cap") else str
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, want) or isinstance(v, bool):
            raise InvalidArgument(f"remote config {source}: {k} must be a {want.__name__}", op=op, obj=source)
        kw[k] = v
    cs = int(kw.get("chunk_size", DEFAULT_CHUNK_SIZE))
    if cs & (cs - 1) or not MIN_CHUNK <= cs <= MAX_CHUNK:
        raise InvalidArgument(f"remote config {source}: chunk_size {cs} is not a power of two from "
                              f"{MIN_CHUNK} to {MAX_CHUNK}", op=op, obj=source)
    if int(kw.get("cache_cap", 0)) < 0:
        raise InvalidArgument(f"remote config {source}: cache_cap must be 0 (no cap) or positive", op=op, obj=source)
    if float(kw.get("timeout", 10.0)) <= 0:
        raise InvalidArgument(f"remote config {source}: timeout must be positive", op=op, obj=source)
    if not str(kw["endpoint"]).startswith(("http://", "https://")):
        raise InvalidArgument(f"remote config {source}: endpoint {kw['endpoint']!r} is not an http(s) URL", op=op,
                              obj=source)
    bucket, prefix = parse_location(SCHEME + kw["bucket"] + "/" + str(kw.get("prefix", "")))
    kw.update(bucket=bucket, prefix=prefix)
    return RemoteConfig(source=source, **kw)
