"""The store's faces agree (issue 22): the command line through a running daemon does what
it does on the store directly, the API takes the command line's argument forms and gives
its documents, and nothing pulls the store from under a daemon serving it.

One real daemon (``python -m cowdisk serve``, copy backend) serves the module's store."""

from __future__ import annotations

import contextlib
import io
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


def _light(argv: list[str]) -> tuple[int | None, str, str]:
    """(exit status or None, stdout, stderr) of the light path (cli/light.py) in this process."""
    from cowdisk.cli import light

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = light.run(argv)
    return code, out.getvalue(), err.getvalue()


COMMON_TOKENS = [("--json",), ("-q",), ("--quiet",), ("--no-headings",), ("--filter=owner=0",), ("--timeout", "5"),
                 ("--timeout=0",), ("--backend", "copy"), ("--backend=auto",), ("--root", "ROOT"), ("--root=ROOT",)]
GOOD_TOKENS = {
    ("volume", "ls"): COMMON_TOKENS + [("-o", "id,state"), ("-o", "+parent,OWNER"), ("--output=ID,template",),
                                       ("--filter", "state=attached"), ("--filter", "template=base"), ("-t", "base"),
                                       ("--template=base",)],
    ("template", "ls"): COMMON_TOKENS + [("-o", "id,names"), ("-o", "+digest,OWNER"), ("--filter", "names=base"),
                                         ("--filter=state=ready",), ("--lazy",)],
}
BAD_TOKENS = [
    ("-o", "bogus"), ("--filter", "bogus=1"), ("--filter", "state"), ("--template", "nope"), ("--remote",),
    ("--from", "s3://b"), ("--timeout", "-1"), ("--timeout=-1",), ("--timeout", "x"), ("--timeout=nan",),
    ("--backend", "bogus"), ("--backend", "dm-thin"),
    ("--root", "/nonexistent"), ("-t",), ("extra",), ("--temp", "base"), ("-tbase",), ("-qq",), ("--",), ("-v",),
]
"""Tokens (with their values) of the two listings' argument vectors: ones the light path
takes, and ones it leaves to click (a bad value, an error of the store, a form it does not read)."""

BEFORE = ["--json", "-q", "--quiet", "--timeout", "--timeout=0", "--timeout=-1", "--root", "--root=ROOT", "--backend",
          "--backend=auto", "-v"]


def _both_paths(root: str, before: list[tuple[str, ...]], words: tuple[str, ...],
                after: list[tuple[str, ...]]) -> tuple[list[str], int | None, str]:
    """Run the argument vector both ways: (argv, the light path's status, its stdout); when
    it took the vector, the click path (in this process) printed the same, with that status."""
    from click.testing import CliRunner

    from cowdisk.cli import cli as click_cli

    argv = [t.replace("ROOT", root) for part in (*before, words, *after) for t in part]
    if not any(t.startswith("--root") for t in argv):
        argv = ["--root", root, *argv]
    code, out, err = _light(argv)
    if code is None:
        assert (out, err) == ("", ""), argv
    else:
        r = CliRunner().invoke(click_cli, argv)
        assert (code, out) == (r.exit_code, r.stdout), (argv, err, r.stderr)
    return argv, code, out


def test_the_light_path_prints_what_click_prints(served: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """`volume ls` and `template ls` through a daemon run without click (cli/light.py): each
    argument vector the light path takes prints exactly what the click path prints, with
    the same exit status; each it leaves prints nothing. Every error is the click path's.
    First every good token alone and in pairs, then vectors drawn by hypothesis from good
    and bad tokens (global options before the command, the command's after it)."""
    import hypothesis
    import hypothesis.strategies as st

    monkeypatch.setenv("COWDISK_SOCKET", served.sock)
    monkeypatch.delenv("COWDISK_ROOT", raising=False)
    c = served.client
    for vid in ("lt1", "lt2"):
        c.create_volume(vid, "base")
    c.checkpoint("lt2")
    try:
        for words, good in GOOD_TOKENS.items():
            for i, tok in enumerate(good):
                argv, code, out = _both_paths(served.root, [], words, [tok])
                assert code is not None, argv  # the light path takes every good form
                _both_paths(served.root, [], words, [tok, good[(i * 7 + 3) % len(good)]])
            for tok in BAD_TOKENS:
                argv, code, out = _both_paths(served.root, [], words, [tok])
                assert code is None, argv  # left to click, which says what is wrong
            argv, code, out = _both_paths(served.root, [("--json",)], words, [("-o", "id")])
            assert code == 0 and json.loads(out), argv
            # a name the later --backend overrides is still checked (hypothesis found it)
            argv, code, out = _both_paths(served.root, [("--backend", "bogus")], words, [("--backend", "copy")])
            assert code is None, argv

        taken: list[list[str]] = []

        @hypothesis.settings(max_examples=200, deadline=None, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(st.lists(st.sampled_from([t for t in COMMON_TOKENS + BAD_TOKENS if t[0] in BEFORE]),
                                   max_size=3),
                          st.sampled_from([("volume", "ls"), ("template", "ls"), ("volume", "inspect")]),
                          st.lists(st.sampled_from([*GOOD_TOKENS[("volume", "ls")], *GOOD_TOKENS[("template", "ls")],
                                                    *BAD_TOKENS]), max_size=5))
        def check(before: list[tuple[str, ...]], words: tuple[str, str], after: list[tuple[str, ...]]) -> None:
            argv, code, _ = _both_paths(served.root, before, words, after)
            if code is not None:
                taken.append(argv)

        check()
        assert len(taken) > 20, taken  # the light path took a fair share of them
    finally:
        for vid in ("lt1", "lt2"):
            c.remove_volume(vid)


def test_a_listing_through_a_daemon_imports_no_click(served: Daemon, tmp_path) -> None:
    """`cowdisk volume ls` (and `template ls`) through a daemon: not click, not the store;
    the same document as the click path gives (-v makes the command go through click)."""
    probe = ("import sys, json; from cowdisk.cli import main; code = main(sys.argv[2:]); "
             "open(sys.argv[1], 'w').write(json.dumps(sorted(sys.modules)))")
    for words in (("volume", "ls"), ("template", "ls")):
        mods_file = tmp_path / "mods.json"
        p = subprocess.run([sys.executable, "-c", probe, str(mods_file), "--root", served.root, *words, "--json"],
                           capture_output=True, text=True, env=env(COWDISK_SOCKET=served.sock), timeout=60)
        assert p.returncode == 0, p.stderr
        mods = set(json.loads(mods_file.read_text()))
        assert "cowdisk.client" in mods, words  # it went through the daemon
        assert not {m for m in mods if m == "click" or m.startswith(("click.", "cowdisk.store.core", "rich",
                                                                     "sqlite3", "cowdisk.registry"))}, words
        slow = cli(served.root, *words, "--json", "-v", sock=served.sock)
        assert slow.returncode == 0 and "using cowdiskd" in slow.stderr, slow.stderr
        assert json.loads(p.stdout) == json.loads(slow.stdout)
