"""Templates on demand: a template as content-addressed chunks in an S3-compatible object
store (docs/remote.md).

``config.py`` (where the bucket is: the ``[remote]`` TOML table), ``s3.py`` (the object
store through boto3: get, put, exists, list, every failure a ``RemoteError`` with an
errno), ``chunks.py`` (the format: fixed-size chunks named by SHA-256, zstd, zero chunks
not stored, the manifest named by its own digest), ``transfer.py`` (push, pull, find,
list). The store (``cowdisk.store.remote``) calls these; nothing here imports the store.
"""

from __future__ import annotations

from .config import SCHEME, RemoteConfig, load, parse_location

MANIFEST_DIR = "manifests"


def split_manifest_url(url: str) -> tuple[str, str] | None:
    """``s3://BUCKET[/PREFIX]/manifests/DIGEST`` -> (``s3://BUCKET[/PREFIX]``, DIGEST); None
    when ``url`` is not such a URL (then it is a digest to look up)."""
    if not url.startswith(SCHEME):
        return None
    head, _, digest = url.rstrip("/").rpartition(f"/{MANIFEST_DIR}/")
    if not head or len(digest) != 64:
        from ..errors import InvalidArgument

        raise InvalidArgument(f"pull template {url}: not the URL of a manifest", op="pull template", obj=url,
                              hint="s3://BUCKET[/PREFIX]/manifests/<64 hex digits>, as `template push` prints")
    parse_location(head)
    return head, digest.lower()


__all__ = ["RemoteConfig", "load", "parse_location", "split_manifest_url", "SCHEME"]
