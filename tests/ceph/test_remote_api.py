"""Templates in an object store through the daemon (issue 25, item 5), on the session
cluster's real RADOS Gateway and real cowdiskd processes over their unix sockets.

Store A's daemon pushes, store B's daemon pulls (a whole template, and a lazy one read
through the file a VMM is given) as jobs with progress; a pull cancelled in the middle
leaves nothing, a push cancelled before its manifest only chunks; the command line gives
the same documents directly and through a daemon; a non-root caller pushes only what it
may see, pulls into templates of its own, cannot stop lazy servers (the host's), and
never sees the remote config's keys.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from typing import Any, Iterator
from unittest.mock import ANY

import pytest

from cowdisk.errors import InvalidArgument, NotFound
from cowdisk.remote import lazy
from daemonutil import Daemon, call_as, env, job_as, public_tmpdir, raises, wait_for
from remoteutil import keys, make_image, write_config
from testutil import MiB, sha

pytestmark = pytest.mark.root

UID = 4242


@contextlib.contextmanager
def daemon(root: str, sockdir: str, name: str, *args: str, extra_env: dict[str, str] | None = None
           ) -> Iterator[Daemon]:
    """A cowdiskd on ``root`` for the block, stopped (SIGTERM, exit 0) at its end."""
    with Daemon(root, os.path.join(sockdir, f"{name}.sock"), *args, extra_env=extra_env).start() as d:
        yield d
        assert d.stop() == 0, d.log()


@pytest.fixture
def sockdir() -> Iterator[str]:
    with public_tmpdir("cdr-") as d:
        yield d


@pytest.fixture
def pushed(tmp_path, hosts) -> Iterator[tuple[Any, Any, str, str]]:
    """Store A with template ``base`` (a 16 MiB image: data in chunks 0, 3 and 7); yields
    (a, b, prefix, image)."""
    a, b, prefix = hosts
    img = str(tmp_path / "img.raw")
    make_image(img)
    a.import_template(img, "base")
    yield a, b, prefix, img


def cli(root: str, *args: str, sock: str | None = None) -> dict[str, Any]:
    extra = {"COWDISK_SOCKET": sock} if sock else {"COWDISK_SOCKET": "/nonexistent"}
    p = subprocess.run([sys.executable, "-m", "cowdisk", "--root", root, "--json", *args], capture_output=True,
                       text=True, env=env(**extra), timeout=120)
    assert p.returncode == 0, (args, p.stdout, p.stderr)
    out: dict[str, Any] = json.loads(p.stdout)
    return out


def test_push_pull_and_lazy_through_the_daemons_and_the_cli(tmp_path, sockdir, pushed) -> None:
    a, b, _, img = pushed
    with daemon(a.root, sockdir, "a") as da, daemon(b.root, sockdir, "b") as db:
        ca, cb = da.client, db.client
        stages: list[str] = []
        r = ca.push_template("base", progress=lambda done, total, stage="": stages.append(stage) if stage else None)
        assert r["digest"] == a.template("base").digest and (r["uploaded_chunks"], r["present_chunks"]) == (2, 0)
        assert any(s.startswith("push ") for s in stages), stages  # the job's progress, from the store worker
        job = [j for j in ca.jobs() if j["op"] == "push template"][-1]
        assert (job["state"], job["result"]) == ("succeeded", r)

        t = cb.pull_template(r["url"], "base")
        assert t.digest == r["digest"] and sha(t.path) == sha(img) and t.owner == 0
        assert [(x["manifest"], x["local"]) for x in cb.remote_templates()] == [(r["manifest"], True)]
        assert b.template("base").id == t.id  # in B's registry, seen by the library too

        d = cb.lazy_template(r["manifest"][:12])
        assert d["url"].startswith("nbd+unix:///?socket=") and d["cached_chunks"] == 0 and d["pid"]
        f, pidf = str(tmp_path / "lazy.img"), str(tmp_path / "qsd.pid")
        lazy.export_file(lazy.server(d["cache"]), f, pidf)
        try:
            assert sha(f) == sha(img)  # every byte, fetched on demand by the server the daemon started
        finally:
            lazy.unexport_file(f, pidf)
        [row] = cb.lazy_templates()
        assert (row["manifest"], row["cached_chunks"], row["pid"]) == (d["manifest"], 3, d["pid"])
        assert cb.record_read_order(d["manifest"])["chunks"] == 3

        # the command line: the same --json documents through the daemons as directly (the
        # command line's own store, or the library it calls)
        assert cli(a.root, "template", "push", "base", sock=da.sock) == cli(a.root, "template", "push", "base") \
            == {**r, "uploaded_chunks": 0, "uploaded_bytes": 0, "present_chunks": 2}
        assert cli(b.root, "template", "ls", "--remote", sock=db.sock) == cli(b.root, "template", "ls", "--remote")
        assert cli(b.root, "template", "pull", r["url"], "--name", "b2", sock=db.sock) == \
            b.template_doc(b.template("b2"))
        assert cli(b.root, "template", "pull", "--lazy", d["manifest"], sock=db.sock) == \
            {**b.lazy_templates()[0], "stats": ANY, "id": t.id}
        assert cli(b.root, "template", "ls", "--lazy", sock=db.sock) == {"templates": b.lazy_templates()}
        assert cli(b.root, "template", "record-order", d["manifest"], sock=db.sock) == \
            b.record_read_order(d["manifest"])
        ops = {(x.get("op"), x.get("result")) for x in db.log_records(lambda rs: sum(
            x.get("op") == "record read order" for x in rs) == 2)}
        assert {("pull template", "ok"), ("serve lazy template", "ok"), ("record read order", "ok")} <= ops, ops
        assert sum(x.get("op") == "push template" and x.get("result") == "ok" for x in da.log_records(
            lambda rs: sum(x.get("op") == "push template" and x.get("result") == "ok" for x in rs) == 2)) == 2

        assert cb.stop_lazy_template(d["manifest"]) is True
        assert cb.lazy_templates()[0]["pid"] is None and cb.stop_lazy_template(d["manifest"]) is False

        # bad input: refused before any job starts, naming the operation and the object
        e = raises(cb.record_read_order, "0" * 64)
        assert isinstance(e, NotFound) and e.op == "record read order" and "0" * 64 in e.message
        for call in (lambda: ca.push_template("base", "s3://b\u00e9/x"), lambda: cb.pull_template("s3://b/../x"),
                     lambda: cb.pull_template("12345678;rm"), lambda: cb.remote_templates("http://x"),
                     lambda: cb.pull_template(r["url"][:-1] + "g")):
            e = raises(call)
            assert isinstance(e, InvalidArgument), e
        assert len(ca.jobs()) == 2 and len(cb.jobs()) == 4  # the client's and the command line's


def test_a_cancelled_pull_or_push_leaves_nothing_or_only_chunks(tmp_path, sockdir, rgw, pushed) -> None:
    """Jobs cancelled while they stand at a pause point: a pull after making its staging
    file ends cancelled with no template and no staging directory left; a push with every
    chunk up ends cancelled before its manifest (the bucket has the chunks, no manifest),
    and the next push uploads no chunk again; a lazy prefetch stops fetching."""
    a, b, prefix, _ = pushed
    img = str(tmp_path / "other.raw")
    make_image(img)
    b.import_template(img, "other")
    url = b.push_template("other")["url"]
    with open(img, "wb") as f:  # 32 chunks of 64 KiB for a prefetch
        f.write(os.urandom(2 * MiB))
    write_config(b.root, rgw, prefix, chunk_size=64 << 10)
    b.import_template(img, "many")
    many = b.push_template("many")["url"]
    mark = str(tmp_path / "mark")
    with daemon(a.root, sockdir, "a", extra_env={"COWDISK_PAUSE_AT": "pull:fetch,push:manifest,prefetch:start",
                                                "COWDISK_PAUSE_S": "1.5", "COWDISK_PAUSE_MARK": mark}) as da:
        c = da.client

        def cancelled(path: str, body: dict[str, Any], check: Any) -> None:
            job = c.start_job("POST", path, body)
            wait_for(lambda: os.path.exists(mark), what=f"{path} at its pause point")
            os.unlink(mark)
            check()
            c.cancel(job["id"])
            while job["state"] in ("queued", "running"):
                job = c.job(job["id"], wait=30, since=job["seq"])
            assert job["state"] == "cancelled" and job["error"]["type"] == "Cancelled", job

        staging = os.path.join(a.data_root, "templates")
        was = {t.id for t in a.templates()}
        cancelled("/v1/templates/pull", {"source": url, "name": "other"},
                  lambda: [n for n in os.listdir(staging) if n.startswith(".staging")] or pytest.fail("no staging"))
        assert {t.id for t in c.templates()} == was
        assert [n for n in os.listdir(staging) if n.startswith(".staging")] == []

        manifests = set(keys(rgw, f"{prefix}/manifests/"))
        cancelled("/v1/templates/base/push", {}, lambda: None)
        assert set(keys(rgw, f"{prefix}/manifests/")) == manifests  # no manifest of base's

        # a lazy prefetch of 32 chunks cancelled before its first fetch: the fetches in
        # flight end (8 at a time), the queued ones never start; the cache stays whole
        cancelled("/v1/lazy-templates", {"source": many, "prefetch": True}, lambda: None)
        [lz] = c.lazy_templates()
        assert lz["data_chunks"] == 32 and lz["cached_chunks"] <= 16, lz
    r = a.push_template("base")
    assert (r["uploaded_chunks"], r["present_chunks"]) == (0, 2), r  # its chunks went up before the cancel
    assert f"{prefix}/manifests/{r['manifest']}" in set(keys(rgw, f"{prefix}/manifests/")) - manifests


def test_a_non_root_caller(tmp_path, sockdir, rgw, pushed) -> None:
    """uid 4242 on B's daemon: root's unshared template is a 404 to push (as a missing one);
    the bucket's listing does not tell it which templates root keeps; it pulls a template
    of its own, not content root keeps to itself; it serves its own template lazily, but
    stopping a server and recording a read order are root's; no answer carries the remote
    config's keys."""
    a, b, _, _ = pushed
    url = a.push_template("base")["url"]
    img = str(tmp_path / "secret.raw")
    make_image(img)
    b.import_template(img, "secret")
    secret = b.push_template("secret")
    with daemon(b.root, sockdir, "b", "--socket-mode", "0666", "--allow-uid", str(UID)) as db:
        sock = db.sock
        seen: list[Any] = []

        def call(method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
            code, doc = call_as(sock, UID, method, path, body)
            seen.append(doc)
            return code, doc

        def job(method: str, path: str, body: Any) -> dict[str, Any]:
            code, doc = call(method, path, body)
            assert code == 202, doc
            doc = job_as(sock, UID, doc)
            seen.append(doc)
            return doc

        code, doc = call("POST", "/v1/templates/secret/push", {})
        code2, doc2 = call("POST", "/v1/templates/nosuch/push", {})
        assert (code, code2) == (404, 404) and doc["error"]["message"] == doc2["error"]["message"].replace(
            "nosuch", "secret"), (doc, doc2)
        code, doc = call("GET", "/v1/remote/templates")
        assert code == 200 and {r["manifest"]: r["local"] for r in doc["templates"]} == {
            url.rsplit("/", 1)[1]: False, secret["manifest"]: False}, doc
        assert {r["manifest"]: r["local"] for r in db.client.remote_templates()}[secret["manifest"]] is True  # root

        mine = job("POST", "/v1/templates/pull", {"source": url, "name": "mine"})
        assert mine["state"] == "succeeded" and (mine["result"]["owner"], mine["result"]["names"]) == (UID, ["mine"])
        assert b.template("mine").owner == UID
        theirs = job("POST", "/v1/templates/pull", {"source": secret["url"]})
        assert theirs["state"] == "failed" and theirs["error"]["type"] == "AlreadyExists", theirs
        served = job("POST", "/v1/lazy-templates", {"source": url})  # its own content: its own template
        assert served["state"] == "succeeded" and served["result"]["id"] == mine["result"]["id"], served
        code, doc = call("GET", "/v1/lazy-templates")
        assert code == 200 and [r["manifest"] for r in doc["templates"]] == [url.rsplit("/", 1)[1]], doc
        for action in ("stop", "record-order"):  # the host's server, the bucket's sidecar: root's
            code, doc = call("POST", f"/v1/lazy-templates/{url.rsplit('/', 1)[1]}/{action}")
            assert code == 403 and doc["error"]["type"] == "Forbidden", doc

        text = json.dumps(seen)
        for key in ("secret_key", "access_key"):
            assert rgw[key] not in text
        assert "remote.toml" not in text
