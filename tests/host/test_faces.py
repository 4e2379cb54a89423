"""The store's faces agree (issue 22): the command line through a running daemon does what
it does on the store directly, the API takes the command line's argument forms and gives
its documents, and nothing pulls the store from under a daemon serving it.

One real daemon (``python -m cowdisk serve``, copy backend) serves the module's store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Iterator

import pytest

from cowdisk.errors import InUse, InvalidArgument
from cowdisk.store import Store
from daemonutil import Daemon, env, raises
from testutil import make_tree, write_at

pytestmark = pytest.mark.root

MiB = 1 << 20


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon on a copy store holding template ``base`` (built from a tree under the
    daemon's import root)."""
    top = tmp_path_factory.mktemp("faces")
    sockdir = tempfile.mkdtemp(prefix="cdf-", dir="/tmp")
    root = str(top / "store")
    with Store(root, backend="copy") as s:
        s.build_template(make_tree(str(top / "tree")), "base")
    with Daemon(root, os.path.join(sockdir, "d.sock"), "--import-root", str(top)) as d:
        d.start()
        d.top = str(top)  # type: ignore[attr-defined]
        yield d
        d.stop()  # SIGTERM: its store workers end with it (a SIGKILLed daemon's outlive it a moment)
    shutil.rmtree(sockdir, ignore_errors=True)
    with Store(root, backend="copy") as s:  # its templates are chattr +i: pytest cannot remove them
        s.destroy()


def cli(root: str, *args: str, sock: str | None = None) -> subprocess.CompletedProcess[str]:
    extra = {"COWDISK_SOCKET": sock} if sock else {"COWDISK_SOCKET": "/nonexistent/cowdisk.sock"}
    return subprocess.run([sys.executable, "-m", "cowdisk", "--root", root, *args], capture_output=True, text=True,
                          env=env(**extra), timeout=120)


def both(d: Daemon, *args: str) -> tuple[Any, Any]:
    """The ``--json`` document of a command run on the store directly and through the daemon."""
    out = []
    for sock in (None, d.sock):
        p = cli(d.root, *args, "--json", "-v", sock=sock)
        assert p.returncode == 0, (args, sock, p.stdout, p.stderr)
        assert ("using cowdiskd" in p.stderr) == (sock is not None), p.stderr
        out.append(json.loads(p.stdout))
    return out[0], out[1]


def test_reading_commands_through_the_daemon(served: Daemon) -> None:
    """template ls and inspect, store info and doctor through the daemon: the same documents
    (they failed with AttributeError: 'Client' object has no attribute 'template_doc')."""
    direct, daemon = both(served, "template", "ls")
    assert direct == daemon and [t["names"] for t in daemon["templates"]] == [["base"]]
    assert daemon["templates"][0]["disk_bytes"] > 0
    direct, daemon = both(served, "template", "inspect", "base")
    assert direct == daemon
    direct, daemon = both(served, "store", "info")
    for doc in (direct, daemon):  # what moves between two calls: free space
        doc.pop("free_bytes"), doc.pop("data_free_bytes"), doc.pop("space")
    assert direct == daemon and daemon["backend"] == "copy"
    direct, daemon = both(served, "doctor")
    assert [c["name"] for c in direct["checks"]] == [c["name"] for c in daemon["checks"]]
    assert any(c["name"].startswith("space") for c in daemon["checks"]), daemon["checks"]


def test_flatten_through_the_daemon(served: Daemon) -> None:
    """volume flatten did its work through the daemon and then failed (template_doc)."""
    p = cli(served.root, "volume", "create", "fl1", "-t", "base", "--json", sock=served.sock)
    assert p.returncode == 0, p.stderr
    write_at(json.loads(p.stdout)["link"], 8 * MiB, os.urandom(4096))  # not the template's content any more
    try:
        p = cli(served.root, "volume", "flatten", "fl1", "--name", "fl1-flat", "--json", sock=served.sock)
        assert p.returncode == 0, p.stderr
        doc = json.loads(p.stdout)
        assert doc["names"] == ["fl1-flat"] and doc["disk_bytes"] > 0
        assert served.client.template_doc(served.client.template("fl1-flat")) == doc
    finally:
        served.client.remove_volume("fl1")
        served.client.remove_template("fl1-flat")


