"""The ``cowdisk`` command line, run as a user would: CliRunner and a real ``python3 -m cowdisk``.

Every test taking ``run`` runs twice per backend (issue 22: every face tested as every
other): on the store directly, and through a real cowdiskd serving it
(``COWDISK_SOCKET`` at its socket; one daemon per backend for the module), with the same
assertions on the ``--json`` documents, the messages and the exit codes. Directly, each
test gets its own store under tmp_path, destroyed at the end (the pool backend mounts an
xfs image through a loop device: ``Store.destroy`` unmounts it); through the daemon, the
daemon's store, emptied at the end. Both check that no loop device, dm device or loop
mount was added or lost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Iterator

import click
import pytest
from click.testing import CliRunner, Result

from cowdisk.cli import cli
from cowdisk.cli import main as cowdisk_main
from cowdisk.cli.reference import commands
from cowdisk.store import Store
from daemonutil import Daemon, Daemons
from testutil import assert_same_host, debugfs_cat, host_state

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")
MiB = 1 << 20

BACKENDS = ("copy", "pool")

pytestmark = pytest.mark.root  # the host tier: the pool backend and the demo make loop devices and mounts


@pytest.fixture(autouse=True)
def _plain_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("COWDISK_ROOT", raising=False)
    monkeypatch.delenv("COWDISK_BACKEND", raising=False)


def _destroy(root: str) -> None:
    if os.path.exists(os.path.join(root, "registry.db")):
        s = Store(root)
        try:
            s.destroy()
        finally:
            s.close()


class _Main:
    """``cowdisk.cli.main`` as CliRunner calls a click command: what the ``cowdisk`` script
    runs (through a daemon, `volume ls` and `template ls` take the light path, cli/light.py)."""

    name = "cowdisk"

    def main(self, args: list[str], prog_name: str | None = None, **_kw: Any) -> None:
        sys.exit(cowdisk_main(list(args)))


class Cli:
    """Runs the command against one store root and backend; ``daemon``: through that daemon.
    Through ``main``, as the script does."""

    def __init__(self, root: str, backend: str, daemon: Daemon | None = None) -> None:
        self.root = root
        self.backend = backend
        self.daemon = daemon
        self.runner = CliRunner(env={"COWDISK_SOCKET": daemon.sock if daemon else NO_SOCKET})

    def __call__(self, *args: str, code: int = 0) -> Result:
        r = self.runner.invoke(_Main(), ["--root", self.root, "--backend", self.backend, *args],  # type: ignore[arg-type]
                               catch_exceptions=False)
        assert r.exit_code == code, f"exit {r.exit_code} != {code}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
        return r

    def json(self, *args: str, code: int = 0) -> Any:
        return json.loads(self(*args, "--json", code=code).stdout)


NO_SOCKET = "/nonexistent/cowdisk.sock"
"""COWDISK_SOCKET of the direct runs: no daemon answers there."""


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemons]:
    with Daemons.for_module(tmp_path_factory) as ds:
        yield ds


@pytest.fixture(params=[(b, way) for way in ("direct", "daemon") for b in BACKENDS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def run(request: pytest.FixtureRequest, tmp_path, daemons: Daemons) -> Iterator[Cli]:
    backend, way = request.param
    if way == "daemon":
        d = daemons.get(backend)
        before = host_state()
        served = len(d.log_records())
        try:
            yield Cli(d.root, backend, d)
        finally:
            daemons.empty(d)
            assert_same_host(before)
        assert len(d.log_records(until=lambda rs: len(rs) > served)) > served, \
            "the command line did not go through the daemon"  # the daemon logs a moment after it answers
        return
    before = host_state()
    root = str(tmp_path / "store")
    try:
        yield Cli(root, backend)
    finally:
        _destroy(root)
        assert_same_host(before)


@pytest.fixture
def tree(tmp_path) -> str:
    d = tmp_path / "tree"
    (d / "etc").mkdir(parents=True)
    (d / "etc" / "hostname").write_text("template\n")
    (d / "payload.bin").write_bytes(os.urandom(MiB))
    return str(d)


def _read(path: str, off: int, n: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def _write(path: str, off: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def _all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for path, _cmd in commands(group, prefix):
        yield path


def test_help_on_every_command_has_an_example() -> None:
    runner = CliRunner()
    cmds = list(_all_commands(cli))
    assert {("template", "import"), ("template", "build"), ("template", "ls"), ("template", "inspect"),
            ("template", "verify"), ("template", "rm"), ("volume", "create"), ("volume", "ls"),
            ("volume", "inspect"), ("volume", "checkpoint"), ("volume", "restore"), ("volume", "fork"),
            ("volume", "flatten"), ("volume", "jail"), ("volume", "drive"), ("volume", "usage"),
            ("volume", "rm"), ("recover",), ("gc",), ("doctor",), ("demo",)} <= set(cmds)
    for c in [()] + cmds:
        r = runner.invoke(cli, [*c, "--help"], catch_exceptions=False)
        assert r.exit_code == 0, (c, r.output)
        assert "Example" in r.stdout, c
    r = runner.invoke(cli, ["--help"], catch_exceptions=False)
    assert "COWDISK_ROOT" in r.stdout


def test_lifecycle(run: Cli, tree: str, tmp_path) -> None:
    t = run.json("template", "build", tree, "--name", "base")
    assert t["names"] == ["base"] and t["size"] >= 64 * MiB and len(t["digest"]) == 64
    assert os.path.isfile(t["path"]) and t["disk_bytes"] > 0
    assert run.json("template", "ls")["templates"][0]["id"] == t["id"]
    assert run.json("template", "inspect", "base")["id"] == t["id"]

    v = run.json("volume", "create", "vm1", "--template", "base")
    assert (v["id"], v["state"], v["backend"], v["template_id"]) == ("vm1", "attached", run.backend, t["id"])
    assert v["link"] == os.path.join(run.root, "links", "vm1", "rootfs")
    assert os.readlink(v["link"]) == v["device"]
    data = os.urandom(4096)
    _write(v["link"], 32 * MiB, data)
    assert _read(v["link"], 32 * MiB, 4096) == data

    big = run.json("volume", "create", "big", "--template", "base", "--size", f"{t['size'] // MiB + 16}M")
    assert big["size"] == t["size"] + 16 * MiB and run.json("volume", "inspect", "big")["usage"]["apparent_bytes"] \
        == t["size"] + 16 * MiB
    run("volume", "rm", "big")
    r = run("volume", "create", "small", "--template", "base", "--size", "1M", code=2)
    assert "smaller than template" in r.stderr, r.stderr

    info = run.json("volume", "inspect", "vm1")
    assert info["usage"]["disk_bytes"] > 0 and info["usage"]["apparent_bytes"] == t["size"]
    assert {"own_bytes", "exclusive_bytes", "shared_bytes", "health"} <= set(info["usage"])
    u = run.json("volume", "usage")["volumes"]
    assert [r["id"] for r in u] == ["vm1"] and u[0]["own_bytes"] >= 4096

    ck = run.json("volume", "checkpoint", "vm1")
    assert [c["state"] for c in ck["volumes"]] == ["checkpointed"] and ck["errors"] == []
    assert not os.path.lexists(v["link"])  # checkpoint removes the link (docs/vmm.md)
    r = run.json("volume", "restore", "vm1", "--as", "vm2")
    assert (r["id"], r["state"], r["parent"]) == ("vm2", "attached", "vm1")
    assert os.readlink(v["link"]) == r["device"]  # vm1's link, retargeted
    assert r["links"] == [r["link"], v["link"]]  # and inspect/ls say so
    assert run.json("volume", "inspect", "vm2")["links"] == [r["link"], v["link"]]
    assert {x["id"]: x["links"] for x in run.json("volume", "ls")["volumes"]} == \
        {"vm1": [], "vm2": [r["link"], v["link"]]}
    assert _read(r["link"], 32 * MiB, 4096) == data
    _write(r["link"], 0, b"\xff" * 512)  # vm2's writes do not reach vm1's checkpoint

    assert run.json("volume", "restore", "vm1")["state"] == "attached"
    assert os.readlink(v["link"]) == v["device"]
    assert _read(v["link"], 32 * MiB, 4096) == data
    assert _read(v["link"], 0, 512) != b"\xff" * 512

    forks = run.json("volume", "fork", "vm2", "f1", "f2")["volumes"]
    assert [f["id"] for f in forks] == ["f1", "f2"]
    assert all(_read(f["link"], 32 * MiB, 4096) == data for f in forks)
    flat = run.json("volume", "flatten", "vm2", "--name", "flat")
    assert flat["names"] == ["flat"] and flat["id"] != t["id"] and flat["source"] == "flatten:vm2"

    fc = run.json("volume", "drive", "vm1", "--format", "firecracker")
    assert fc["config"] == {"drive_id": "rootfs", "path_on_host": v["link"], "is_root_device": True,
                            "is_read_only": False}
    assert run("volume", "drive", "vm1", "-f", "qemu").stdout.strip() == \
        f"-drive file={v['link']},format=raw,if=virtio,cache=none,id=rootfs"
    assert run("volume", "drive", "vm1", "-f", "cloud-hypervisor", "--readonly").stdout.strip() == \
        f"--disk path={v['link']},readonly=on"
    assert json.loads(run("volume", "drive", "vm1", "-f", "firecracker").stdout)["path_on_host"] == v["link"]

    ls = run.json("volume", "ls")["volumes"]
    assert sorted(x["id"] for x in ls) == ["f1", "f2", "vm1", "vm2"]
    assert [x["id"] for x in run.json("volume", "ls", "--template", "base")["volumes"]] == \
        [x["id"] for x in ls]
    run("template", "verify", "base")

    assert run.json("volume", "rm", "vm1", "vm2", "f1", "f2")["removed"] == ["vm1", "vm2", "f1", "f2"]
    assert not os.path.lexists(os.path.join(run.root, "links", "vm1"))
    assert run.json("volume", "ls")["volumes"] == []
    assert sorted(run.json("template", "rm", "base", "flat")["removed"]) == sorted([t["id"], flat["id"]])
    assert not os.path.exists(t["path"])
    assert run.json("template", "ls")["templates"] == []


def test_fork_count_prefix_links(run: Cli, tree: str) -> None:
    """`volume fork SRC --count N --prefix P --links`: N children named P1..PN, one stable link a line."""
    run("template", "build", tree, "--name", "base")
    v = run.json("volume", "create", "vm1", "--template", "base")
    data = os.urandom(4096)
    _write(v["link"], 40 * MiB, data)
    out = run("volume", "fork", "vm1", "--count", "3", "--prefix", "job7-", "--links").stdout.split()
    assert out == [os.path.join(run.root, "links", f"job7-{i}", "rootfs") for i in (1, 2, 3)]
    assert all(_read(p, 40 * MiB, 4096) == data for p in out)
    assert [f["id"] for f in run.json("volume", "fork", "vm1", "-n", "2")["volumes"]] == ["vm1-1", "vm1-2"]
    for args, code, why in ((("--prefix", "x-"), 2, "a prefix names the children of a count"),
                            (("a", "--count", "2"), 2, "not both"), (("vm1-1",), 5, "vm1-1"),
                            (("--count", "1", "--prefix", "bad/"), 2, "invalid new volume id")):
        assert why in run("volume", "fork", "vm1", *args, code=code).stderr
    assert sorted(x["id"] for x in run.json("volume", "ls")["volumes"]) == \
        ["job7-1", "job7-2", "job7-3", "vm1", "vm1-1", "vm1-2"]
    link = run("volume", "fork", "vm1", "idn", "--reset-identity", "--hostname-prefix", "sbx-", "--links").stdout
    assert debugfs_cat(link.strip(), "/etc/hostname") == b"sbx-idn\n"
    run("volume", "rm", "vm1", "vm1-1", "vm1-2", "job7-1", "job7-2", "job7-3", "idn")


def test_human_output(run: Cli, tree: str) -> None:
    r = run("template", "build", tree, "--name", "base")
    assert "names" in r.stdout and "base" in r.stdout and "build: formatting ext4 image" in r.stderr
    r = run("volume", "create", "vm1", "-t", "base")
    assert "attached" in r.stdout and os.path.join(run.root, "links", "vm1", "rootfs") in r.stdout
    for args in (("template", "ls"), ("volume", "ls"), ("volume", "usage"), ("volume", "inspect", "vm1")):
        assert "vm1" in run(*args).stdout or "base" in run(*args).stdout
    r = run("volume", "rm", "vm1")
    assert r.stdout == "" and "removed volume vm1" in r.stderr


def test_errors(run: Cli, tree: str) -> None:
    if run.daemon is None:  # (a daemon serves a store that exists)
        r = run("volume", "ls")  # no store yet: empty, and none created
        assert not os.path.exists(os.path.join(run.root, "registry.db"))
        r = run("volume", "create", "vm1", "-t", "base", code=3)
        assert "no cowdisk store at" in r.stderr and "hint:" in r.stderr
    run("template", "build", tree, "--name", "base")
    for bad in ("bad/id", "../x", "-x", "a b", "x" * 65):
        r = run("volume", "create", "--template", "base", "--", bad, code=2)
        assert "invalid volume id" in r.stderr, r.stderr
    assert not os.listdir(os.path.join(run.root, "links"))
    r = run("volume", "create", "vm1", "-t", "nope", code=3)
    assert r.stderr.splitlines() == ["cowdisk volume create: error: template 'nope' not found",
                                     "  hint: `cowdisk template ls` lists templates"]
    err = run.json("volume", "inspect", "ghost", code=3)["error"]
    assert (err["type"], err["exit_code"], err["object"]) == ("NotFound", 3, "ghost")
    run("volume", "create", "vm1", "-t", "base")
    r = run("volume", "create", "vm1", "-t", "base", code=5)
    assert "already exists" in r.stderr
    r = run("volume", "restore", "vm1", code=7)
    assert "restore volume vm1: it is attached, not checkpointed" in r.stderr
    r = run("template", "rm", "base", code=6)
    assert "used by volumes vm1" in r.stderr and "hint: remove or flatten those volumes first" in r.stderr
    run("volume", "checkpoint", "vm1")
    r = run("volume", "checkpoint", "vm1", code=7)
    assert "it is checkpointed, not attached" in r.stderr
    r = run("volume", "jail", "vm1", str(run.root), code=7)
    assert "not attached" in r.stderr
    r = run("volume", "restore", "vm1", "--as", "bad/id", code=2)
    assert "invalid new volume id" in r.stderr
    r = run("template", "build", tree, "--size", "lots", code=2)
    assert "invalid size 'lots'" in r.stderr
    r = run("volume", "drive", "vm1", "--format", "vmware", code=2)  # click's usage error
    assert "Invalid value for '--format'" in r.stderr
    err = run.json("volume", "drive", "vm1", "--format", "vmware", code=2)["error"]  # as JSON too
    assert (err["type"], err["exit_code"], err["command"]) == ("InvalidArgument", 2, "volume drive")
    assert "Invalid value for '--format'" in err["message"] and "--help" in err["hint"]
    r = run("volume", "frobnicate", code=2)
    assert "No such command" in r.stderr
    r = run("--backend", "copy" if run.backend == "pool" else "pool", "volume", "ls", code=2)
    assert "uses backend" in r.stderr


def test_template_changed(run: Cli, tree: str, tmp_path) -> None:
    img = tmp_path / "img.raw"
    img.write_bytes(os.urandom(1 * MiB))
    t = run.json("template", "import", str(img), "--adopt", "--name", "adopted")
    with open(img, "r+b") as f:
        f.write(b"changed")
    r = run("template", "verify", "adopted", code=8)
    assert f"template {t['id']}" in r.stderr
    r = run("volume", "create", "vm1", "-t", "adopted", code=8)
    assert "changed on disk since import" in r.stderr


def test_jail(run: Cli, tree: str, tmp_path) -> None:
    run("template", "build", tree, "--name", "base")
    v = run.json("volume", "create", "vm1", "-t", "base")
    # a file volume is staged by hard link, so the jail must be on the volume's filesystem
    data_root = os.path.dirname(os.path.dirname(v["data_path"]))
    jail = os.path.join(data_root, "jail-vm1")
    os.mkdir(jail)
    try:
        j = run.json("volume", "jail", "vm1", jail)
        assert j["path"] == os.path.join(jail, "rootfs")
        assert os.stat(j["path"]).st_ino == os.stat(v["device"]).st_ino
        if run.backend == "pool":  # another filesystem than the pool: refused with a hint
            other = tmp_path / "jail-other"
            other.mkdir()
            r = run("volume", "jail", "vm1", str(other), code=9)
            assert "hint: put the jail on the store's filesystem" in r.stderr
    finally:
        for f in os.listdir(jail):
            os.unlink(os.path.join(jail, f))
        os.rmdir(jail)


def test_recover_gc_doctor(run: Cli, tree: str, tmp_path) -> None:
    assert run.json("recover") == {"rolled_back": [], "finished": [], "reactivated": [], "orphans_removed": [],
                                   "adopted": [], "quarantined": [], "kept": [], "in_quarantine": [], "errors": []}
    run("template", "build", tree)  # no name: gc takes it once unused
    run("template", "build", tree + "/etc", "--name", "kept")
    rep = run.json("gc")
    assert rep["errors"] == [] and len([o for o in rep["orphans_removed"] if o.startswith("template ")]) == 1
    assert [t["names"] for t in run.json("template", "ls")["templates"]] == [["kept"]]
    os.makedirs(os.path.join(run.root, "links", "ghost"))
    assert os.path.join(run.root, "links", "ghost") in run.json("recover")["orphans_removed"]

    fresh = tmp_path / "nowhere" / "store"
    d = json.loads(CliRunner().invoke(cli, ["--root", str(fresh), "doctor", "--json"],
                                      catch_exceptions=False).stdout)
    assert not fresh.exists()  # doctor creates nothing
    assert d["backend"] in ("dm-snapshot", "reflink", "pool", "copy") and d["why"]
    names = {c["name"] for c in d["checks"]}
    assert {"loop", "device-mapper", "reflink", "mkfs.ext4", "mkfs.xfs", "e2fsck", "auto backend"} <= names
    assert set(d["dm_targets"]) >= {"snapshot", "thin-pool"}
    if not os.path.exists("/dev/mapper/control"):
        dm = next(c for c in d["checks"] if c["name"] == "device-mapper")
        assert dm["ok"] is False and dm["hint"]
        assert d["dm_targets"]["snapshot"] is None
    r = CliRunner().invoke(cli, ["--root", str(fresh), "doctor"], catch_exceptions=False)
    assert r.exit_code == 0 and "backend auto -> " in r.stdout


# -- a real process ------------------------------------------------------------------------


def _proc(*args: str, root: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("COWDISK_ROOT", None)
    if root:
        env["COWDISK_ROOT"] = root
    return subprocess.run([sys.executable, "-m", "cowdisk", *args], capture_output=True, text=True, env=env,
                          timeout=300, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("cli_backend", BACKENDS)
def test_subprocess_create_and_errors(cli_backend: str, tree: str, tmp_path) -> None:
    before = host_state()
    root = str(tmp_path / "store")
    try:
        p = _proc("--backend", cli_backend, "template", "build", tree, "--name", "base", "--json", root=root)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["names"] == ["base"]
        p0 = p.stdout
        p = _proc("volume", "create", "vm1", "-t", "base", "--json", root=root)
        assert p.returncode == 0, p.stderr
        link = json.loads(p.stdout)["link"]
        assert os.path.realpath(link) == json.loads(p.stdout)["device"]
        p = _proc("volume", "create", "bad/id", "-t", "base", root=root)
        assert (p.returncode, p.stdout) == (2, "")
        assert p.stderr.startswith("cowdisk volume create: error: invalid volume id 'bad/id'")
        p = _proc("volume", "rm", "ghost", root=root)
        assert p.returncode == 3 and "volume 'ghost' not found" in p.stderr
        p = _proc("volume", "restore", "vm1", "--json", root=root)
        assert p.returncode == 7 and json.loads(p.stdout)["error"]["type"] == "StateError"
        p = _proc("--json", "volume", "create", root=root)  # a usage error, in a real process
        assert p.returncode == 2 and json.loads(p.stdout)["error"]["message"] == "Missing argument 'ID'."
        assert "Missing argument 'ID'" in p.stderr
        p = _proc("volume", "ls", root=root)  # a pipe: tab-separated, nothing folded
        assert p.stdout.splitlines() == ["ID\tSTATE\tBACKEND\tTEMPLATE_ID\tSIZE\tLINKS\tDEVICE",
                                         f"vm1\tattached\t{cli_backend}\t{json.loads(p0)['id']}\t"
                                         f"{json.loads(p0)['size']}\t{link}\t{os.path.realpath(link)}"]
        p = _proc("volume", "drive", "vm1", "--format", "qemu", root=root)
        assert p.returncode == 0 and p.stdout.startswith(f"-drive file={link},")
        p = _proc("--no-such-option", root=root)
        assert p.returncode == 2
        p = _proc("volume", "rm", "vm1", root=root)
        assert p.returncode == 0 and not os.path.lexists(link)
    finally:
        _destroy(root)
    assert_same_host(before)


def test_subprocess_demo(tmp_path) -> None:
    """The main job: on this host (no dm, / on ext4) it picks the pool backend."""
    before = host_state()
    parent = tmp_path / "demo"
    p = _proc("--root", str(parent), "demo")
    assert p.returncode == 0, p.stdout + p.stderr
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("cowdisk demo OK:"), p.stdout
    assert "template unchanged" in last and "everything cleaned up" in last
    assert "what each volume costs on disk" in p.stdout
    assert os.listdir(parent) == []  # its temp dir is gone
    assert_same_host(before)


def test_subprocess_demo_json_copy(tmp_path) -> None:
    before = host_state()
    parent = tmp_path / "demo"
    p = _proc("--backend", "copy", "--root", str(parent), "demo", "--volumes", "2", "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    d = json.loads(p.stdout)
    assert d["ok"] and d["backend"] == "copy" and d["cleanup"]["ok"]
    assert d["template"]["unchanged"] and d["template"]["digest_before"] == d["template"]["digest_after"]
    assert [v["id"] for v in d["volumes"]] == ["sandbox-1", "sandbox-2"]
    assert d["write"]["read_back"] and d["write"]["other_volumes_unchanged"]
    assert all(s["ms"] >= 0 for s in d["steps"])
    assert any(s["name"].startswith("restore sandbox-1 as") for s in d["steps"])
    assert os.listdir(parent) == []
    assert_same_host(before)


def test_subprocess_demo_failure_cleans_up(tmp_path) -> None:
    """A demo that cannot run (reflink asked on a filesystem without it) says why, exits with the
    error's code, and still leaves nothing behind."""
    from cowdisk.kernel import fs

    if fs.fs_type(str(tmp_path)).reflink_capable:
        pytest.skip(f"{tmp_path} can reflink: the reflink demo would succeed")
    before = host_state()
    parent = tmp_path / "demo"
    p = _proc("--backend", "reflink", "--root", str(parent), "demo")
    assert p.returncode == 9, p.stdout + p.stderr
    assert "cowdisk demo FAILED: " in p.stderr and "reflink" in p.stderr
    assert "everything it made was cleaned up" in p.stderr
    assert os.listdir(parent) == []
    assert_same_host(before)


