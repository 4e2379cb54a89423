"""cowdiskd on this host: a real daemon process on a real unix socket, talked to over it.

Every test starts ``python -m cowdisk serve`` (tests/daemonutil.py) on a store under
the test's tmp dir and calls it with cowdisk.client.Client, curl or Go; the store is
destroyed afterwards and the host must be as before (no loop, dm device or mount left).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

import crashmatrix
from cowdisk.client import Client
from cowdisk.daemon.protocol import Forbidden, Unavailable, WorkerDied
from cowdisk.errors import AlreadyExists, InUse, InvalidArgument, LockTimeout, NotFound, StateError
from cowdisk.locks import FileLock
from cowdisk.registry import ATTACHED
from cowdisk.store import Store
from daemonutil import SRC, Daemon, env, errors_in_threads, public_tmpdir, raises, wait_for
from testutil import assert_same_host, cowdisk_cli, host_state, make_tree, read_at, write_at

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short directory for sockets (sun_path is 108 bytes), traversable by other users."""
    with public_tmpdir("cdd-") as d:
        yield d


def destroy(root: str) -> None:
    if os.path.exists(os.path.join(root, "registry.db")):
        with Store(root, backend="auto") as s:
            s.destroy()


@pytest.fixture
def daemon(tmp_path, sockdir) -> Iterator[Daemon]:
    """A daemon on a fresh copy-backend store; stopped with SIGTERM (exit 0) afterwards."""
    before = host_state()
    root = str(tmp_path / "store")
    d = Daemon(root, os.path.join(sockdir, "d.sock"), "--jail-root", str(tmp_path / "jails"), "--workers", "16")
    try:
        with d:
            d.start()
            yield d
            assert d.stop() == 0, d.log()
    finally:
        destroy(root)
        assert_same_host(before)


def tree_in(d: Daemon, name: str = "tree") -> str:
    """A small tree under the daemon's default import root (<root>/incoming)."""
    return make_tree(os.path.join(d.root, "incoming", name))


# --------------------------------------------------------------------------- the API


def test_lifecycle_over_the_socket(daemon: Daemon, tmp_path) -> None:
    c = daemon.client
    h = c.health()
    assert (h["status"], h["root"], h["backend"], h["pid"]) == ("ok", daemon.root, "copy", daemon.proc.pid)
    stages: list[tuple[int, int, str]] = []
    t = c.build_template(tree_in(daemon), "base", progress=lambda d, n, s="": stages.append((d, n, s)))
    assert t.names == ("base",) and len(t.digest) == 64
    assert any(s for _, _, s in stages) and any(n and d == n for d, n, _ in stages), stages
    assert [x.id for x in c.templates()] == [t.id] and c.template("base") == t

    v = c.create_volume("vm1", "base")
    assert (v.id, v.state, v.backend, v.template_id) == ("vm1", ATTACHED, "copy", t.id)
    assert v.link == os.path.join(daemon.root, "links", "vm1", "rootfs") and os.readlink(v.link) == v.device
    write_at(v.link, 8 * MiB, b"one" * 100)
    assert c.volume("vm1") == v and [x.id for x in c.volumes()] == ["vm1"]
    assert c.usage("vm1").disk_bytes > 0

    assert c.checkpoint("vm1").state == "checkpointed"
    assert not os.path.lexists(v.link)
    assert c.restore("vm1").state == "attached"
    c.checkpoint("vm1")
    v2 = c.restore("vm1", "vm2")
    assert v2.parent == "vm1" and os.path.realpath(v.link) == os.path.realpath(v2.device)
    assert read_at(v2.link, 8 * MiB, 300) == b"one" * 100

    big = c.create_volume("big", "base", size=t.size + 16 * MiB)  # size and grow_fs over the socket
    assert big.size == t.size + 16 * MiB and os.path.getsize(big.link) == big.size
    c.remove_volume("big")
    assert isinstance(raises(c.create_volume, "small", "base", size=t.size - 4096), InvalidArgument)

    forks = c.fork("vm2", ["f1", "f2"])
    assert [f.id for f in forks] == ["f1", "f2"] and all(f.state == "attached" for f in forks)
    named = c.fork("vm2", count=2, prefix="g")  # children named by the store
    assert [f.id for f in named] == ["g1", "g2"] and all(os.path.exists(f.link) for f in named)
    assert isinstance(raises(c.fork, "vm2", ["x"], count=2), InvalidArgument)
    for f in named:
        c.remove_volume(f.id)
    flat = c.flatten("f1", "flat")
    assert "flat" in flat.names
    assert c.verify_template("flat").digest == flat.digest

    dr = c.drive("vm2", "firecracker")
    assert dr["config"]["path_on_host"] == v2.link and dr["path"] == v2.link
    assert c.drive("vm2", "qemu")["config"][0] == "-drive"
    os.makedirs(tmp_path / "jails" / "vm2")
    p = c.jail("vm2", str(tmp_path / "jails" / "vm2"))
    assert p == str(tmp_path / "jails" / "vm2" / "rootfs") and os.stat(p).st_ino == os.stat(v2.device).st_ino
    os.unlink(p)

    assert isinstance(c.doctor()["backend"], str)
    for vid in ("f1", "f2", "vm2", "vm1"):
        c.remove_volume(vid)
    assert c.volumes() == []
    c.remove_template("flat")
    rep = c.gc()
    assert rep.errors == [] and c.recover().actions == 0
    assert [x.names for x in c.templates()] == [("base",)]  # gc keeps named templates
    c.remove_template("base")
    assert c.templates() == []


def test_error_documents(daemon: Daemon) -> None:
    """One error model: the CLI's --json document, with the issue's statuses."""
    c = daemon.client
    c.build_template(tree_in(daemon), "base")
    c.create_volume("a", "base")

    def status(method: str, path: str, body: object = None) -> tuple[int, dict]:
        r = curl(daemon.sock, method, path, body)
        return r[0], json.loads(r[1])

    code, doc = status("GET", "/v1/volumes/nope")
    assert code == 404 and doc["error"]["type"] == "NotFound" and doc["error"]["exit_code"] == 3
    cli = cowdisk_cli(daemon.root, "volume", "inspect", "nope", "--json")
    assert cli.returncode == 3
    cli_doc = json.loads(cli.stdout)["error"]
    assert {k: cli_doc.get(k) for k in doc["error"]} == doc["error"]  # the CLI's document, field for field
    assert status("POST", "/v1/volumes", {"id": "a", "template": "base"})[0] == 409
    assert status("POST", "/v1/volumes", {"id": "../x", "template": "base"})[0] == 400
    assert status("POST", "/v1/volumes", {"id": "b", "template": "base", "typo": 1})[0] == 400
    assert status("POST", "/v1/volumes/a/restore")[1]["error"]["type"] == "StateError"
    assert status("GET", "/v1/nothing-here")[0] == 404
    assert status("PUT", "/v1/volumes")[0] == 405
    assert isinstance(raises(c.create_volume, "a", "base"), AlreadyExists)
    assert isinstance(raises(c.restore, "a"), StateError)
    assert isinstance(raises(c.volume, "nope"), NotFound)
    assert isinstance(raises(c.create_volume, "bad/id", "base"), InvalidArgument)
    assert isinstance(raises(c.remove_template, "base"), InUse)
    e = raises(c.create_volume, "x", "no-such-template")
    assert isinstance(e, NotFound) and e.exit_code == 3
    c.remove_volume("a")


