"""Templates in an object store, on the session cluster's real RADOS Gateway (S3).

Two stores on this machine stand for two hosts: A pushes a template as chunks, B (which
never saw it) pulls it; what is in the bucket is read back with boto3 and zstandard, not
through cowdisk. A chunk or manifest altered in the bucket is an EIO, never a template
with wrong bytes; a gateway that went away is an error within the configured bound.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from cowdisk.errors import RemoteError
from daemonutil import env
from remoteutil import CHUNK, keys, make_image, s3, write_config
from testutil import sha

pytestmark = pytest.mark.root


def test_push_on_a_pull_on_b(tmp_path, rgw, hosts):
    """A pushes: only the distinct data chunks are stored (zstd, named by the SHA-256 of their
    bytes; holes and zero chunks not at all), then the manifest; pushing again uploads
    nothing. B pulls it by URL and by digest: the same bytes, one template."""
    a, b, prefix = hosts
    img = str(tmp_path / "img.raw")
    chunks = make_image(img)
    t = a.import_template(img, "base")
    r = a.push_template("base")
    assert (r["chunks"], r["zero_chunks"], r["distinct_chunks"]) == (16, 13, 2)
    assert (r["uploaded_chunks"], r["present_chunks"]) == (2, 0)
    import zstandard

    stored = keys(rgw, f"{prefix}/chunks/")
    want = {hashlib.sha256(c).hexdigest() for c in chunks.values()}
    assert {k.rsplit("/", 1)[1] for k in stored} == want
    for k in stored:
        body = s3(rgw).get_object(Bucket=rgw["bucket"], Key=k)["Body"].read()
        assert hashlib.sha256(zstandard.ZstdDecompressor().decompress(body)).hexdigest() == k.rsplit("/", 1)[1]
    manifests = keys(rgw, f"{prefix}/manifests/")
    assert list(manifests) == [f"{prefix}/manifests/{r['manifest']}"]
    assert r["url"] == f"s3://{rgw['bucket']}/{prefix}/manifests/{r['manifest']}"
    body = s3(rgw).get_object(Bucket=rgw["bucket"], Key=f"{prefix}/manifests/{r['manifest']}")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == r["manifest"]
    assert json.loads(body)["template"] == t.digest

    again = a.push_template("base")
    assert (again["uploaded_chunks"], again["uploaded_bytes"], again["present_chunks"]) == (0, 0, 2)
    assert again["manifest"] == r["manifest"]

    assert b.templates() == []
    tb = b.pull_template(r["url"], "base")
    assert tb.digest == t.digest and tb.source == r["url"]
    assert sha(tb.path) == sha(img)
    same = b.pull_template(r["manifest"][:12], "other")  # by a digest prefix: the same template
    assert same.id == tb.id and set(same.names) == {"base", "other"}
    assert [x["manifest"] for x in b.remote_templates()] == [r["manifest"]]
    assert b.remote_templates()[0]["local"] is True


def test_changed_blocks_upload_only_their_chunks(tmp_path, hosts):
    """A template that differs from a pushed one in one block uploads only that block's chunk."""
    a, _, _ = hosts
    img = str(tmp_path / "img.raw")
    make_image(img)
    a.import_template(img, "v1")
    a.push_template("v1")
    with open(img, "r+b") as f:
        f.seek(3 * CHUNK + 4096)
        f.write(os.urandom(4096))
    a.import_template(img, "v2")
    r = a.push_template("v2")
    assert (r["uploaded_chunks"], r["present_chunks"]) == (1, 1)
    assert r["uploaded_bytes"] < CHUNK + 64 * 1024  # one chunk (compressed) and the manifest


def test_corrupt_chunk_or_manifest_is_eio(tmp_path, rgw, hosts):
    """A chunk replaced in the bucket (valid zstd of other bytes, or not zstd at all), or an
    altered manifest: the pull fails with EIO naming the object, and B has no template and
    no staging file left."""
    import zstandard

    a, b, prefix = hosts
    img = str(tmp_path / "img.raw")
    chunks = make_image(img)
    a.import_template(img, "base")
    r = a.push_template("base")
    key = f"{prefix}/chunks/{hashlib.sha256(chunks[3]).hexdigest()}"
    client = s3(rgw)
    for bad in (zstandard.ZstdCompressor().compress(os.urandom(CHUNK)), b"not zstd at all"):
        client.put_object(Bucket=rgw["bucket"], Key=key, Body=bad)
        with pytest.raises(RemoteError) as e:
            b.pull_template(r["url"])
        assert e.value.errno == errno.EIO and key in str(e.value), str(e.value)
        assert b.templates() == []
        assert [n for n in os.listdir(os.path.join(b.data_root, "templates")) if n.startswith(".staging")] == []
    mkey = f"{prefix}/manifests/{r['manifest']}"
    body = client.get_object(Bucket=rgw["bucket"], Key=mkey)["Body"].read()
    client.put_object(Bucket=rgw["bucket"], Key=mkey, Body=body.replace(b'"size":', b'"size": '))
    with pytest.raises(RemoteError) as e:
        b.pull_template(r["url"])
    assert e.value.errno == errno.EIO and r["manifest"] in str(e.value)


def test_gateway_down_fails_within_the_bound(tmp_path, rgw, ceph_cluster, hosts):
    """The gateway stopped: push, pull and the listing fail with an errno naming the
    endpoint, each within the configured timeout's bound; once it is back they work."""
    a, b, prefix = hosts
    img = str(tmp_path / "img.raw")
    make_image(img)
    a.import_template(img, "base")
    r = a.push_template("base")
    write_config(b.root, rgw, prefix, timeout=2)
    ceph_cluster.stop_rgw()
    try:
        for call in (lambda: b.pull_template(r["url"]), lambda: a.push_template("base"), b.remote_templates):
            t0 = time.monotonic()
            with pytest.raises(RemoteError) as e:
                call()
            assert e.value.errno in (errno.ECONNREFUSED, errno.ETIMEDOUT, errno.ECONNRESET), str(e.value)
            assert rgw["endpoint"] in str(e.value)
            assert time.monotonic() - t0 < 30
    finally:
        ceph_cluster.start_rgw()
    assert b.pull_template(r["url"]).digest == a.template("base").digest


def test_cli_push_pull_ls(tmp_path, rgw, hosts):
    """The command line: push prints the URL, ls --remote lists the manifest, pull by URL
    registers it; a config file others can read is refused, naming it."""
    a, b, prefix = hosts
    img = str(tmp_path / "img.raw")
    make_image(img)
    a.import_template(img, "base")

    def cli(root: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cowdisk", "--root", root, "--json", *args],
                              capture_output=True, text=True, env=env(), timeout=120)

    p = cli(a.root, "template", "push", "base")
    assert p.returncode == 0, p.stderr
    pushed = json.loads(p.stdout)
    p = cli(b.root, "template", "ls", "--remote")
    assert p.returncode == 0, p.stderr
    assert [(x["manifest"], x["local"]) for x in json.loads(p.stdout)["templates"]] == [(pushed["manifest"], False)]
    p = cli(b.root, "template", "pull", pushed["url"], "--name", "base")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["digest"] == pushed["digest"]
    os.chmod(os.path.join(b.root, "remote.toml"), 0o644)
    p = cli(b.root, "template", "ls", "--remote")
    assert p.returncode == 2 and "remote.toml" in p.stdout and "0644" in p.stdout, (p.stdout, p.stderr)