# -- issue 14: a scriptable command line ------------------------------------------------------


def test_scriptable_listing_and_global_options(run: Cli, tree: str) -> None:
    run("template", "build", tree, "--name", "base")
    for vid in ("vm:smile:1", "vm2"):  # ':' is a valid id character; no emoji may come of it
        run("volume", "create", vid, "-t", "base")
    assert run("volume", "ls", "-q").stdout.splitlines() == ["vm:smile:1", "vm2"]
    assert run("template", "ls", "-q").stdout.splitlines() == [run.json("template", "inspect", "base")["id"]]
    out = run("volume", "ls", "--no-headings", "-o", "id,state,size").stdout.splitlines()
    size = run.json("volume", "inspect", "vm2")["size"]
    assert out == [f"vm:smile:1\tattached\t{size}", f"vm2\tattached\t{size}"]
    plain = run("volume", "ls").stdout.splitlines()  # not a terminal: tab-separated, a heading, whole paths
    assert plain[0].split("\t") == ["ID", "STATE", "BACKEND", "TEMPLATE_ID", "SIZE", "LINKS", "DEVICE"]
    assert plain[1].split("\t")[5] == os.path.join(run.root, "links", "vm:smile:1", "rootfs")
    # global options after the subcommand; --json before it
    r = CliRunner().invoke(cli, ["volume", "ls", "--root", run.root, "--json", "-v"], catch_exceptions=False)
    assert [v["id"] for v in json.loads(r.stdout)["volumes"]] == ["vm:smile:1", "vm2"]
    r = CliRunner().invoke(cli, ["--json", "--root", run.root, "template", "ls"], catch_exceptions=False)
    assert json.loads(r.stdout)["templates"][0]["names"] == ["base"]
    r = run("volume", "rm", "vm2", "-q")
    assert r.stderr == ""  # -q after the subcommand silences messages
    r = run("volume", "inspect", "vm:smile:1")
    assert "vm:smile:1" in r.stdout and "\N{SMILING FACE WITH OPEN MOUTH}" not in r.stdout