def test_direct_path_answers_as_fastapi_does(daemon: Daemon) -> None:
    """Create and remove in their plain form skip FastAPI's routing (api.Direct); the same
    request with a query string goes the whole FastAPI way. Both answer the same documents
    and statuses, for success, every kind of refusal, and a body FastAPI reads otherwise."""
    c = daemon.client
    c.build_template(tree_in(daemon), "base")

    def both(method: str, path: str, body: object = None) -> tuple[tuple[int, dict], tuple[int, dict]]:
        sep = "&" if "?" in path else "?"
        direct, full = (curl(daemon.sock, method, p, body) for p in (path, f"{path}{sep}via=fastapi"))
        return (direct[0], json.loads(direct[1])), (full[0], json.loads(full[1]))

    direct = curl(daemon.sock, "POST", "/v1/volumes", {"id": "d1", "template": "base"})
    full = curl(daemon.sock, "POST", "/v1/volumes?via=fastapi", {"id": "f1", "template": "base"})
    assert direct[0] == full[0] == 201
    dd, fd = json.loads(direct[1]), json.loads(full[1])
    assert set(dd) == set(fd) and dd["state"] == fd["state"] == "attached" and dd["template_id"] == fd["template_id"]
    for body in ({"id": "d1", "template": "base"},                   # exists: 409
                 {"id": "../x", "template": "base"},                  # a bad id: 400 from the store's check
                 {"id": "n", "template": "nope"},                     # no such template: 404
                 {"id": "n", "template": "base", "typo": 1},          # refused by the model: FastAPI's 400
                 {"id": "n", "template": "base", "size": -1},
                 {"template": "base"}, [1, 2]):
        d, f = both("POST", "/v1/volumes", body)
        assert d == f and d[0] >= 400, (body, d, f)
    r = subprocess.run(["curl", "-sS", "--unix-socket", daemon.sock, "-H", "Content-Type: text/plain", "-d",
                        json.dumps({"id": "t", "template": "base"}), "-w", "\n%{http_code}",
                        "http://cowdisk/v1/volumes"], capture_output=True, text=True, check=True)
    assert r.stdout.rpartition("\n")[2] != "201" and "t" not in {v.id for v in c.volumes()}  # as FastAPI reads it
    for vid in ("nope", "bad..id", "nope?deadline=5", "nope?deadline=0.25", "nope?deadline=abc",
                "nope?deadline=-1", "nope?deadline=301", "nope?deadline=1e1", "nope?deadline="):
        d, f = both("DELETE", f"/v1/volumes/{vid}")
        assert d == f and d[0] in (400, 404), (vid, d, f)
    big = {"id": "big", "template": "base", "pad": "x" * (2 << 20)}  # past the body limit: 413, nothing made
    d, f = both("POST", "/v1/volumes", big)
    assert d == f and d[0] == 413, (d, f)
    assert curl(daemon.sock, "DELETE", "/v1/volumes/d1")[0] == 200
    assert curl(daemon.sock, "DELETE", "/v1/volumes/f1?deadline=5")[0] == 200
    assert c.volumes() == []
    recs = daemon.log_records(until=lambda rs: sum(r.get("object") in ("d1", "f1") for r in rs) >= 4)
    ops = [(r["op"], r["object"], r["result"]) for r in recs if r.get("object") in ("d1", "f1")]
    assert ops.count(("create", "d1", "ok")) == ops.count(("remove", "f1", "ok")) == 1, ops


