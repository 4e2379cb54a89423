"""The command line as a script uses it (issue 22, item 5): a closed pipe, ``-o`` columns,
``--filter``, ``-q``, every id form ``inspect`` prints, usage errors under ``--json``,
``store info`` off a terminal, ``inspect`` of several ids.

One copy-backend store per test (no loop device, no mount), made and destroyed here; the
closed-pipe test runs the real ``python3 -m cowdisk`` with its stdout a pipe nobody reads.
Every test runs twice: on the store directly, and through a cowdiskd serving it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any, Iterator

import pytest
from click.testing import CliRunner, Result

from cowdisk.cli import cli
from cowdisk.errors import ERROR_TYPES
from cowdisk.store import Store
from daemonutil import Daemon

pytestmark = pytest.mark.root

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")


NO_SOCKET = "/nonexistent/cowdisk.sock"


class Cli:
    """The command line on one store: directly, or through the daemon serving it (``sock``)."""

    def __init__(self, root: str, sock: str | None = None) -> None:
        self.root = root
        self.sock = sock or NO_SOCKET
        self.runner = CliRunner(env={"COWDISK_SOCKET": self.sock})

    def __call__(self, *args: str, code: int = 0) -> Result:
        r = self.runner.invoke(cli, ["--root", self.root, "--backend", "copy", *args], catch_exceptions=False)
        assert r.exit_code == code, f"exit {r.exit_code} != {code}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
        return r

    def json(self, *args: str, code: int = 0) -> Any:
        return json.loads(self(*args, "--json", code=code).stdout)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One cowdiskd on a copy store for the module (socket under /tmp: a short path); its
    import root covers the tests' tmp dirs."""
    import shutil
    import tempfile

    top = tempfile.mkdtemp(prefix="cdscript-", dir="/tmp")
    root = os.path.join(top, "store")
    Store(root, backend="copy").close()
    d = Daemon(root, os.path.join(top, "d.sock"), "--import-root", str(tmp_path_factory.getbasetemp()))
    d.start()
    try:
        yield d
    finally:
        with d:
            assert d.stop() == 0, d.log()
        with Store(root) as s:
            s.destroy()
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(params=["direct", "daemon"])
def run(request: pytest.FixtureRequest, tmp_path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cli]:
    """A store with template ``base`` and volumes vm1 (attached) and vm2 (checkpointed),
    opened directly or through a daemon serving it (the same commands, the same answers)."""
    monkeypatch.delenv("COWDISK_ROOT", raising=False)
    monkeypatch.delenv("COWDISK_SOCKET", raising=False)
    d: Daemon | None = request.getfixturevalue("daemon") if request.param == "daemon" else None
    c = Cli(d.root, d.sock) if d is not None else Cli(str(tmp_path / "store"))
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    c("template", "import", str(image), "--name", "base")
    c("volume", "create", "vm1", "-t", "base")
    c("volume", "create", "vm2", "-t", "base")
    c("volume", "checkpoint", "vm2")
    if d is not None:  # the command line goes through the daemon (-v says so), not to the store
        assert f"using cowdiskd (PID {d.proc.pid if d.proc else '?'})" in c("-v", "volume", "ls").stderr
    try:
        yield c
    finally:
        if d is None:
            with Store(c.root) as s:
                s.destroy()
        else:
            cl = d.client
            for v in cl.volumes():
                cl.remove_volume(v.id)
            for t in cl.templates():
                cl.remove_template(t.id)
            assert cl.volumes() == [] and cl.templates() == []


def _lines(r: Result) -> list[list[str]]:
    return [line.split("\t") for line in r.stdout.splitlines()]


def test_closed_pipe_ends_quietly_of_sigpipe(run: Cli) -> None:
    """`cowdisk volume ls | head -1`: the reader is gone before the command writes. It ends
    of SIGPIPE as coreutils do (the shell's 141), with nothing on stderr (it exited 1 with
    "Broken pipe ... check --root and that you run as root")."""
    env = dict(os.environ, PYTHONPATH=SRC, COWDISK_SOCKET=run.sock)
    for args in (["volume", "ls"], ["template", "ls", "--json"], ["store", "info"]):
        r, w = os.pipe()
        os.close(r)
        try:
            p = subprocess.run([sys.executable, "-m", "cowdisk", "--root", run.root, *args], stdout=w,
                               stderr=subprocess.PIPE, env=env, timeout=60)
        finally:
            os.close(w)
        assert p.returncode == -signal.SIGPIPE, (args, p.returncode, p.stderr)
        assert p.stderr == b"", (args, p.stderr)
    # through a shell, as a script sees it
    p = subprocess.run(["bash", "-c", f'{sys.executable} -m cowdisk --root {run.root} volume ls --filter '
                                      'state=attached -q | (exec 0<&-; true); echo "${PIPESTATUS[0]}"'],
                       capture_output=True, env=env, text=True, timeout=60)
    assert p.stdout.strip() in ("0", "141") and p.stderr == "", (p.stdout, p.stderr)


