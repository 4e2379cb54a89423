"""Owners, quotas and admission control against a real daemon, called as root and as two
real non-root uids (curl in setuid children over the daemon's real socket).

Every volume, template and job records the uid that made it; a caller other than root sees
and changes only its own volumes and jobs (another's is the same 404 as a missing one) and
uses its own templates plus the shared ones; root sees everything and hands volumes and
templates over. Per-owner quotas and the high-water mark are refused with 507 before
anything is made.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Iterator

import pytest

from cowdisk.errors import InvalidArgument, KernelError
from cowdisk.store import Store
from daemonutil import Daemon, env
from daemonutil import call_as as call
from daemonutil import job_as as job_result
from testutil import assert_same_host, host_state, make_tree, scratch_fs

pytestmark = pytest.mark.root

A, B = 4242, 4343
MiB = 1 << 20


@pytest.fixture
def shared_dir() -> Iterator[str]:
    """A short directory other uids can traverse: the socket, the import root, the jails."""
    d = tempfile.mkdtemp(prefix="cdo-", dir="/tmp")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def start(root: str, d: str, *, env: dict[str, str] | None = None, backend: str = "copy") -> Daemon:
    for sub in ("incoming", "jails"):
        os.makedirs(os.path.join(d, sub), mode=0o755, exist_ok=True)
    daemon = Daemon(root, os.path.join(d, "d.sock"), "--socket-mode", "0666", "--allow-uid", str(A),
                    "--allow-uid", str(B), "--import-root", os.path.join(d, "incoming"),
                    "--jail-root", os.path.join(d, "jails"), backend=backend, extra_env=env)
    daemon.start()
    return daemon


def stop(daemon: Daemon) -> None:
    try:
        assert daemon.stop() == 0, daemon.log()
    finally:
        if os.path.exists(os.path.join(daemon.root, "registry.db")):
            with Store(daemon.root) as s:
                s.destroy()


def tree_for(d: str, uid: int, name: str) -> str:
    """A small tree under the import root, owned by ``uid`` (the daemon builds only what the
    caller owns)."""
    path = make_tree(os.path.join(d, "incoming", name))
    for dirpath, dirs, files in os.walk(path):
        for n in [dirpath, *(os.path.join(dirpath, f) for f in dirs + files)]:
            os.lchown(n, uid, uid)
    return path


def build(sock: str, uid: int, source: str, name: str, *, shared: bool = False) -> dict[str, Any]:
    code, doc = call(sock, uid, "POST", "/v1/templates/build", {"source": source, "name": name, "shared": shared})
    assert code == 202, doc
    doc = job_result(sock, uid, doc)
    assert doc["state"] == "succeeded", doc
    return dict(doc["result"])


def not_found(code: int, doc: dict[str, Any], missing: dict[str, Any], vid: str, other: str) -> bool:
    """A 404 worded exactly like the one for a volume that does not exist (ids do not leak)."""
    return code == 404 and doc["error"]["type"] == "NotFound" and \
        doc["error"]["message"] == missing["error"]["message"].replace(repr(other), repr(vid))


def test_callers_see_and_change_only_their_own(tmp_path, shared_dir) -> None:
    before = host_state()
    d = start(str(tmp_path / "store"), shared_dir)
    sock = d.sock
    try:
        base = build(sock, 0, tree_for(shared_dir, 0, "root-tree"), "base")
        assert base["owner"] == 0 and base["shared"] is False
        # root's template is not A's to use or see until root shares it
        code, doc = call(sock, A, "POST", "/v1/volumes", {"id": "a1", "template": "base"})
        code2, doc2 = call(sock, A, "POST", "/v1/volumes", {"id": "a1", "template": "nosuch"})
        assert code == code2 == 404 and doc["error"]["message"] == doc2["error"]["message"].replace("nosuch", "base")
        assert call(sock, A, "GET", "/v1/templates") == (200, {"templates": []})
        assert call(sock, A, "GET", f"/v1/templates/{base['id']}")[0] == 404
        code, doc = call(sock, A, "POST", "/v1/templates/base/chown", {"shared": True})
        assert code == 404, doc  # A cannot even see it
        code, doc = call(sock, 0, "POST", "/v1/templates/base/chown", {"shared": True})
        assert code == 200 and doc["shared"] is True, doc

        code, a1 = call(sock, A, "POST", "/v1/volumes", {"id": "a1", "template": "base"})
        assert code == 201 and a1["owner"] == A, a1
        code, b1 = call(sock, B, "POST", "/v1/volumes", {"id": "b1", "template": "base"})
        assert code == 201 and b1["owner"] == B, b1
        assert [v["id"] for v in call(sock, B, "GET", "/v1/volumes")[1]["volumes"]] == ["b1"]
        assert [v["id"] for v in call(sock, A, "GET", "/v1/volumes")[1]["volumes"]] == ["a1"]
        assert {(v.id, v.owner) for v in d.client.volumes()} == {("a1", A), ("b1", B)}  # root: all
        code, info = call(sock, B, "GET", "/v1/store")
        assert code == 200 and info["volumes"] == {"attached": 1} and info["caller"] == B, info
        assert d.client.info()["volumes"] == {"attached": 2}
        # the shared template lists only the caller's own volumes over it
        assert call(sock, B, "GET", "/v1/templates/base")[1]["users"] == ["b1"]

        # B and A's volume: every door is the same 404 as a missing volume's
        _, missing = call(sock, B, "GET", "/v1/volumes/zz9")
        os.makedirs(os.path.join(shared_dir, "jails", "b"), exist_ok=True)
        for method, path, body in [
                ("GET", "/v1/volumes/a1", None), ("GET", "/v1/volumes/a1/usage", None),
                ("GET", "/v1/volumes/a1/drive?format=qemu", None),
                ("POST", "/v1/volumes/a1/checkpoint", None),
                ("POST", "/v1/volumes/a1/jail", {"dir": os.path.join(shared_dir, "jails", "b"), "name": "rootfs"}),
                ("POST", "/v1/volumes/a1/restore", {"new_id": "b2"}),
                ("POST", "/v1/volumes/a1/fork", {"new_ids": ["b3"]}),
                ("POST", "/v1/volumes/a1/flatten", {"name": "stolen"}),
                ("DELETE", "/v1/volumes/a1", None), ("DELETE", "/v1/volumes/a1?deadline=1", None)]:
            code, doc = call(sock, B, method, path, body)
            assert not_found(code, doc, missing, "a1", "zz9"), (method, path, code, doc)
        assert not os.listdir(os.path.join(shared_dir, "jails", "b"))
        assert d.client.volume("a1").state.value == "attached"
        assert sorted(v.id for v in d.client.volumes()) == ["a1", "b1"]

        # A's own template: B neither sees nor uses it; a job of A's is A's
        code, job = call(sock, A, "POST", "/v1/templates/build",
                         {"source": tree_for(shared_dir, A, "a-tree"), "name": "atpl"})
        assert code == 202 and job["peer"]["uid"] == A, job
        code, doc = call(sock, B, "GET", f"/v1/jobs/{job['id']}")
        assert code == 404 and doc["error"]["type"] == "NotFound", doc
        assert call(sock, B, "POST", f"/v1/jobs/{job['id']}/cancel")[0] == 404
        assert job["id"] not in [j["id"] for j in call(sock, B, "GET", "/v1/jobs")[1]["jobs"]]
        assert job["id"] in [j["id"] for j in d.client.jobs()]
        atpl = job_result(sock, A, job)["result"]
        assert atpl["owner"] == A and atpl["shared"] is False
        assert call(sock, B, "GET", "/v1/templates/atpl")[0] == 404
        assert [t["id"] for t in call(sock, B, "GET", "/v1/templates")[1]["templates"]] == [base["id"]]
        assert sorted(t["id"] for t in call(sock, A, "GET", "/v1/templates")[1]["templates"]) == \
            sorted([base["id"], atpl["id"]])
        assert call(sock, B, "POST", "/v1/volumes", {"id": "b4", "template": "atpl"})[0] == 404
        assert call(sock, B, "DELETE", "/v1/templates/atpl")[0] == 404
        code, doc = call(sock, A, "DELETE", "/v1/templates/base")  # shared, but root's
        assert code == 403 and doc["error"]["type"] == "Forbidden", doc
        # A's import of the same content is root's shared template, but A does not name it
        img = os.path.join(shared_dir, "incoming", "base-copy.img")
        shutil.copyfile(d.client.template("base").path, img)
        os.chown(img, A, A)
        for name, want in (("a-base", "Forbidden"), (None, "succeeded")):
            code, job = call(sock, A, "POST", "/v1/templates/import", {"source": img, "name": name})
            assert code == 202, job
            job = job_result(sock, A, job)
            if want == "Forbidden":
                assert job["state"] == "failed" and job["error"]["type"] == "Forbidden", job
                assert "only its owner or root names it" in job["error"]["message"], job
            else:
                assert job["state"] == want and job["result"]["id"] == base["id"], job
        assert d.client.template("base").names == ("base",) and d.client.template("base").owner == 0

        # only root hands over, and maintains the whole store
        for uid in (A, B):
            code, doc = call(sock, uid, "POST", "/v1/volumes/b1/chown", {"owner": uid})
            assert code == (404 if uid == A else 403), doc
            assert call(sock, uid, "POST", "/v1/recover")[0] == 403
            assert call(sock, uid, "POST", "/v1/gc")[0] == 403
        for bad in (1 << 70, (1 << 32) - 1, -1):  # not a uid: 400, never a 500 (the API fuzz found 2^67 one)
            for path in ("/v1/volumes/a1/chown", "/v1/templates/atpl/chown"):
                code, doc = call(sock, 0, "POST", path, {"owner": bad})
                assert code == 400 and doc["error"]["type"] == "InvalidArgument", (path, bad, doc)
        with Store(d.root) as s:  # the library refuses it the same way
            for bad in (1 << 70, -1, True):
                with pytest.raises(InvalidArgument, match="is not a uid"):
                    s.chown_volume("a1", bad)  # type: ignore[arg-type]
                with pytest.raises(InvalidArgument, match="is not a uid"):
                    s.chown_template("atpl", bad)  # type: ignore[arg-type]
        code, doc = call(sock, 0, "POST", "/v1/volumes/a1/chown", {"owner": B})
        assert code == 200 and doc["owner"] == B, doc
        assert call(sock, A, "GET", "/v1/volumes/a1")[0] == 404
        assert sorted(v["id"] for v in call(sock, B, "GET", "/v1/volumes")[1]["volumes"]) == ["a1", "b1"]
        code, doc = call(sock, 0, "POST", "/v1/templates/atpl/chown", {"owner": B})
        assert code == 200 and doc["owner"] == B
        assert call(sock, B, "GET", "/v1/templates/atpl")[0] == 200
        assert call(sock, A, "GET", "/v1/templates/atpl")[0] == 404
        for vid in ("a1", "b1"):
            assert call(sock, B, "DELETE", f"/v1/volumes/{vid}")[0] == 200
        assert d.client.volumes() == []
    finally:
        stop(d)
    assert_same_host(before)


def test_owners_survive_a_registry_rebuild(tmp_path) -> None:
    """The manifests carry the owner and the shared mark: `recover --rebuild-registry`
    gives every volume and template back to whom it belonged."""
    root = str(tmp_path / "store")
    with Store(root, backend="copy") as s:
        s.build_template(make_tree(str(tmp_path / "tree")), "base")
        s.chown_template("base", shared=True)
        s.as_caller(A).create_volume("a1", "base")
        s.create_volume("r1", "base")
    for f in ("registry.db", "registry.db-wal", "registry.db-shm"):
        if os.path.exists(os.path.join(root, f)):
            os.unlink(os.path.join(root, f))
    s, rep, _ = Store.rebuild_registry(root)
    try:
        assert sorted(rep.adopted) == sorted(["volume a1 (attached)", "volume r1 (attached)",
                                              f"template {s.template('base').id}"]), rep
        assert {v.id: v.owner for v in s.volumes()} == {"a1": A, "r1": 0}
        assert [v.id for v in s.as_caller(A).volumes()] == ["a1"]
        assert s.template("base").shared and s.template("base").owner == 0
    finally:
        s.destroy()
        s.close()


def test_quotas_refuse_with_507_naming_the_limit(tmp_path, shared_dir) -> None:
    quotas = {"default": {"volumes": 2}, str(B): {"bytes": 8 * MiB}}
    d = start(str(tmp_path / "store"), shared_dir, env={"COWDISK_QUOTAS": json.dumps(quotas)})
    sock = d.sock
    try:
        build(sock, 0, tree_for(shared_dir, 0, "root-tree"), "base", shared=True)
        for vid in ("a1", "a2"):
            assert call(sock, A, "POST", "/v1/volumes", {"id": vid, "template": "base"})[0] == 201
        code, doc = call(sock, A, "POST", "/v1/volumes", {"id": "a3", "template": "base"})
        msg = doc["error"]["message"]
        assert code == 507 and doc["error"]["type"] == "KernelError" and doc["error"]["errno"] == 122, doc
        assert "uid 4242 has 2 volumes" in msg and "quota (volumes) is 2" in msg, msg
        code, doc = call(sock, A, "POST", "/v1/volumes/a1/fork", {"new_ids": ["a4"]})
        doc = job_result(sock, A, doc)
        assert doc["state"] == "failed" and "quota (volumes) is 2" in doc["error"]["message"], doc
        assert call(sock, A, "POST", "/v1/volumes/a1/checkpoint")[0] == 200
        code, doc = call(sock, A, "POST", "/v1/volumes/a1/restore", {"new_id": "a5"})
        assert code == 507 and "quota (volumes) is 2" in doc["error"]["message"], doc
        assert sorted(v["id"] for v in call(sock, A, "GET", "/v1/volumes")[1]["volumes"]) == ["a1", "a2"]
        # root has no quota unless named; B's entry replaces the default (bytes, no count)
        for vid in ("r1", "r2", "r3"):
            d.client.create_volume(vid, "base")
        code, b1 = call(sock, B, "POST", "/v1/volumes", {"id": "b1", "template": "base"})
        assert code == 201, b1
        with open(b1["device"], "r+b") as f:  # the guest writes 10 MiB: B's volumes now take more than 8 MiB
            f.seek(16 * MiB)
            f.write(os.urandom(10 * MiB))
            os.fsync(f.fileno())
        code, doc = call(sock, B, "POST", "/v1/volumes", {"id": "b2", "template": "base"})
        msg = doc["error"]["message"]
        assert code == 507 and doc["error"]["errno"] == 122, doc
        assert "uid 4343 has 1 volumes taking" in msg and f"quota (bytes) is {8 * MiB}" in msg, msg
        used = int(msg.split("taking ")[1].split(" bytes")[0])
        assert used >= 10 * MiB
        assert [v["id"] for v in call(sock, B, "GET", "/v1/volumes")[1]["volumes"]] == ["b1"]
        assert call(sock, B, "DELETE", "/v1/volumes/b1")[0] == 200
        assert call(sock, B, "POST", "/v1/volumes", {"id": "b2", "template": "base"})[0] == 201
    finally:
        stop(d)


def test_admission_refuses_before_the_filesystem_passes_the_mark(shared_dir) -> None:
    """A store on a small filesystem (copy backend: each volume allocates its template's
    bytes): creates go on until the next would pass the 90% mark, which is refused before
    it starts (507, naming the mark and the use); the filesystem never passes it."""
    before = host_state()
    with scratch_fs("ext4", 96 * MiB) as mnt:
        root = os.path.join(mnt, "store")
        d = start(root, shared_dir)
        try:
            img = os.path.join(shared_dir, "incoming", "disk.img")
            with open(img, "wb") as f:
                f.write(os.urandom(10 * MiB))  # allocated, not sparse: each copy takes 10 MiB
            t = d.client.import_template(img, "base", shared=True)
            made, refused = [], None
            for i in range(12):
                code, doc = call(d.sock, A, "POST", "/v1/volumes", {"id": f"v{i}", "template": "base"})
                if code != 201:
                    refused = (code, doc)
                    break
                made.append(f"v{i}")
            assert refused is not None and len(made) >= 3, made
            code, doc = refused
            msg = doc["error"]["message"]
            assert code == 507 and doc["error"]["errno"] == 28, doc
            assert "past the high-water mark of 90%" in msg and "store filesystem" in msg, msg
            st = os.statvfs(root)
            pct = 100 * (st.f_blocks - st.f_bfree) / st.f_blocks
            assert pct <= 90 and pct + 100 * 10 * MiB / (st.f_blocks * st.f_frsize) > 90, (pct, msg)
            assert f"v{len(made)}" not in [v.id for v in d.client.volumes()]
            assert not os.path.exists(os.path.join(root, "volumes", f"v{len(made)}"))
            # a fork (a job) and a restore-as are refused the same way
            with pytest.raises(KernelError, match="high-water mark"):
                d.client.fork(made[0], ["f1"])
            d.client.checkpoint(made[0])
            with pytest.raises(KernelError, match="high-water mark"):
                d.client.restore(made[0], "f2")
            # room again: the create goes through
            d.client.remove_volume(made[-1])
            d.client.create_volume("again", t.id)
        finally:
            stop(d)
    assert_same_host(before)



def cli(root: str, *args: str, sock: str | None = None) -> subprocess.CompletedProcess[str]:
    """``cowdisk --root ROOT ARGS`` of this checkout (as root: another uid cannot run this
    host's Python, which lives under /root); through the daemon on ``sock`` when given."""
    e = env(**({"COWDISK_SOCKET": sock} if sock else {}))
    return subprocess.run([sys.executable, "-m", "cowdisk", "--root", root, *args], capture_output=True, text=True,
                          env=e, timeout=120)


def test_command_line_owners(tmp_path, shared_dir) -> None:
    """The command line, through the daemon and on the store directly: root shares and hands
    over (`template chown --shared`, `volume chown`), owners show in `--json` and
    `ls -o owner`; what a non-root uid sees follows."""
    root = str(tmp_path / "store")
    d = start(root, shared_dir)
    try:
        tree = tree_for(shared_dir, 0, "root-tree")
        r = cli(root, "--json", "template", "build", tree, "--name", "base", sock=d.sock)
        assert r.returncode == 0 and json.loads(r.stdout)["shared"] is False, r.stderr
        r = cli(root, "--json", "template", "chown", "base", "--shared", sock=d.sock)
        assert r.returncode == 0 and json.loads(r.stdout)["shared"] is True, r.stderr
        r = cli(root, "template", "ls", "--no-headings", "-o", "names,owner,shared", sock=d.sock)
        assert r.stdout == "base\t0\ttrue\n", r.stdout
        assert call(d.sock, A, "POST", "/v1/volumes", {"id": "a1", "template": "base"})[0] == 201
        assert cli(root, "volume", "create", "r1", "--template", "base", sock=d.sock).returncode == 0
        r = cli(root, "volume", "ls", "--no-headings", "-o", "id,owner", sock=d.sock)
        assert r.stdout == f"a1\t{A}\nr1\t0\n", (r.stdout, r.stderr)
        r = cli(root, "--json", "volume", "chown", "a1", str(B), sock=d.sock)
        assert r.returncode == 0 and json.loads(r.stdout)["owner"] == B, r.stderr
        assert [v["id"] for v in call(d.sock, B, "GET", "/v1/volumes")[1]["volumes"]] == ["a1"]
        assert call(d.sock, A, "GET", "/v1/volumes")[1]["volumes"] == []
        r = cli(root, "volume", "chown", "a1", "nosuchuser-xyz", sock=d.sock)
        assert r.returncode == 2 and "no user of that name" in r.stderr, r.stderr
        # the store directly (no daemon answering): the same owners, handed back to A
        assert d.stop() == 0
        r = cli(root, "--json", "volume", "chown", "a1", str(A))
        assert r.returncode == 0 and json.loads(r.stdout)["owner"] == A, r.stderr
        r = cli(root, "--json", "volume", "inspect", "a1")
        assert json.loads(r.stdout)["owner"] == A, r.stdout
        d.start()
        assert [v["id"] for v in call(d.sock, A, "GET", "/v1/volumes")[1]["volumes"]] == ["a1"]
    finally:
        stop(d)


def test_store_config_limits_every_face(tmp_path, shared_dir) -> None:
    """`<root>/config.toml` holds the limits the store itself enforces: the command line on
    the store directly and the daemon (its own config laid over it) refuse the same create."""
    root = str(tmp_path / "store")
    with Store(root, backend="copy") as s:
        s.build_template(make_tree(str(tmp_path / "tree")), "base", shared=True)
    with open(os.path.join(root, "config.toml"), "w") as f:
        f.write('high_water = 95\n[quotas]\n0 = { volumes = 1 }\n')
    assert cli(root, "volume", "create", "r1", "--template", "base").returncode == 0
    r = cli(root, "volume", "create", "r2", "--template", "base")
    assert r.returncode == 4 and "owner uid 0 has 1 volumes: its quota (volumes) is 1" in r.stderr, r.stderr
    info = json.loads(cli(root, "--json", "store", "info").stdout)
    assert info["limits"]["high_water"] == 95 and info["limits"]["quotas"]["0"]["volumes"] == 1, info
    d = start(root, shared_dir, env={"COWDISK_QUOTAS": json.dumps({str(A): {"volumes": 0}})})
    try:
        code, doc = call(d.sock, 0, "POST", "/v1/volumes", {"id": "r2", "template": "base"})
        assert code == 507 and "quota (volumes) is 1" in doc["error"]["message"], doc
        code, doc = call(d.sock, A, "POST", "/v1/volumes", {"id": "a1", "template": "base"})
        assert code == 507 and "owner uid 4242 has 0 volumes: its quota (volumes) is 0" in doc["error"]["message"]
        assert call(d.sock, B, "POST", "/v1/volumes", {"id": "b1", "template": "base"})[0] == 201  # no quota
    finally:
        stop(d)
    with open(os.path.join(root, "config.toml"), "w") as f:
        f.write('[quotas]\n1000 = { volume = 1 }\n')
    r = cli(root, "volume", "ls")
    assert r.returncode == 2 and "quotas.1000" in r.stderr, r.stderr
