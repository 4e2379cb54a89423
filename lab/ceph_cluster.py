#!/usr/bin/env python3
"""A single-node Ceph cluster for trying and testing cowdisk's ``rbd`` backend.

One monitor, one manager and one OSD (BlueStore on a sparse file) from Debian's
``ceph-mon ceph-mgr ceph-osd`` packages, bound to 127.0.0.1 on a free port, auth
``none``, pool size 1, everything (config, data, logs, sockets, PID files) in one private
directory. Nothing is installed system-wide and no systemd unit is used: the daemons are
this script's children, started in their own session, and ``down`` ends them by the
PIDs it recorded, then deletes the directory.

Stdlib only (the ``ceph`` command is the cluster's own admin tool). Usage::

    python3 lab/ceph_cluster.py up DIR [--pool rbd] [--osd-size 4G] [--rgw]  # prints the backend options
                                            # (of the cluster already running in DIR, if one is)
    python3 lab/ceph_cluster.py rgw DIR     # start Ceph's RADOS Gateway (S3) on it; prints the remote config
    python3 lab/ceph_cluster.py status DIR
    python3 lab/ceph_cluster.py down DIR

``--rgw`` / ``rgw``: one ``radosgw`` (Debian's ``radosgw``: Ceph's own S3 endpoint, beast
frontend on 127.0.0.1 and a free port) and one S3 user with a fresh key pair; what
``cowdisk template push/pull`` are given (docs/remote.md) is printed as TOML.

Importable: ``Cluster(dir).up()`` returns the options a store is made with
(``{"conf": ..., "pool": ..., "client": "admin"}``) and ``Cluster(dir).down()`` ends it;
``Cluster(dir).start_rgw()`` adds the gateway (returns endpoint, keys, bucket), ``stop_rgw()``
ends it (a test of a gateway that went away), ``start_rgw()`` again brings it back on the
same port.
The tests' session fixture (tests/ceph/conftest.py) is this, once per pytest run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

PIDS = "pids.json"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)


class ClusterError(RuntimeError):
    pass


class Cluster:
    """One private single-node cluster living under ``dir``."""

    def __init__(self, dir: str, *, pool: str = "rbd", osd_size: int = 4 << 30, die_with_parent: bool = False) -> None:
        """``die_with_parent``: the daemons get SIGKILL when the process that started them
        dies, however it dies (a test session killed by CI), so nothing outlives it."""
        self.dir = os.path.abspath(dir)
        self.die_with_parent = die_with_parent
        self.pool = pool
        self.osd_size = osd_size
        self.conf = os.path.join(self.dir, "ceph.conf")
        self.log_dir = os.path.join(self.dir, "log")

    # -- helpers -------------------------------------------------------------------------

    def options(self) -> dict[str, str]:
        """What ``Store(root, backend="rbd", backend_options=...)`` is given for this cluster."""
        return {"conf": self.conf, "pool": self.pool, "client": "admin"}

    def _run(self, *argv: str, timeout: float = 60) -> str:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise ClusterError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()[-2000:]}")
        return r.stdout

    def ceph(self, *args: str, timeout: float = 60) -> str:
        return self._run("ceph", "-c", self.conf, "--connect-timeout", "20", *args, timeout=timeout)

    def _pids(self) -> dict[str, int]:
        try:
            with open(os.path.join(self.dir, PIDS)) as f:
                return {k: int(v) for k, v in json.load(f).items()}
        except FileNotFoundError:
            return {}

    def _save_pid(self, name: str, pid: int) -> None:
        pids = self._pids()
        pids[name] = pid
        tmp = os.path.join(self.dir, PIDS + ".tmp")
        with open(tmp, "w") as f:
            json.dump(pids, f)
        os.replace(tmp, os.path.join(self.dir, PIDS))

    def _spawn(self, name: str, argv: list[str]) -> int:
        """Start a daemon in the foreground (-f) as our child, in its own session."""
        log = open(os.path.join(self.log_dir, f"{name}.out"), "ab")
        p = subprocess.Popen(argv + ["-f", "-c", self.conf], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             start_new_session=True, preexec_fn=_pdeathsig if self.die_with_parent else None)
        log.close()
        self._save_pid(name, p.pid)
        return p.pid

    # -- up ------------------------------------------------------------------------------

    def up(self, *, timeout: float = 120) -> dict[str, str]:
        """Make and start the cluster, wait until the pool's PGs are active; the store options
        (of the cluster already running in the directory, if one is: :meth:`_running`)."""
        missing = [b for b in ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph", "monmaptool", "ceph-authtool")
                   if shutil.which(b) is None]
        if missing:
            raise ClusterError(f"ceph cluster: {', '.join(missing)} not found (./install.sh installs them)")
        if os.path.exists(os.path.join(self.dir, PIDS)):
            return self._running()
        try:
            self._up(timeout)
        except BaseException:
            self.down()
            raise
        return self.options()

    def _running(self) -> dict[str, str]:
        """``up`` on a directory whose cluster runs (every daemon it recorded alive, its
        pool there: the Ceph tests' session cluster, which tests/ceph/test_doc_examples_ceph.py
        hands to the docs' ``up`` lines) starts nothing and returns its options; a cluster
        that is partly gone is refused."""
        pids = self._pids()
        dead = sorted(name for name, pid in pids.items() if not _alive(pid))
        if dead or not pids:
            raise ClusterError(f"ceph cluster: {self.dir} holds a cluster whose {', '.join(dead) or 'daemons'} "
                               "no longer run (run `down` first)")
        pools = self.ceph("osd", "pool", "ls").split()
        if self.pool not in pools:
            raise ClusterError(f"ceph cluster: the cluster running in {self.dir} has no pool {self.pool!r} "
                               f"(it has {', '.join(pools) or 'none'})")
        return self.options()

    def _up(self, timeout: float) -> None:
        t0 = time.monotonic()
        d = self.dir
        for sub in ("mon/a", "mgr/x", "osd/0", "rgw/x", "run", "log"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        fsid = str(uuid.uuid4())
        port = _free_port()
        with open(self.conf, "w") as f:
            f.write(f"""[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{port}
mon initial members = a
ms bind msgr1 = false
ms bind ipv6 = false
public addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
auth supported = none
run dir = {d}/run
admin socket = {d}/run/$name.asok
log file = {d}/log/$name.log
pid file = {d}/run/$name.pid
keyring = {d}/keyring
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
osd pool default pg num = 8
osd pool default pgp num = 8
mon max pg per osd = 1000
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
osd crush chooseleaf type = 0
rbd default features = layering, exclusive-lock, object-map, fast-diff, deep-flatten
rbd cache = true
[mon]
mon data = {d}/mon/$name
mon cluster log file = {d}/log/cluster.log
[mgr]
mgr data = {d}/mgr/$name
[osd]
osd data = {d}/osd/$id
osd objectstore = bluestore
bluestore block path = {d}/osd/block.$id
bluestore block create = true
bluestore block size = {self.osd_size}
bluestore block db create = false
bluestore block wal create = false
bluestore fsck on mount = false
osd memory target = 939524096
osd op num shards = 1
osd op num threads per shard = 2
osd max object name len = 460
osd max object namespace len = 64
osd client watch timeout = 10
[client.rgw.x]
rgw data = {d}/rgw/x
ms mon client mode = crc secure
rgw frontends = beast endpoint=127.0.0.1:{_free_port()}
rgw thread pool size = 32
rgw enable usage log = false
log file = {d}/log/$name.log
""")
        kr = os.path.join(d, "keyring")
        self._run("ceph-authtool", "--create-keyring", kr, "--gen-key", "-n", "mon.", "--cap", "mon", "allow *")
        monmap = os.path.join(d, "monmap")
        self._run("monmaptool", "--create", "--clobber", "--fsid", fsid, "--addv", "a",
                  f"[v2:127.0.0.1:{port}]", monmap)
        self._run("ceph-mon", "--mkfs", "-c", self.conf, "-i", "a", "--monmap", monmap, "--keyring", kr)
        self._spawn("mon.a", ["ceph-mon", "-i", "a"])
        self.ceph("status", timeout=timeout)  # returns once the monitor answers
        self._spawn("mgr.x", ["ceph-mgr", "-i", "x"])
        osd_uuid = str(uuid.uuid4())
        osd_id = self.ceph("osd", "new", osd_uuid).strip()
        if osd_id != "0":
            raise ClusterError(f"ceph cluster: expected OSD id 0, got {osd_id!r}")
        self._run("ceph-osd", "-c", self.conf, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid, timeout=timeout)
        self._spawn("osd.0", ["ceph-osd", "-i", "0"])
        self._wait(lambda: '"up":1' in self.ceph("osd", "dump", "-f", "json").replace(" ", ""),
                   "osd.0 up", t0 + timeout)
        self.ceph("osd", "pool", "create", self.pool, "8", "8")
        self.ceph("osd", "pool", "application", "enable", self.pool, "rbd")
        self._wait(self._pgs_active, f"pool {self.pool} active", t0 + timeout)

    def _pgs_active(self) -> bool:
        st = json.loads(self.ceph("pg", "stat", "-f", "json"))
        m = st.get("pg_summary", st)
        total = m.get("num_pgs", 0)
        active = sum(s["num"] for s in m.get("num_pg_by_state", []) if "active" in s["name"].split("+"))
        return total > 0 and active == total

    def _wait(self, ok, what: str, deadline: float) -> None:
        last: Exception | None = None
        while time.monotonic() < deadline:
            for name, pid in self._pids().items():
                if not _alive(pid):
                    raise ClusterError(f"ceph cluster: {name} (PID {pid}) exited; see {self.log_dir}/{name}.log")
            try:
                if ok():
                    return
            except (ClusterError, ValueError, subprocess.TimeoutExpired) as e:
                last = e
            time.sleep(0.25)
        raise ClusterError(f"ceph cluster: timed out waiting for {what}" + (f" ({last})" if last else ""))

    # -- the RADOS Gateway (S3) -----------------------------------------------------------

    RGW_USER = "cowdisk-test"
    RGW_BUCKET = "cowdisk-templates"

    def rgw_endpoint(self) -> str:
        with open(self.conf) as f:
            for line in f:
                if line.startswith("rgw frontends"):
                    return "http://" + line.split("endpoint=", 1)[1].strip()
        raise ClusterError(f"ceph cluster: {self.conf} has no rgw frontends line")

    def rgw_running(self) -> bool:
        pid = self._pids().get("rgw.x")
        return pid is not None and _alive(pid)

    def start_rgw(self, *, timeout: float = 120) -> dict[str, str]:
        """Start the gateway (once; again after :meth:`stop_rgw`, on the same port) and make
        its S3 user (once); returns the remote config: endpoint, access and secret key, bucket."""
        if shutil.which("radosgw") is None or shutil.which("radosgw-admin") is None:
            raise ClusterError("ceph cluster: radosgw not found (./install.sh installs Debian's radosgw)")
        deadline = time.monotonic() + timeout
        if not self.rgw_running():
            self._spawn("rgw.x", ["radosgw", "-n", "client.rgw.x"])
        endpoint = self.rgw_endpoint()
        self._wait(lambda: _http_up(endpoint), f"radosgw at {endpoint}", deadline)
        keys_file = os.path.join(self.dir, "rgw-user.json")
        if not os.path.exists(keys_file):
            ak, sk = uuid.uuid4().hex[:20].upper(), uuid.uuid4().hex + uuid.uuid4().hex[:8]
            self._run("radosgw-admin", "-c", self.conf, "-n", "client.admin", "user", "create",
                      f"--uid={self.RGW_USER}", "--display-name=cowdisk tests", f"--access-key={ak}",
                      f"--secret-key={sk}", timeout=timeout)
            tmp = keys_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"access_key": ak, "secret_key": sk}, f)
            os.chmod(tmp, 0o600)
            os.replace(tmp, keys_file)
        with open(keys_file) as f:
            keys = json.load(f)
        return {"endpoint": endpoint, "access_key": keys["access_key"], "secret_key": keys["secret_key"],
                "bucket": self.RGW_BUCKET, "region": "default"}

    def stop_rgw(self) -> None:
        """End the gateway (SIGTERM, then SIGKILL), leaving the cluster up."""
        pid = self._pids().get("rgw.x")
        if pid is None:
            return
        if self._end({"rgw.x": pid}):
            raise ClusterError(f"ceph cluster: radosgw (PID {pid}) did not end")
        pids = self._pids()
        pids.pop("rgw.x", None)
        tmp = os.path.join(self.dir, PIDS + ".tmp")
        with open(tmp, "w") as f:
            json.dump(pids, f)
        os.replace(tmp, os.path.join(self.dir, PIDS))

    # -- down ----------------------------------------------------------------------------

    def down(self, *, keep_files: bool = False) -> list[str]:
        """End the daemons (by the PIDs recorded, SIGTERM then SIGKILL) and delete the
        directory; returns what could not be done (empty when all went)."""
        problems = self._end(self._pids())
        if not keep_files and not problems:
            shutil.rmtree(self.dir, ignore_errors=True)
            if os.path.exists(self.dir):
                problems.append(f"{self.dir} could not be removed")
        return problems

    @staticmethod
    def _end(pids: dict[str, int]) -> list[str]:
        """SIGTERM the daemons, SIGKILL those still there after 10 s; the ones that stay."""
        problems = []
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + 10
        for name, pid in pids.items():
            while _alive(pid) and time.monotonic() < end:
                _reap(pid)
                time.sleep(0.05)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                time.sleep(0.2)
                _reap(pid)
            if _alive(pid):
                problems.append(f"{name} (PID {pid}) still runs")
        return problems

    def status(self) -> str:
        return self.ceph("status")


def _pdeathsig() -> None:
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _http_up(url: str) -> bool:
    """Whether an HTTP server answers at ``url`` (any status)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _remote_toml(r: dict[str, str]) -> str:
    """The gateway's remote config as cowdisk reads it (docs/remote.md)."""
    return "[remote]\n" + "".join(f'{k} = "{v}"\n' for k, v in r.items())


def store_init_command(opts: dict[str, str], root: str = "/var/lib/cowdisk-rbd") -> str:
    """The command that makes a store on the cluster ``up`` started (it prints it;
    tests/unit/test_docs.py parses it with the command line's parser)."""
    return f"cowdisk --root {root} --backend rbd store init " + " ".join(f"-o {k}={v}" for k, v in opts.items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="make and start a cluster in DIR; prints the store options as JSON")
    u.add_argument("dir")
    u.add_argument("--pool", default="rbd")
    u.add_argument("--osd-size", default="4G", help="size of the OSD's sparse BlueStore file")
    u.add_argument("--rgw", action="store_true", help="also start a RADOS Gateway (S3) and print its remote config")
    for name in ("status", "down", "rgw"):
        sub.add_parser(name).add_argument("dir")
    a = ap.parse_args(argv)
    c = Cluster(a.dir, pool=getattr(a, "pool", "rbd"), osd_size=_size(getattr(a, "osd_size", "4G")))
    try:
        if a.cmd == "up":
            t0 = time.monotonic()
            opts = c.up()
            print(json.dumps(opts))
            if a.rgw:
                print(_remote_toml(c.start_rgw()))
            print(f"cluster up in {time.monotonic() - t0:.1f} s; try it:\n  {store_init_command(opts)}",
                  file=sys.stderr)
        elif a.cmd == "rgw":
            print(_remote_toml(c.start_rgw()))
        elif a.cmd == "status":
            print(c.status(), end="")
        else:
            problems = c.down()
            for p in problems:
                print(p, file=sys.stderr)
            return 1 if problems else 0
    except ClusterError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