def test_lock_timeout_is_423(tmp_path, sockdir) -> None:
    """A volume lock held by another process past the deadline: 423, naming the holder."""
    root = str(tmp_path / "store")
    with Daemon(root, os.path.join(sockdir, "d.sock"), backend="copy",
                extra_env={"COWDISK_LOCK_TIMEOUT": "0.3"}) as d:
        d.start()
        d.client.build_template(tree_in(d), "base")
        holder = subprocess.Popen([sys.executable, "-c", (
            "import sys, time; sys.path.insert(0, sys.argv[1]);"
            "from cowdisk.locks import FileLock; l = FileLock(sys.argv[2]); l.acquire(); print('held', flush=True);"
            "time.sleep(60)"), SRC, os.path.join(root, "locks", "volume-v.lock")], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            code, body = curl(d.sock, "POST", "/v1/volumes", {"id": "v", "template": "base"})
            doc = json.loads(body)["error"]
            assert code == 423 and doc["type"] == "LockTimeout" and f"PID {holder.pid}" in doc["message"], doc
            assert isinstance(raises(d.client.create_volume, "v", "base"), LockTimeout)
        finally:
            holder.kill()
            holder.wait()
        assert d.client.create_volume("v", "base").state == "attached"
        d.client.remove_volume("v")
        assert d.stop() == 0
    destroy(root)


def test_openapi_document_matches_docs(daemon: Daemon) -> None:
    """docs/openapi.json is what the daemon serves (regenerate: docs/daemon.md says how)."""
    served = json.loads(daemon.client.call("GET", "/openapi.json", raw=True))
    kept = json.loads((REPO / "docs" / "openapi.json").read_text())
    assert served == kept, "docs/openapi.json differs from the served /openapi.json: run " \
                           "python3 -m cowdisk.daemon.openapi > docs/openapi.json"
    paths = set(served["paths"])
    for p in ("/v1/volumes", "/v1/volumes/{vid}", "/v1/volumes/{vid}/checkpoint", "/v1/volumes/{vid}/restore",
              "/v1/volumes/{vid}/fork", "/v1/volumes/{vid}/flatten", "/v1/volumes/{vid}/usage",
              "/v1/volumes/{vid}/jail", "/v1/volumes/{vid}/drive", "/v1/templates", "/v1/templates/import",
              "/v1/templates/build", "/v1/templates/{ref}", "/v1/templates/{ref}/verify", "/v1/recover",
              "/v1/gc", "/v1/doctor", "/v1/health", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/metrics"):
        assert p in paths, p


def test_metrics(daemon: Daemon) -> None:
    c = daemon.client
    c.build_template(tree_in(daemon), "base")
    c.create_volume("m1", "base")
    c.create_volume("m2", "base")
    c.checkpoint("m2")
    raises(c.create_volume, "m1", "base")
    text = c.metrics()
    assert 'cowdisk_volumes{backend="copy",state="attached"} 1.0' in text
    assert 'cowdisk_volumes{backend="copy",state="checkpointed"} 1.0' in text
    assert 'cowdisk_templates{state="ready"} 1.0' in text
    assert 'cowdisk_operation_duration_seconds_count{operation="create",result="ok"} 2.0' in text
    assert 'cowdisk_operation_duration_seconds_count{operation="create",result="AlreadyExists"} 1.0' in text
    assert 'cowdisk_errors_total{operation="create",type="AlreadyExists"} 1.0' in text
    assert 'cowdisk_recovery_actions{action="rolled_back"} 0.0' in text
    assert 'cowdisk_data_bytes{kind="free"}' in text and "process_resident_memory_bytes" in text
    st = os.statvfs(daemon.root)  # the store's filesystem, as the kernel counts it
    line = next(x for x in text.splitlines()
                if x.startswith('cowdisk_space_bytes{area="store filesystem",kind="total"}'))
    assert float(line.split()[-1]) == st.f_blocks * st.f_frsize, line
    assert 'cowdisk_space_ok{area="store filesystem",state="ok"} 1.0' in text
    assert f"cowdisk_store_workers {float(len(daemon.worker_pids()))}" in text
    assert "cowdisk_store_worker_deaths_total 0.0" in text
    assert "cowdisk_store_calls_running 0.0" in text and "cowdisk_store_calls_waiting 0.0" in text
    assert "cowdisk_store_call_slots 16.0" in text  # the fixture's --workers 16
    rss = next(x for x in text.splitlines() if x.startswith("cowdisk_store_workers_resident_bytes "))
    assert float(rss.split()[-1]) > 10 * MiB, rss
    doc = c.call("GET", "/v1/doctor")
    assert any(ch["name"] == "space: store filesystem" and ch["ok"] for ch in doc["checks"]), doc["checks"]
    for v in ("m1", "m2"):
        c.remove_volume(v)


def test_operation_log_lines(daemon: Daemon) -> None:
    """One JSON line per operation: op, object, duration, result, and the caller from SO_PEERCRED."""
    c = daemon.client
    c.build_template(tree_in(daemon), "base")
    c.create_volume("logged", "base")
    raises(c.create_volume, "logged", "base")
    c.remove_volume("logged")
    recs = [r for r in daemon.log_records(until=lambda rs: sum(r.get("object") == "logged" for r in rs) >= 3)
            if r.get("object") == "logged"]
    assert [(r["op"], r["result"]) for r in recs] == [("create", "ok"), ("create", "AlreadyExists"),
                                                     ("remove", "ok")], recs
    workers = daemon.worker_pids()
    for r in recs:
        assert r["peer"] == {"pid": os.getpid(), "uid": 0, "gid": 0} and r["duration_ms"] >= 0
        assert r["worker"] in workers and 0 <= r["store_ms"] <= r["duration_ms"], r


# --------------------------------------------------------------------------- jobs


def big_image(path: str, size: int = 256 * MiB) -> str:
    """An image full of data (no holes): its import copies and hashes every byte."""
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(block)
    return path


def test_job_progress_and_cancel_leave_nothing(daemon: Daemon) -> None:
    c = daemon.client
    os.makedirs(os.path.join(daemon.root, "incoming"), exist_ok=True)
    img = big_image(os.path.join(daemon.root, "incoming", "big.img"))
    job = c.start_job("POST", "/v1/templates/import", {"source": img, "name": "big"})
    assert job["state"] in ("queued", "running") and job["op"] == "import template"
    seen = wait_for(lambda: (j := c.job(job["id"], wait=5, since=0)) and j["progress"]["done"] > 0 and j,
                    what="bytes of progress")
    assert seen["progress"]["total"] > 0
    c.cancel(job["id"])
    end = wait_for(lambda: (j := c.job(job["id"], wait=5)) and j["state"] in ("cancelled", "succeeded",
                                                                           "failed") and j, what="job end")
    assert end["state"] == "cancelled", end
    assert end["error"]["type"] == "Cancelled"
    assert c.templates() == []
    tdir = os.path.join(daemon.root, "templates")
    assert [n for n in os.listdir(tdir) if not n.startswith(".")] == [] and \
        not [n for n in os.listdir(tdir) if n.startswith(".staging")], os.listdir(tdir)
    # and the same import runs to the end when left alone
    t = c.import_template(img, "big")
    assert t.size == 256 * MiB
    c.remove_template("big")


def test_build_cancelled_during_mkfs_kills_it_and_leaves_nothing(daemon: Daemon) -> None:
    """mkfs reports no bytes; the cancel still lands: the tool's wait is a heartbeat that
    carries the cancel, mkfs is killed, the staging goes. The build runs in a store worker
    like every other call (mkfs is a worker's child, not the daemon's): the cancel crosses
    from the daemon to the worker."""
    c = daemon.client
    tree = tree_in(daemon, "bigtree")
    big_image(os.path.join(tree, "payload.bin"), 768 * MiB)  # mkfs -d copies every byte of it
    job = c.start_job("POST", "/v1/templates/build", {"source": tree, "name": "slow"})
    wait_for(lambda: "formatting" in c.job(job["id"], wait=5, since=0)["progress"]["stage"] or
             c.job(job["id"])["state"] != "running", timeout=120, what="mkfs to start")

    workers = daemon.worker_pids()

    def mkfs_children() -> list[int]:
        out = []
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except (OSError, ValueError):
                continue
            if ppid in workers and (b"mkfs" in cmd or b"mke2fs" in cmd):
                out.append(int(pid))
        return out

    wait_for(lambda: mkfs_children() or c.job(job["id"])["state"] != "running", timeout=60, what="mkfs running")
    assert c.job(job["id"])["state"] == "running" and (pids := mkfs_children()), "mkfs ended before the cancel"
    for pid in pids:  # mkfs can no longer finish by itself: only a kill ends it
        os.kill(pid, signal.SIGSTOP)
    c.cancel(job["id"])
    end = wait_for(lambda: (j := c.job(job["id"], wait=5)) and j["state"] != "running" and j, timeout=60,
                   what="job end")
    assert end["state"] == "cancelled", end
    assert mkfs_children() == []
    assert c.templates() == []
    cache = os.path.join(daemon.root, "cache")
    leftovers = [os.path.join(d, n) for d, dirs, files in os.walk(cache) for n in dirs + files
                 if "staging" in n or n.endswith(".img")] if os.path.isdir(cache) else []
    assert leftovers == []
    assert not [n for n in os.listdir(os.path.join(daemon.root, "templates")) if not n.startswith(".")]


def test_fork_into_many_cancelled_undoes_the_batch(daemon: Daemon) -> None:
    """A fork into 8 is one batch: cancelled while it copies, none of its children stay."""
    c = daemon.client
    c.build_template(tree_in(daemon), "base", size=256 * MiB)
    src = c.create_volume("src", "base")
    block = os.urandom(MiB)
    fd = os.open(src.link, os.O_WRONLY)
    try:
        for i in range(128):
            os.pwrite(fd, block, (32 + i) * MiB)
    finally:
        os.close(fd)
    ids = [f"k{i}" for i in range(8)]
    job = c.start_job("POST", "/v1/volumes/src/fork", {"new_ids": ids})
    wait_for(lambda: c.job(job["id"], wait=5, since=0)["progress"]["done"] > 0 or
             c.job(job["id"])["state"] != "running", timeout=60, what="the fork's copying")
    c.cancel(job["id"])
    end = wait_for(lambda: (j := c.job(job["id"], wait=5)) and j["state"] != "running" and j, what="job end")
    assert end["state"] == "cancelled", end
    assert [v.id for v in c.volumes()] == ["src"]
    assert sorted(os.listdir(os.path.join(daemon.root, "volumes"))) == ["src"]
    c.remove_volume("src")


# --------------------------------------------------------------------------- life cycle


def test_ready_notification_after_recovery(tmp_path, sockdir) -> None:
    """READY=1 reaches NOTIFY_SOCKET once recovery ran and the socket answers."""
    root = str(tmp_path / "store")
    ns = os.path.join(sockdir, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(ns)
        rx.settimeout(60)
        with Daemon(root, os.path.join(sockdir, "d.sock"), extra_env={"NOTIFY_SOCKET": ns}) as d:
            d.start(wait=False)
            msg = rx.recv(4096).decode()
            assert "READY=1" in msg and f"MAINPID={d.proc.pid}" in msg, msg
            assert d.client.health()["status"] == "ok"  # answering when READY arrives
            msgs = [r["msg"] for r in d.log_records(until=lambda rs: any(r["msg"] == "ready" for r in rs))]
            assert msgs.index(f"recovered store {root}") < msgs.index("ready"), msgs
            d.signal(signal.SIGTERM)
            assert "STOPPING=1" in rx.recv(4096).decode()
            assert d.wait() == 0
    destroy(root)


def test_second_start_is_refused_naming_the_pid(daemon: Daemon, sockdir) -> None:
    other = Daemon(daemon.root, os.path.join(sockdir, "other.sock"))
    r = subprocess.run(other.argv(), capture_output=True, text=True, env=env(), timeout=60)
    assert r.returncode != 0 and f"PID {daemon.proc.pid}" in r.stderr, r.stderr
    assert "already serves store" in r.stderr
    # the same socket for another store: refused too, the socket left to its daemon
    third = Daemon(os.path.join(os.path.dirname(daemon.root), "store2"), daemon.sock)
    r = subprocess.run(third.argv(), capture_output=True, text=True, env=env(), timeout=60)
    assert r.returncode != 0 and f"PID {daemon.proc.pid}" in r.stderr, r.stderr
    assert daemon.client.health()["pid"] == daemon.proc.pid


def test_sigterm_finishes_in_flight_and_exits_0(tmp_path, sockdir) -> None:
    """SIGTERM: the socket stops accepting, the request in flight (waiting on a volume lock
    the test holds) completes and is answered, the daemon exits 0, a restart finds it done."""
    before = host_state()
    root = str(tmp_path / "store")
    with Daemon(root, os.path.join(sockdir, "d.sock")) as d:
        d.start()
        d.client.build_template(tree_in(d), "base")
        workers = d.worker_pids()
        lock = FileLock(os.path.join(root, "locks", "volume-late.lock"))
        lock.acquire()
        result: dict[str, object] = {}

        def create() -> None:
            try:
                result["v"] = Client(d.sock).create_volume("late", "base")
            except Exception as e:  # noqa: BLE001 - the test reports it
                result["e"] = e

        t = threading.Thread(target=create)
        t.start()
        time.sleep(0.5)  # the request is in flight, its thread waiting for the lock
        d.signal(signal.SIGTERM)
        wait_for(lambda: not os.path.exists(d.sock), timeout=10, what="the socket to go")
        assert isinstance(raises(Client(d.sock).health), Unavailable)  # no new requests
        time.sleep(0.3)
        lock.release()
        t.join(30)
        assert "v" in result, result
        assert d.wait(60) == 0, d.log()
        assert workers and not [p for p in workers if os.path.exists(f"/proc/{p}")], "store workers outlived it"
    with Daemon(root, os.path.join(sockdir, "d.sock")) as d:
        d.start()
        assert d.client.health()["recovery"]["rolled_back"] == []
        assert d.client.volume("late").state == "attached"
        d.client.remove_volume("late")
        assert d.stop() == 0
    destroy(root)
    assert_same_host(before)


def copy_store(tmp_path: Path, *volumes: str) -> str:
    """A closed copy-backend store under ``tmp_path`` with template ``base`` and ``volumes``
    attached; its root."""
    root = str(tmp_path / "store")
    with Store(root, backend="copy") as store:
        store.build_template(make_tree(str(tmp_path / "tree")), "base")
        for vid in volumes:
            store.create_volume(vid, "base")
    return root


def test_sigterm_cuts_off_a_call_past_the_bound(tmp_path, sockdir) -> None:
    """SIGTERM with a create standing still in its store worker past ``shutdown_timeout``:
    the daemon still exits 0 within the bound (twice: the request, then the worker), the
    worker is killed, and the next start's recovery rolls the create back."""
    root = copy_store(tmp_path)
    mark = tmp_path / "paused"
    sock = os.path.join(sockdir, "d.sock")
    with Daemon(root, sock, "--shutdown-timeout", "1", extra_env={
            "COWDISK_PAUSE_AT": "create:link", "COWDISK_PAUSE_S": "60", "COWDISK_PAUSE_MARK": str(mark)}) as d:
        d.start()
        out: list[BaseException] = []
        t = threading.Thread(target=lambda: out.append(raises(d.client.create_volume, "x", "base")))
        t.start()
        wait_for(mark.exists, what="the create to stand still")
        worker = int(mark.read_text())
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0, d.log()
        assert time.monotonic() - t0 < 10
        t.join(30)
        assert out and not os.path.exists(f"/proc/{worker}")
    with Daemon(root, sock) as d:
        d.start()
        assert d.client.health()["recovery"]["rolled_back"] == ["create x"]
        assert d.client.volumes() == []
        assert d.stop() == 0
    destroy(root)


CRASH_OPS = ("create", "remove", "checkpoint", "restore", "restore-as")


CASES = [c for c in crashmatrix.cases("copy") if c.op in CRASH_OPS]
RUN = {"create": lambda c: c.create_volume("x", "base"), "remove": lambda c: c.remove_volume("x"),
       "checkpoint": lambda c: c.checkpoint("x"), "restore": lambda c: c.restore("x"),
       "restore-as": lambda c: c.restore("x", "y")}


def assert_expected(d: Daemon, case: crashmatrix.Case) -> None:
    """The volumes are in the states the crash matrix expects after recovery, and attached
    means whole: its link points at its device."""
    vols = {v.id: v for v in d.client.volumes()}
    assert {k: v.state for k, v in vols.items()} == crashmatrix.expected(case.operation)
    for v in vols.values():
        if v.state == "attached":
            assert os.path.realpath(v.link) == os.path.realpath(v.device)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}:{c.step}")
def test_worker_killed_mid_operation(case: crashmatrix.Case, tmp_path, sockdir) -> None:
    """The store worker running create, remove, checkpoint or restore SIGKILLed at each of
    its crash points: the caller gets WorkerDied naming the operation and what recovery did;
    the daemon, still serving, recovered before answering (the states are what the crash
    matrix expects, no half-made volume is visible), a new worker takes the dead one's
    place, and a restart finds nothing left to do."""
    before = host_state()
    root = str(tmp_path / "store")
    crashmatrix.setup(root, "copy", str(tmp_path / "tree"), case)
    sock = os.path.join(sockdir, "d.sock")
    with Daemon(root, sock, extra_env={"COWDISK_CRASH_AT": f"{case.op}:{case.step}"}) as d:
        d.start()
        workers = d.worker_pids()
        assert len(workers) >= 2
        e = raises(RUN[case.op], d.client)
        assert isinstance(e, WorkerDied), e
        assert "died: killed by SIGKILL" in str(e) and "recovery ran" in str(e), e
        assert_expected(d, case)
        assert "cowdisk_store_worker_deaths_total 1.0" in d.client.metrics()
        wait_for(lambda: len(d.worker_pids()) == len(workers), what="a new store worker")
        assert set(d.worker_pids()) - set(workers), "the dead worker was not replaced"
        assert d.client.recover().actions == 0
        assert d.stop() == 0
    with Daemon(root, sock) as d:
        d.start()
        assert_expected(d, case)
        assert d.client.recover().actions == 0
        assert d.stop() == 0
    crashmatrix.check(root, case, "copy", lambda p: [])
    assert_same_host(before)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}:{c.step}")
def test_daemon_killed_mid_operation_then_restart(case: crashmatrix.Case, tmp_path, sockdir) -> None:
    """The daemon SIGKILLed while its store worker stands at each crash point of create,
    remove, checkpoint and restore: the worker dies with it (PR_SET_PDEATHSIG), the client
    sees the connection drop, and the restarted daemon's recovery (before it answers)
    leaves what the crash matrix expects; no client ever sees a half-made volume."""
    before = host_state()
    root = str(tmp_path / "store")
    crashmatrix.setup(root, "copy", str(tmp_path / "tree"), case)
    sock = os.path.join(sockdir, "d.sock")
    mark = tmp_path / "paused"
    with Daemon(root, sock, extra_env={"COWDISK_PAUSE_AT": f"{case.op}:{case.step}", "COWDISK_PAUSE_S": "120",
                                       "COWDISK_PAUSE_MARK": str(mark)}) as d:
        d.start()
        out: list[BaseException] = []
        t = threading.Thread(target=lambda: out.append(raises(RUN[case.op], d.client)))
        t.start()
        wait_for(mark.exists, what="the worker at the crash point")
        paused = int(mark.read_text())
        assert paused in d.worker_pids()
        assert d.kill() == -signal.SIGKILL
        t.join(30)
        assert isinstance(out[0], Unavailable), out
        wait_for(lambda: not os.path.exists(f"/proc/{paused}"), what="the worker to die with the daemon")
    with Daemon(root, sock) as d:
        d.start()
        assert_expected(d, case)
        assert d.stop() == 0
    crashmatrix.check(root, case, "copy", lambda p: [])
    assert_same_host(before)


def test_kill9_under_load_leaves_no_half_made_volume(tmp_path, sockdir) -> None:
    """Clients creating and removing volumes while the daemon is SIGKILLed at a random moment:
    after the restart every volume a client can see is whole, and recovery has nothing left."""
    root = str(tmp_path / "store")
    sock = os.path.join(sockdir, "d.sock")
    with Daemon(root, sock) as d:
        d.start()
        d.client.build_template(tree_in(d), "base")
        stop = threading.Event()
        errors: list[BaseException] = []  # the daemon dies under them
        threads = [threading.Thread(target=churn, args=(sock, n, stop, errors)) for n in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        d.kill()
        stop.set()
        for t in threads:
            t.join(30)
    with Daemon(root, sock) as d:
        d.start()
        assert d.client.volumes(), "the load made no volume"
        assert_all_whole(d)
        assert d.stop() == 0
    destroy(root)


def churn(sock: str, n: int, stop: threading.Event, errors: list[BaseException]) -> None:
    """Client ``n`` creates volumes w<n>-0, w<n>-1, ... (removing every other one) until
    ``stop``; its errors go to ``errors``, and one other than WorkerDied ends it."""
    c = Client(sock)
    i = 0
    while not stop.is_set():
        try:
            c.create_volume(f"w{n}-{i}", "base")
            if i % 2:
                c.remove_volume(f"w{n}-{i}")
        except Exception as e:  # noqa: BLE001 - the caller judges them
            errors.append(e)
            if not isinstance(e, WorkerDied):
                return
        i += 1


def assert_all_whole(d: Daemon) -> None:
    """Every volume attached and whole (its link at its device), and nothing left to recover."""
    for v in d.client.volumes():
        assert v.state == "attached", v
        assert os.path.realpath(v.link) == os.path.realpath(v.device) and os.path.exists(v.device)
    assert d.client.recover().actions == 0


def test_worker_kill9_under_load(tmp_path, sockdir) -> None:
    """Eight clients creating and removing volumes while a store worker, running several of
    their calls at once, is SIGKILLed at a random moment: each call either succeeds or gets
    WorkerDied after recovery ran; the daemon keeps serving with a new worker; every volume
    is whole and recovery finds nothing left."""
    root = str(tmp_path / "store")
    sock = os.path.join(sockdir, "d.sock")
    with Daemon(root, sock, "--processes", "2") as d:
        d.start()
        d.client.build_template(tree_in(d), "base")
        stop = threading.Event()
        died: list[BaseException] = []
        threads = [threading.Thread(target=churn, args=(sock, n, stop, died)) for n in range(8)]
        for t in threads:
            t.start()
        time.sleep(random.uniform(0.3, 1.5))
        victim = random.choice(d.worker_pids())
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in d.worker_pids() and len(d.worker_pids()) == 2, what="a new worker")
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(60)
        for e in died:
            assert isinstance(e, WorkerDied) and f"PID {victim}" in str(e) and "recovery ran" in str(e), e
        assert "cowdisk_store_worker_deaths_total 1.0" in d.client.metrics()
        assert_all_whole(d)
        assert d.stop() == 0
    destroy(root)


# --------------------------------------------------------------------------- concurrency


def test_store_calls_run_in_several_processes(tmp_path, sockdir) -> None:
    """While one store worker stands inside a create (a pause point), the other workers keep
    answering: a remove and a read complete, in another process, before that create does."""
    root = copy_store(tmp_path, "other")
    mark = tmp_path / "paused"
    with Daemon(root, os.path.join(sockdir, "d.sock"), "--processes", "3",
                extra_env={"COWDISK_PAUSE_AT": "create:volume", "COWDISK_PAUSE_S": "3",
                           "COWDISK_PAUSE_MARK": str(mark)}) as d:
        d.start()
        assert len(d.worker_pids()) == 3
        done: list[str] = []
        t = threading.Thread(target=lambda: (d.client.create_volume("slow", "base"), done.append("slow")))
        t.start()
        wait_for(mark.exists, what="the create to reach its pause")
        paused = int(mark.read_text())
        d.client.remove_volume("other")
        assert d.client.volume("slow").state == "creating"  # visible, not attached, while made
        done.append("other")
        t.join(30)
        assert done == ["other", "slow"]
        recs = {r["object"]: r for r in d.log_records(until=lambda rs: sum(r.get("op") in ("create", "remove")
                                                                               for r in rs) >= 2)
                if r.get("op") in ("create", "remove")}
        assert recs["slow"]["worker"] == paused and recs["other"]["worker"] != paused, recs
        assert d.stop() == 0
    destroy(root)


def test_one_worker_runs_calls_at_once(tmp_path, sockdir) -> None:
    """With one store worker process (``--processes 1 --workers 3``), a create standing
    still inside it does not hold up the others: a remove and a read run beside it in the
    same process and answer first; a fourth call past the three slots waits its turn."""
    root = copy_store(tmp_path, "a", "b")
    mark = tmp_path / "paused"
    with Daemon(root, os.path.join(sockdir, "d.sock"), "--processes", "1", "--workers", "3",
                extra_env={"COWDISK_PAUSE_AT": "create:volume", "COWDISK_PAUSE_S": "8",
                           "COWDISK_PAUSE_MARK": str(mark)}) as d:
        d.start()
        [worker] = d.worker_pids()
        done: list[str] = []
        slow = [threading.Thread(target=lambda v=v: (d.client.create_volume(v, "base"), done.append(v)))
                for v in ("s1", "s2", "s3")]
        slow[0].start()
        wait_for(mark.exists, what="the first create to reach its pause")
        d.client.remove_volume("a")
        assert d.client.volume("s1").state == "creating"
        done.append("a")
        mark.unlink()
        slow[1].start()
        wait_for(mark.exists, what="the second create to reach its pause")
        mark.unlink()
        slow[2].start()  # the third slot's call: it pauses too
        wait_for(mark.exists, what="the third create to reach its pause")
        fourth = threading.Thread(target=lambda: (d.client.remove_volume("b"), done.append("b")))
        fourth.start()  # a fourth call: it waits for a slot
        wait_for(lambda: "cowdisk_store_calls_waiting 1.0" in d.client.metrics(), what="the fourth call to wait")
        text = d.client.metrics()
        assert "cowdisk_store_calls_running 3.0" in text and "cowdisk_store_call_slots 3.0" in text, text
        for t in (*slow, fourth):
            t.join(30)
        assert done[0] == "a" and done.index("b") > done.index("s1"), done
        recs = [r for r in d.log_records(until=lambda rs: sum(r.get("op") in ("create", "remove")
                                                               for r in rs) >= 5)
                if r.get("op") in ("create", "remove")]
        assert {r["worker"] for r in recs} == {worker} and all(r["result"] == "ok" for r in recs), recs
        assert sorted(v.id for v in d.client.volumes()) == ["s1", "s2", "s3"]
        assert d.stop() == 0
    destroy(root)


def test_first_calls_arrive_at_once(tmp_path, sockdir) -> None:
    """Eight creates as the daemon's very first store calls, all at once, into its one
    worker: each succeeds, and the worker lives on (its socket is taken into the event
    loop once, whoever comes first)."""
    root = copy_store(tmp_path)
    for _ in range(3):
        with Daemon(root, os.path.join(sockdir, "d.sock"), "--processes", "1", "--workers", "8") as d:
            d.start()
            [worker] = d.worker_pids()
            go = threading.Barrier(8)

            def create(n: int) -> None:
                cl = Client(d.sock)
                cl.health()  # connected, so the creates leave together
                go.wait()
                cl.create_volume(f"v{n}", "base")

            errors = errors_in_threads(create, 8, timeout=60)
            assert errors == [] and d.worker_pids() == [worker], errors
            assert "cowdisk_store_worker_deaths_total 0.0" in d.client.metrics()
            for n in range(8):
                d.client.remove_volume(f"v{n}")
            assert d.stop() == 0
    destroy(root)


def test_worker_killed_with_two_calls_in_it(tmp_path, sockdir) -> None:
    """The one store worker SIGKILLed while two creates stand still in it: each caller gets
    WorkerDied; one recovery, run once the new worker is up, rolled both back, and both
    messages say so; one death is counted."""
    root = copy_store(tmp_path)
    mark = tmp_path / "paused"
    with Daemon(root, os.path.join(sockdir, "d.sock"), "--processes", "1", "--workers", "4",
                extra_env={"COWDISK_PAUSE_AT": "create:volume", "COWDISK_PAUSE_S": "60",
                           "COWDISK_PAUSE_MARK": str(mark)}) as d:
        d.start()
        [worker] = d.worker_pids()
        errors: dict[str, BaseException] = {}
        threads = [threading.Thread(target=lambda v=v: errors.update({v: raises(d.client.create_volume, v, "base")}))
                   for v in ("s1", "s2")]
        threads[0].start()
        wait_for(mark.exists, what="the first create to reach its pause")
        mark.unlink()
        threads[1].start()
        wait_for(mark.exists, what="the second create to reach its pause")
        os.kill(worker, signal.SIGKILL)
        for t in threads:
            t.join(60)
        assert set(errors) == {"s1", "s2"}, errors
        for vid, e in errors.items():
            assert isinstance(e, WorkerDied), e
            assert f"PID {worker}" in str(e) and "rolled back: " in str(e), e
            assert "create s1" in str(e) and "create s2" in str(e), e  # one recovery, for both
        assert "cowdisk_store_worker_deaths_total 1.0" in d.client.metrics()
        assert d.client.volumes() == []
        [new] = d.worker_pids()
        assert new != worker
        # the new worker serves calls (not a create: it would sit out the 60 s pause too)
        assert d.client.template("base").names == ("base",) and d.client.volumes() == []
        assert d.stop() == 0
    destroy(root)


def test_processes_0_runs_the_store_in_the_daemon(tmp_path, sockdir) -> None:
    """``processes = 0``: no worker process; store calls and jobs run in the daemon's threads."""
    root = str(tmp_path / "store")
    with Daemon(root, os.path.join(sockdir, "d.sock"), "--processes", "0") as d:
        d.start()
        assert d.worker_pids() == []
        c = d.client
        c.build_template(tree_in(d), "base")
        c.create_volume("v", "base")
        assert isinstance(raises(c.create_volume, "v", "base"), AlreadyExists)
        c.checkpoint("v")
        assert c.restore("v").state == "attached"
        c.remove_volume("v")
        assert c.volumes() == []
        recs = [r for r in d.log_records(until=lambda rs: any(r.get("op") == "remove" for r in rs))
                if r.get("object") == "v" and r.get("op") == "create"]
        assert recs and all("worker" not in r and r["store_ms"] <= r["duration_ms"] for r in recs), recs
        assert d.stop() == 0
    destroy(root)



def test_daemon_and_cli_race_on_one_store(daemon: Daemon) -> None:
    """The daemon and the CLI (separate processes) on the same store and the same ids: the
    file locks decide; every call ends ok or with a clean error, and the store stays whole."""
    c = daemon.client
    c.build_template(tree_in(daemon), "base")
    errors: list[BaseException] = []

    def api_side() -> None:
        cl = Client(daemon.sock)
        for i in range(12):
            for vid in (f"d{i}", f"s{i % 3}"):
                try:
                    cl.create_volume(vid, "base")
                    cl.checkpoint(vid)
                    cl.remove_volume(vid)
                except (AlreadyExists, NotFound, StateError) as e:
                    del e  # the CLI got there first: the lock and the registry said so
                except BaseException as e:  # noqa: BLE001
                    errors.append(e)

    t = threading.Thread(target=api_side)
    t.start()
    for i in range(6):
        for vid in (f"c{i}", f"s{i % 3}"):
            r = cowdisk_cli(daemon.root, "volume", "create", vid, "--template", "base", "--json")
            assert r.returncode in (0, 5), r.stderr
            if r.returncode == 0:
                r = cowdisk_cli(daemon.root, "volume", "rm", vid)
                assert r.returncode in (0, 3), r.stderr
    t.join(120)
    assert errors == []
    for v in c.volumes():
        assert v.state in ("attached", "checkpointed"), v
        c.remove_volume(v.id)
    assert c.recover().actions == 0
    with Store(daemon.root) as s:
        assert s.registry.intents() == [] and s.volumes() == []


def test_parallel_clients_on_different_volumes(daemon: Daemon) -> None:
    c = daemon.client
    c.build_template(tree_in(daemon), "base")

    def worker(n: int) -> None:
        cl = Client(daemon.sock)
        for i in range(10):
            cl.create_volume(f"p{n}", "base")
            cl.checkpoint(f"p{n}")
            cl.restore(f"p{n}")
            cl.remove_volume(f"p{n}")

    errors = errors_in_threads(worker, 8, timeout=120)
    assert errors == [] and c.volumes() == []


# --------------------------------------------------------------------------- security


def as_nobody(sock: str, method: str, path: str, body: object = None) -> tuple[int, dict]:
    """curl ``method path`` on ``sock`` as uid/gid 65534: (HTTP status or 0, the JSON answer)."""
    argv = ["curl", "-sS", "--unix-socket", sock, "-X", method, "-w", "\n%{http_code}", f"http://cowdisk{path}"]
    if body is not None:
        argv += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]

    def drop() -> None:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, preexec_fn=drop, cwd="/")
    text, _, code = r.stdout.rpartition("\n")
    if r.returncode != 0:
        return 0, {"curl": r.stderr}
    return int(code), json.loads(text)


