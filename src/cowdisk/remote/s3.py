"""The object store: any S3-compatible endpoint through boto3 (Ceph's RADOS Gateway in the
tests). Four calls: get, put, exists, list. Every failure is a :class:`RemoteError`
naming the call, the object key and an errno (ETIMEDOUT past the config's timeout,
ECONNREFUSED when nothing answers, ENOENT for a missing key, EACCES when refused).

boto3 is imported on first use, not with :mod:`cowdisk`: the command line and the client
do not pay for it unless they talk to a bucket. One client is thread-safe and shared by
the transfer threads.
"""

from __future__ import annotations

import errno
import logging
import threading
from typing import Any, Iterator

from ..errors import RemoteError
from .config import RemoteConfig

log = logging.getLogger(__name__)

_ERRNO_OF_CODE = {"NoSuchKey": errno.ENOENT, "404": errno.ENOENT, "NotFound": errno.ENOENT,
                  "NoSuchBucket": errno.ENOENT, "AccessDenied": errno.EACCES, "403": errno.EACCES,
                  "InvalidAccessKeyId": errno.EACCES, "SignatureDoesNotMatch": errno.EACCES,
                  "SlowDown": errno.EAGAIN, "503": errno.EAGAIN}


class ObjectStore:
    """One bucket (and prefix) of an S3 endpoint."""

    def __init__(self, cfg: RemoteConfig, *, timeout: float | None = None, attempts: int = 3) -> None:
        """``timeout``: seconds each connect and each read may take (default: the config's);
        ``attempts``: tries per call (boto3's standard retry mode, for 5xx and throttling)."""
        import boto3
        import botocore.config

        self.cfg = cfg
        t = cfg.timeout if timeout is None else timeout
        self._client: Any = boto3.session.Session().client(
            "s3", endpoint_url=cfg.endpoint, aws_access_key_id=cfg.access_key,
            aws_secret_access_key=cfg.secret_key, region_name=cfg.region,
            config=botocore.config.Config(s3={"addressing_style": "path"}, connect_timeout=t, read_timeout=t,
                                          retries={"max_attempts": attempts, "mode": "standard"},
                                          max_pool_connections=32, tcp_keepalive=True))
        self._bucket_checked = False
        self._lock = threading.Lock()

    def url(self, key: str) -> str:
        return f"s3://{self.cfg.bucket}/{key}"

    def _error(self, op: str, key: str, e: Exception) -> RemoteError:
        import botocore.exceptions as bx

        if isinstance(e, (bx.ConnectTimeoutError, bx.ReadTimeoutError)):
            err = errno.ETIMEDOUT
        elif isinstance(e, bx.EndpointConnectionError):
            err = errno.ECONNREFUSED
        elif isinstance(e, bx.ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            err = _ERRNO_OF_CODE.get(code, errno.EIO)
        elif isinstance(e, (bx.ConnectionClosedError, bx.ConnectionError)):
            err = errno.ECONNRESET
        elif isinstance(e, OSError) and e.errno:
            err = e.errno
        else:
            err = errno.EIO
        return RemoteError(f"object store {op}", self.url(key), err, detail=f"{self.cfg.endpoint}: {e}")

    def ensure_bucket(self) -> None:
        """Make the bucket when it does not exist (pushing into a new one)."""
        if self._bucket_checked:
            return
        import botocore.exceptions as bx

        with self._lock:
            try:
                self._client.head_bucket(Bucket=self.cfg.bucket)
            except bx.ClientError as e:
                if str(e.response.get("Error", {}).get("Code", "")) not in ("404", "NoSuchBucket", "NotFound"):
                    raise self._error("check bucket", "", e) from None
                try:
                    self._client.create_bucket(Bucket=self.cfg.bucket)
                except bx.ClientError as e2:
                    if str(e2.response.get("Error", {}).get("Code", "")) not in ("BucketAlreadyOwnedByYou",):
                        raise self._error("create bucket", "", e2) from None
                except bx.BotoCoreError as e2:
                    raise self._error("create bucket", "", e2) from None
            except bx.BotoCoreError as e:
                raise self._error("check bucket", "", e) from None
            self._bucket_checked = True

    def get(self, key: str) -> bytes:
        import botocore.exceptions as bx

        try:
            r = self._client.get_object(Bucket=self.cfg.bucket, Key=key)
            return bytes(r["Body"].read())
        except (bx.BotoCoreError, bx.ClientError, OSError) as e:
            raise self._error("get", key, e) from None

    def put(self, key: str, data: bytes) -> None:
        import botocore.exceptions as bx

        try:
            self._client.put_object(Bucket=self.cfg.bucket, Key=key, Body=data)
        except (bx.BotoCoreError, bx.ClientError, OSError) as e:
            raise self._error("put", key, e) from None

    def exists(self, key: str) -> bool:
        import botocore.exceptions as bx

        try:
            self._client.head_object(Bucket=self.cfg.bucket, Key=key)
            return True
        except bx.ClientError as e:
            if self._error("head", key, e).errno == errno.ENOENT:
                return False
            raise self._error("head", key, e) from None
        except (bx.BotoCoreError, OSError) as e:
            raise self._error("head", key, e) from None

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(key, size) of every object whose key starts with ``prefix``."""
        import botocore.exceptions as bx

        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.cfg.bucket,
                                                                                Prefix=prefix):
                for o in page.get("Contents", []):
                    yield str(o["Key"]), int(o["Size"])
        except bx.ClientError as e:
            if str(e.response.get("Error", {}).get("Code", "")) == "NoSuchBucket":
                return
            raise self._error("list", prefix, e) from None
        except (bx.BotoCoreError, OSError) as e:
            raise self._error("list", prefix, e) from None
