"""Templates on demand: a template as content-addressed chunks in an S3-compatible object
store (docs/remote.md).

``config.py`` (where the bucket is: the ``[remote]`` TOML table), ``s3.py`` (the object
store through boto3: get, put, exists, list, every failure a ``RemoteError`` with an
errno), ``chunks.py`` (the format: fixed-size chunks named by SHA-256, zstd, zero chunks
not stored, the manifest named by its own digest), ``transfer.py`` (push, pull, find,
list). The store (``cowdisk.store.remote``) calls these; nothing here imports the store.
"""

from __future__ import annotations

import re

from ..errors import InvalidArgument
from .config import SCHEME, RemoteConfig, load, parse_location

MANIFEST_DIR = "manifests"
_HEX64 = re.compile("[0-9a-f]{64}")
_DIGEST = re.compile("(sha256:)?[0-9a-fA-F]{8,64}")


def check_source(source: str, op: str = "pull template") -> str:
    """What a pull names, checked before anything is fetched: a manifest URL
    (``s3://BUCKET[/PREFIX]/manifests/<64 hex digits>``, as push prints it) or a manifest or
    template digest (8 to 64 hex digits, ``sha256:`` optional). InvalidArgument otherwise."""
    if source.startswith(SCHEME):
        split_manifest_url(source)
    elif not _DIGEST.fullmatch(source):
        raise InvalidArgument(f"{op} {source!r:.200}: neither a manifest URL nor a digest (8 to 64 hex digits)",
                              op=op, obj=source[:200], hint="s3://BUCKET[/PREFIX]/manifests/<digest> as `template "
                                                            "push` prints it, or a digest (`template ls --remote`)")
    return source


def split_manifest_url(url: str) -> tuple[str, str] | None:
    """``s3://BUCKET[/PREFIX]/manifests/DIGEST`` -> (``s3://BUCKET[/PREFIX]``, DIGEST); None
    when ``url`` is not such a URL (then it is a digest to look up)."""
    if not url.startswith(SCHEME):
        return None
    head, _, digest = url.rstrip("/").rpartition(f"/{MANIFEST_DIR}/")
    if not head or not _HEX64.fullmatch(digest.lower()):
        raise InvalidArgument(f"pull template {url!r:.300}: not the URL of a manifest", op="pull template",
                              obj=url[:300],
                              hint="s3://BUCKET[/PREFIX]/manifests/<64 hex digits>, as `template push` prints")
    parse_location(head)
    return head, digest.lower()


__all__ = ["check_source", "RemoteConfig", "load", "parse_location", "split_manifest_url", "SCHEME"]