def test_allowlist_refuses_others_with_403(tmp_path, sockdir) -> None:
    root = str(tmp_path / "store")
    sock = os.path.join(sockdir, "d.sock")
    with Daemon(root, sock, "--socket-mode", "0666", "--allow-uid", "4242") as d:
        d.start()
        assert stat.S_IMODE(os.stat(sock).st_mode) in (0o666, 0o606)  # 0606 when group cowdisk is missing
        d.client.build_template(tree_in(d), "base", shared=True)  # root is always allowed; shared: 65534 uses it
        code, doc = as_nobody(sock, "POST", "/v1/volumes", {"id": "intruder", "template": "base"})
        assert code == 403 and doc["error"]["type"] == "Forbidden" and "uid 65534" in doc["error"]["message"], doc
        assert d.client.volumes() == []  # nothing changed
        refused = [x for x in d.log_records(until=lambda rs: any(x.get("result") == "Forbidden" for x in rs))
                   if x.get("result") == "Forbidden"]
        assert refused and refused[-1]["peer"]["uid"] == 65534 and refused[-1]["peer"]["pid"] > 0
        assert d.stop() == 0
    with Daemon(root, sock, "--socket-mode", "0666", "--allow-uid", "65534") as d:
        d.start()
        code, doc = as_nobody(sock, "POST", "/v1/volumes", {"id": "guest", "template": "base"})
        assert code == 201 and doc["state"] == "attached", doc
        rec = [x for x in d.log_records(until=lambda rs: any(x.get("object") == "guest" for x in rs))
               if x.get("object") == "guest"][-1]
        assert rec["peer"]["uid"] == 65534 and rec["peer"]["gid"] == 65534
        d.client.remove_volume("guest")
        assert d.stop() == 0
    destroy(root)