def test_columns_refused_named_cased_and_added(run: Cli) -> None:
    r = run("volume", "ls", "-o", "id,bogus", code=2)
    assert "unknown column 'bogus'" in r.stderr
    assert "id, state, backend, template_id, size, links, device, link, data_path, parent, created" in r.stderr
    err = run.json("template", "ls", "-o", "nope", code=2)["error"]
    assert (err["type"], err["exit_code"], err["object"]) == ("InvalidArgument", 2, "nope")
    assert "digest" in err["hint"] and "names" in err["hint"]
    run("volume", "usage", "-o", "own,bogus", code=2)
    # the headings' case, and a terminal heading (template) for its key (template_id)
    assert run("volume", "ls", "-o", "ID,STATE").stdout == run("volume", "ls", "-o", "id,state").stdout
    assert _lines(run("volume", "ls", "-o", "Id,Template"))[0] == ["ID", "TEMPLATE_ID"]
    # +col adds to the defaults
    default = _lines(run("volume", "ls"))[0]
    assert default == ["ID", "STATE", "BACKEND", "TEMPLATE_ID", "SIZE", "LINKS", "DEVICE"]
    rows = _lines(run("volume", "ls", "-o", "+parent,created"))
    assert rows[0] == [*default, "PARENT", "CREATED"] and len(rows) == 3
    assert _lines(run("template", "ls", "-o", "+digest"))[0][-1] == "DIGEST"
    assert _lines(run("volume", "usage", "-o", "+shared_bytes"))[0][-1] == "SHARED_BYTES"


def test_filters(run: Cli) -> None:
    assert run("volume", "ls", "-q", "--filter", "state=attached").stdout == "vm1\n"
    assert run("volume", "ls", "-q", "--filter", "STATE=checkpointed").stdout == "vm2\n"
    both = run("volume", "ls", "-q", "--filter", "state=attached", "--filter", "state=checkpointed").stdout
    assert both.split() == ["vm1", "vm2"]  # one key twice: either value
    assert run("volume", "ls", "-q", "--filter", "state=attached", "--filter", "id=vm2").stdout == ""  # both keys
    digest = run.json("template", "inspect", "base")["digest"]
    for ref in ("base", digest[:6], f"sha256:{digest}"):
        assert run("volume", "ls", "-q", "--filter", f"template={ref}").stdout.split() == ["vm1", "vm2"], ref
    run("volume", "ls", "--filter", "template=nope", code=3)
    vols = run.json("volume", "ls", "--filter", "state=checkpointed")["volumes"]
    assert [v["id"] for v in vols] == ["vm2"]
    assert run("template", "ls", "-q", "--filter", "names=base").stdout.strip() == digest[:16]
    assert run("template", "ls", "-q", "--filter", "state=changed").stdout == ""
    # owner (issue 23's column): a uid or a user name; every row here is root's
    assert run("volume", "ls", "-q", "--filter", "owner=root").stdout.split() == ["vm1", "vm2"]
    assert run("volume", "ls", "-q", "--filter", "owner=0").stdout.split() == ["vm1", "vm2"]
    assert run("volume", "ls", "-q", "--filter", "owner=4242").stdout == ""
    assert run("template", "ls", "-q", "--filter", "Owner=root").stdout.strip() == digest[:16]
    assert _lines(run("volume", "ls", "-o", "id,owner"))[1] == ["vm1", "0"]
    run("volume", "ls", "--filter", "owner=no-such-user-here", code=2)
    r = run("volume", "ls", "--filter", "colour=red", code=2)
    assert "invalid filter 'colour=red'" in r.stderr and "state" in r.stderr and "template" in r.stderr
    r = run("volume", "ls", "--filter", "state", code=2)
    assert "use KEY=VALUE" in r.stderr