def test_no_markup_in_data(run: Cli, tmp_path) -> None:
    img = tmp_path / "a[red]x.img"
    img.write_bytes(os.urandom(1 * MiB))
    r = run("template", "import", str(img), "--name", "odd")
    assert "import a[red]x.img: done" in r.stderr
    assert str(img) in run("template", "inspect", "odd").stdout  # the source path, whole


def test_several_ids_each_tried_and_force(run: Cli, tree: str) -> None:
    run("template", "build", tree, "--name", "base")
    for vid in ("a", "b"):
        run("volume", "create", vid, "-t", "base")
    d = run.json("volume", "rm", "a", "nope", "b", code=3)
    assert d["removed"] == ["a", "b"] and [(e["id"], e["type"], e["exit_code"]) for e in d["errors"]] == \
        [("nope", "NotFound", 3)]
    assert d["errors"][0]["command"] == "volume rm"
    r = run("volume", "rm", "nope", "--force")
    assert r.exit_code == 0
    assert run.json("volume", "rm", "-f", "nope")["absent"] == ["nope"]
    tid = run.json("template", "inspect", "base")["id"]
    assert run.json("template", "rm", "--force", "base", "gone") == {"removed": [tid], "absent": ["gone"],
                                                                     "errors": []}


def test_timeout_on_a_held_lock_and_a_busy_device(run: Cli, tree: str) -> None:
    from cowdisk.locks import FileLock

    run("template", "build", tree, "--name", "base")
    v = run.json("volume", "create", "vm1", "-t", "base")
    with FileLock(os.path.join(run.root, "locks", "volume-vm1.lock"), timeout=1):
        t0 = time.monotonic()
        err = run.json("volume", "rm", "vm1", "--timeout", "0.3", code=10)["errors"][0]
        assert err["type"] == "LockTimeout" and time.monotonic() - t0 < 5
    holder = subprocess.Popen(["sleep", "60"], stdin=open(v["link"], "rb"))  # a "VMM" holding the disk
    try:
        t0 = time.monotonic()
        r = run("volume", "checkpoint", "vm1", "--timeout", "0.2", code=6)
        assert time.monotonic() - t0 < 4
        assert "checkpoint volume vm1" in r.stderr and f"PID {holder.pid}" in r.stderr, r.stderr
        assert "remove volume" not in r.stderr
        d = run.json("volume", "rm", "vm1", "--force", "--timeout", "0.2", code=6)  # never torn down while held
        assert d["errors"][0]["type"] == "InUse" and d["removed"] == []
    finally:
        holder.kill()
        holder.wait()
    assert run.json("volume", "checkpoint", "vm1")["volumes"][0]["state"] == "checkpointed"