def test_socket_is_owner_only_without_the_group(daemon: Daemon) -> None:
    st = os.stat(daemon.sock)
    assert stat.S_ISSOCK(st.st_mode) and st.st_uid == 0
    try:
        import grp

        grp.getgrnam("cowdisk")
        assert stat.S_IMODE(st.st_mode) == 0o660
    except KeyError:
        assert stat.S_IMODE(st.st_mode) == 0o600
    code, doc = as_nobody(daemon.sock, "GET", "/v1/health")
    assert code == 0 and "connect" in doc["curl"], doc  # EACCES on connect(2)


def test_paths_outside_the_store_are_refused(daemon: Daemon, tmp_path) -> None:
    c = daemon.client
    c.build_template(tree_in(daemon), "base")
    assert isinstance(raises(c.import_template, "/etc/passwd"), Forbidden)
    assert isinstance(raises(c.build_template, "/etc"), Forbidden)
    incoming = os.path.join(daemon.root, "incoming")
    os.symlink("/etc", os.path.join(incoming, "escape"))
    e = raises(c.build_template, os.path.join(incoming, "escape"))  # opened without following it
    assert isinstance(e, Forbidden) and "ELOOP" in str(e) and "escape" in str(e), e
    e = raises(c.build_template, os.path.join(incoming, "..", "..", "x"))
    assert isinstance(e, Forbidden)
    c.create_volume("j", "base")
    assert isinstance(raises(c.jail, "j", str(tmp_path)), Forbidden)  # not under --jail-root
    os.makedirs(tmp_path / "jails" / "j")
    assert isinstance(raises(c.jail, "j", str(tmp_path / "jails" / "j"), "../../escape"), InvalidArgument)
    os.symlink("/tmp", tmp_path / "jails" / "link")
    e = raises(c.jail, "j", str(tmp_path / "jails" / "link"))
    assert isinstance(e, Forbidden) and "ELOOP" in str(e), e
    code, body = curl(daemon.sock, "GET", "/v1/volumes/a..b")
    assert code == 400 and json.loads(body)["error"]["type"] == "InvalidArgument"
    c.remove_volume("j")
    assert c.templates()[0].names == ("base",) and len(c.templates()) == 1