def test_api_takes_the_command_lines_forms(served: Daemon) -> None:
    """Sizes with units, the command line's drive format names (only those), and volume
    documents with their links."""
    c = served.client
    base = c.template("base")
    big = base.size + 64 * MiB
    v = c.call("POST", "/v1/volumes", {"id": "sz1", "template": "base", "size": f"{big // MiB}M"})
    try:
        assert v["size"] == big and v["links"] == [v["link"]]
        for bad in ("lots", "0", "-1M", True):
            e = raises(c.call, "POST", "/v1/volumes", {"id": "sz2", "template": "base", "size": bad})
            assert isinstance(e, InvalidArgument) and "size" in str(e), e
        assert c.call("GET", "/v1/volumes/sz1")["links"] == [v["link"]]
        assert c.volume("sz1").links == (v["link"],)
        assert [x["links"] for x in c.call("GET", "/v1/volumes")["volumes"]] == [[v["link"]]]
        d = c.drive("sz1", "cloud-hypervisor", bandwidth="50M")
        assert d["format"] == "cloud-hypervisor" and str(50 * MiB) in d["text"], d
        for alias in ("fc", "ch", "ch-api", "cloud_hypervisor"):  # the command line refuses them: so does the API
            e = raises(c.drive, "sz1", alias)
            assert isinstance(e, InvalidArgument) and "format" in str(e), (alias, e)
        p = cli(served.root, "volume", "drive", "sz1", "-f", "qemu-blockdev", sock=served.sock)
        assert p.stdout.strip() == c.drive("sz1", "qemu-blockdev")["text"]
    finally:
        c.remove_volume("sz1")


def test_build_from_image_store_info_and_space(served: Daemon) -> None:
    from vmm.images import copy_tree, make_image

    c = served.client
    top = served.top  # type: ignore[attr-defined]
    layout = os.path.join(top, "layout")
    make_image(layout, "v1", [copy_tree(make_tree(os.path.join(top, "imgtree")))])
    t = c.build_template_from_image(f"{layout}:v1", "img", size=96 * MiB)
    try:
        assert t.names == ("img",) and t.size == 96 * MiB and t.source.startswith("cache:")
        assert c.template_doc(t)["disk_bytes"] > 0
        e = raises(c.build_template_from_image, "/etc:v1", "nope")  # outside the import roots
        assert type(e).__name__ == "Forbidden", e
    finally:
        c.remove_template("img")
    info = c.info()
    assert info["root"] == served.root and info["backend"] == "copy" and info["templates"] >= 1
    areas = c.space()
    assert areas and areas[0].area == "store filesystem" and areas[0].total_bytes > 0


def test_store_destroy_under_a_daemon(tmp_path) -> None:
    """store destroy beside a daemon is refused naming its PID (it answered 500 "unable to
    open database file" ever after); through the daemon it works and the daemon stops."""
    sockdir = tempfile.mkdtemp(prefix="cdf-", dir="/tmp")
    root = str(tmp_path / "store")
    with Store(root, backend="copy") as s:
        s.build_template(make_tree(str(tmp_path / "tree")), "base")
        s.create_volume("vm1", "base")
    try:
        with Daemon(root, os.path.join(sockdir, "d.sock")) as d:
            d.start()
            assert d.proc is not None
            p = cli(root, "store", "destroy", "--force", "--yes", "--json")  # on the store directly
            err = json.loads(p.stdout)["error"]
            assert p.returncode == 6 and err["type"] == "InUse" and f"PID {d.proc.pid}" in err["message"], p
            with Store(root, recover=False) as s:
                assert isinstance(raises(s.destroy_store, force=True), InUse)
                assert isinstance(raises(Store.rebuild_registry, root), InUse)
            assert [v.id for v in d.client.volumes()] == ["vm1"]  # untouched, still served
            p = cli(root, "store", "destroy", "--force", "--yes", "--json", sock=d.sock)
            assert p.returncode == 0, p.stderr
            assert json.loads(p.stdout)["removed"][-1] == root
            assert d.wait(30) == 0
        assert not os.path.exists(root)
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


def test_jobs_run_in_the_store_workers(served: Daemon) -> None:
    """A job's store work (here a build, a verify, a flatten) runs in a store worker like
    every other call: its log line names the worker (they ran in the daemon's own process,
    on its own Store, before), and its progress crosses back (the stages the client saw)."""
    c = served.client
    stages: list[str] = []
    t = c.build_template(make_tree(os.path.join(served.top, "jobtree")), "jobs",  # type: ignore[attr-defined]
                         progress=lambda d, n, stage="": stages.append(stage) if stage else None)
    assert any("formatting" in s for s in stages), stages
    c.verify_template("jobs")
    v = c.create_volume("jobvol", "jobs")
    write_at(v.link, 4 * MiB, os.urandom(4096))
    flat = c.flatten("jobvol", "jobs-flat")
    c.remove_volume("jobvol")
    for ref in ("jobs-flat", "jobs"):
        c.remove_template(ref)
    ops = ("build template", "verify template", "flatten")
    recs = served.log_records(until=lambda rs: all(any(r.get("op") == op and r.get("job") and r.get("result") == "ok"
                                                       for r in rs) for op in ops))
    workers = set(served.worker_pids())
    for op in ops:
        done = [r for r in recs if r.get("op") == op and r.get("job") and r.get("result") == "ok"]
        assert done and done[-1].get("worker") in workers, (op, done, workers)
    assert flat.id != t.id