def test_shell_completion(run: Cli, tree: str) -> None:
    run("template", "build", tree, "--name", "base")
    run("volume", "create", "vm1", "-t", "base")
    run("volume", "create", "web1", "-t", "base")
    env = {"_COWDISK_COMPLETE": "bash_complete", "COWDISK_ROOT": run.root, "COMP_CWORD": "3",
           "COMP_WORDS": "cowdisk volume rm v"}
    r = CliRunner(env=env).invoke(cli, [], prog_name="cowdisk")
    assert r.stdout.split() == ["plain,vm1"]
    env.update(COMP_WORDS="cowdisk volume create x --template ", COMP_CWORD="5")
    assert "plain,base" in CliRunner(env=env).invoke(cli, [], prog_name="cowdisk").stdout.split()
    env.update(COMP_WORDS="cowdisk vol", COMP_CWORD="1")
    assert CliRunner(env=env).invoke(cli, [], prog_name="cowdisk").stdout.split() == ["plain,volume"]


def test_build_from_tarballs_and_images(run: Cli, tree: str, tmp_path) -> None:
    from vmm.images import copy_tree, debugfs, make_image

    for flag, ext in (("-z", "gz"), ("--zstd", "zst"), ("-J", "xz")):
        tarball = str(tmp_path / f"rootfs.tar.{ext}")
        subprocess.run(["tar", flag, "-C", tree, "-cf", tarball, "."], check=True)
        t = run.json("template", "build", tarball)
        assert debugfs(t["path"], "cat /etc/hostname") == "template\n", ext

    layout = str(tmp_path / "layout")
    make_image(layout, "v1", [copy_tree(tree)])
    t = run.json("template", "build", "--from-image", f"{layout}:v1", "--name", "img")
    assert debugfs(t["path"], "cat /etc/hostname") == "template\n"
    assert t["source"].startswith("cache:") and t["names"] == ["img"]  # keyed on the manifest digest
    r = run("template", "build", "--from-image", f"{layout}:nope", code=3)
    assert "no manifest tagged 'nope'" in r.stderr
    r = run("template", "build", tree, "--from-image", layout, code=2)
    assert "one of them" in r.stderr