# --------------------------------------------------------------------------- config


def test_check_config(tmp_path, sockdir) -> None:
    cfg = tmp_path / "cowdisk.toml"
    cfg.write_text(f'root = "{tmp_path}/store"\nsocket = "{sockdir}/x.sock"\nallow_uids = [0, 1000]\n'
                   'socket_mode = "0640"\nlog_format = "text"\n')
    r = subprocess.run([sys.executable, "-m", "cowdisk", "serve", "--config", str(cfg), "--check-config"],
                       capture_output=True, text=True, env=env(COWDISK_ALLOW_GIDS="5,6"), timeout=60)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)["config"]
    assert doc["root"] == f"{tmp_path}/store" and doc["allow_uids"] == [0, 1000] and doc["allow_gids"] == [5, 6]
    assert doc["socket_mode"] == "0640" and doc["import_roots"] == [f"{tmp_path}/store/incoming"]
    r = subprocess.run([sys.executable, "-m", "cowdisk", "serve", "--config", str(cfg), "--check-config",
                        "--socket", f"{sockdir}/flag.sock"], capture_output=True, text=True, env=env(), timeout=60)
    assert json.loads(r.stdout)["config"]["socket"] == f"{sockdir}/flag.sock"  # flags win
    cfg.write_text('sockett = "/x"\n')
    r = subprocess.run([sys.executable, "-m", "cowdisk", "serve", "--config", str(cfg), "--check-config"],
                       capture_output=True, text=True, env=env(), timeout=60)
    assert r.returncode == 2 and "unknown key(s) sockett" in r.stderr, r.stderr
    cfg.write_text('allow_uids = "x"\n')
    r = subprocess.run([sys.executable, "-m", "cowdisk", "serve", "--config", str(cfg), "--check-config"],
                       capture_output=True, text=True, env=env(), timeout=60)
    assert r.returncode == 2 and "allow_uids" in r.stderr