def test_every_id_form_inspect_prints_is_accepted(run: Cli) -> None:
    t = run.json("template", "inspect", "base")
    shown = run("template", "inspect", "base").stdout
    digest_line = next(line for line in shown.splitlines() if line.startswith("digest\t"))
    printed = digest_line.split("\t")[1]
    assert printed == f"sha256:{t['digest']}"
    for ref in (printed, t["id"], t["digest"], t["digest"][:6], f"sha256:{t['digest'][:6]}"):
        assert run.json("template", "inspect", ref)["id"] == t["id"], ref
        run("template", "verify", ref)
        run("volume", "ls", "--template", ref)
    run("volume", "create", "vm3", "--template", printed)
    r = run("template", "inspect", f"sha256:{t['digest'][:5]}", code=2)  # shorter than documented
    assert "6 to 64" in r.stderr
    run("template", "inspect", "sha256:XYZ123", code=2)
    run("template", "inspect", t["digest"][:5], code=3)
    vol = run.json("volume", "inspect", "vm1")
    assert run.json("volume", "inspect", vol["id"])["id"] == "vm1"


def test_usage_errors_under_json_have_documented_types(run: Cli) -> None:
    """NoSuchOption, MissingParameter, BadParameter, UsageError: each is an InvalidArgument
    (exit 2), a type the error table documents; never a click class name."""
    for args in (["volume", "ls", "--bogus"], ["volume", "create", "vmx"], ["volume", "drive", "vm1", "-f", "vmware"],
                 ["gc", "--purge", "--older-than", "soon"], ["volume", "inspect"], ["nosuch"],
                 ["--timeout", "-1", "volume", "ls"]):
        r = run(*args, "--json", code=2)
        err = json.loads(r.stdout)["error"]
        assert err["type"] == "InvalidArgument" and err["exit_code"] == 2, (args, err)
        assert err["type"] in ERROR_TYPES and err["op"] == "parse arguments", (args, err)


def test_quiet_prints_ids_only(run: Cli, tmp_path) -> None:
    assert run("volume", "create", "vm3", "-t", "base", "-q").stdout == "vm3\n"
    assert run("-q", "volume", "create", "vm4", "-t", "base").stdout == "vm4\n"
    assert run("volume", "restore", "vm2", "-q").stdout == "vm2\n"
    assert run("volume", "checkpoint", "vm3", "-q").stdout == ""
    assert run("volume", "restore", "vm3", "--as", "vm5", "-q").stdout == "vm5\n"
    assert run("volume", "fork", "vm1", "f1", "f2", "-q").stdout == "f1\nf2\n"
    tid = run.json("template", "inspect", "base")["id"]
    image = tmp_path / "other.img"
    image.write_bytes(b"\1" * (1 << 20))
    out = run("template", "import", str(image), "-q").stdout
    assert out.strip() != tid and len(out.splitlines()) == 1
    assert run("template", "inspect", "base", "-q").stdout == f"{tid}\n"
    assert run("volume", "flatten", "vm1", "--name", "flat", "-q").stdout.strip() == \
        run.json("template", "inspect", "flat")["id"]


def test_store_info_is_a_table_not_reprs(run: Cli) -> None:
    out = run("store", "info").stdout
    rows = dict(line.split("\t", 1) for line in out.splitlines())
    assert rows["volumes"] == "attached=1, checkpointed=1", rows["volumes"]
    assert rows["backend_options"] == "-" and rows["read_only"] == "false"
    for repr_mark in ("{", "}", "[", "]", "'", "False", "True", "None"):
        assert repr_mark not in out, (repr_mark, out)
    assert run.json("store", "info")["volumes"] == {"attached": 1, "checkpointed": 1}


def test_inspect_several(run: Cli) -> None:
    doc = run.json("volume", "inspect", "vm1", "vm2")
    assert [v["id"] for v in doc["volumes"]] == ["vm1", "vm2"] and doc["errors"] == []
    assert doc["volumes"][0]["usage"]["disk_bytes"] >= 0 and doc["volumes"][0]["links"]
    doc = run.json("volume", "inspect", "vm1", "nope", "vm2", code=3)
    assert [v["id"] for v in doc["volumes"]] == ["vm1", "vm2"]
    assert [(e["id"], e["type"]) for e in doc["errors"]] == [("nope", "NotFound")]
    text = run("volume", "inspect", "vm1", "vm2").stdout
    assert "id\tvm1" in text and "id\tvm2" in text
    assert run("volume", "inspect", "vm1", "vm2", "-q").stdout == "vm1\nvm2\n"
    doc = run.json("template", "inspect", "base", "nope", code=3)
    assert [t["names"] for t in doc["templates"]] == [["base"]] and doc["errors"][0]["id"] == "nope"
    assert run.json("volume", "inspect", "vm1")["id"] == "vm1"  # one id: the document, as before