DOCS = os.path.join(os.path.dirname(SRC), "docs")


def _console_examples(md: str, section: str) -> list[tuple[list[str], str]]:
    """(argv after `cowdisk`, expected stdout) of each `$ cowdisk ...` in the first console block of ``section``."""
    text = open(os.path.join(DOCS, md)).read()
    block = text[text.index(section):].split("```console\n", 1)[1].split("```", 1)[0]
    out: list[tuple[list[str], str]] = []
    for line in block.splitlines():
        if line.startswith("$ cowdisk "):
            out.append((line[len("$ cowdisk "):].split(), ""))
        else:
            out[-1] = (out[-1][0], out[-1][1] + line + "\n")
    return out


def test_docs_drive_examples(tree: str, tmp_path) -> None:
    """Every drive example in docs/vmm.md, run, prints exactly what the page shows."""
    root = str(tmp_path / "store")
    c = Cli(root, "copy")
    try:
        c("template", "build", tree, "--name", "base")
        c("volume", "create", "vm1", "-t", "base")
        examples = _console_examples("vmm.md", "## Drive configuration")
        assert len(examples) >= 10
        for args, want in examples:
            got = c(*args).stdout.replace(os.path.join(root, "links"), "/var/lib/cowdisk/links")
            assert got == want, (args, got)
    finally:
        _destroy(root)
