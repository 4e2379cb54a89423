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