# --------------------------------------------------------------------------- other callers


def curl(sock: str, method: str, path: str, body: object = None) -> tuple[int, str]:
    argv = ["curl", "-sS", "--unix-socket", sock, "-X", method, "-w", "\n%{http_code}", f"http://cowdisk{path}"]
    if body is not None:  # on stdin: a body may be longer than one argument can be
        argv += ["-H", "Content-Type: application/json", "--data-binary", "@-"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True,
                       input=None if body is None else json.dumps(body))
    text, _, code = r.stdout.rpartition("\n")
    return int(code), text


def test_shell_example(daemon: Daemon) -> None:
    """contrib/examples/cowdisk-api.sh, the documented curl calls, runs as written."""
    if not shutil.which("curl"):
        pytest.skip("curl missing")
    tree_in(daemon)
    r = subprocess.run(["sh", str(REPO / "contrib" / "examples" / "cowdisk-api.sh")], capture_output=True,
                       text=True, timeout=120, env=env(COWDISK_SOCKET=daemon.sock,
                                                       TREE=os.path.join(daemon.root, "incoming", "tree")))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "created sandbox-1: attached" in r.stdout and "removed sandbox-2" in r.stdout, r.stdout
    assert daemon.client.volumes() == []


def test_go_example(daemon: Daemon, tmp_path) -> None:
    """contrib/examples/go/main.go (standard library only) against the daemon."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("go missing: install.sh installs golang-go")
    c = daemon.client
    c.build_template(tree_in(daemon), "base")
    home = tmp_path / "gohome"
    home.mkdir()
    r = subprocess.run([go, "run", str(REPO / "contrib" / "examples" / "go" / "main.go"), daemon.sock, "base"],
                       capture_output=True, text=True, timeout=300, cwd=str(REPO / "contrib" / "examples" / "go"),
                       env=env(HOME=str(home), GOCACHE=str(home / "cache"), GOPATH=str(home / "gopath"),
                               GOFLAGS="-mod=mod", GO111MODULE="on", GOTOOLCHAIN="local", GOPROXY="off"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "created go-sandbox: attached" in r.stdout and "error NotFound (exit 3)" in r.stdout, r.stdout
    assert c.volumes() == []


def test_cli_goes_through_the_daemon_when_it_answers(daemon: Daemon, tmp_path) -> None:
    """COWDISK_SOCKET names a daemon serving --root: the CLI calls it (and says so with -v);
    a daemon serving another store, or none, and the CLI opens the store itself."""
    daemon.client.build_template(tree_in(daemon), "base")

    def cli(*args: str, sock: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cowdisk", "--root", daemon.root, "-v", *args],
                              capture_output=True, text=True, timeout=120, env=env(COWDISK_SOCKET=sock))

    r = cli("volume", "create", "via-cli", "--template", "base", "--json", sock=daemon.sock)
    assert r.returncode == 0, r.stderr
    assert f"using cowdiskd (PID {daemon.proc.pid})" in r.stderr and json.loads(r.stdout)["state"] == "attached"
    rec = [x for x in daemon.log_records(until=lambda rs: any(x.get("object") == "via-cli" for x in rs))
           if x.get("object") == "via-cli"][-1]
    assert rec["op"] == "create" and rec["peer"]["pid"] != os.getpid()  # the CLI process called
    r = cli("volume", "inspect", "nope", "--json", sock=daemon.sock)
    assert r.returncode == 3 and json.loads(r.stdout)["error"]["type"] == "NotFound"
    r = cli("volume", "rm", "via-cli", sock=os.path.join(str(tmp_path), "no.sock"))
    assert r.returncode == 0 and "opening the store at" in r.stderr and "directly" in r.stderr, r.stderr
    assert daemon.client.volumes() == []
