"""Sources read with the caller's rights, opened once (issue 23 item 2), and jails with the
caller's own ids only (item 3), through a real daemon called by a real other uid (65534,
a setuid child running the Python client), and the command line under sudo.

The swap race: while uid 65534 builds and imports through the daemon, a thread swaps its
source (``renameat2(RENAME_EXCHANGE)``, atomically, in a loop) with a symlink to a
root-only directory or image. No template may ever hold a root-only byte; the counts of
successes and refusals are printed (pytest -s) for the issue's note."""

from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import threading
from typing import Any, Iterator

import pytest

from cowdisk.digest import sha256_file
from cowdisk.store import Store
from daemonutil import Daemon, env, public_tmpdir

pytestmark = pytest.mark.root

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"  # the tests' interpreter lives under /root (0700): not 65534's
SECRET = b"root-only-cowdisk-secret-7f3a"


@pytest.fixture
def area() -> Iterator[str]:
    """A directory other users can search: the socket, the import root and the jail root go in it."""
    with public_tmpdir("cdsrc-") as d:
        yield d


def chown_tree(path: str, uid: int) -> None:
    os.chown(path, uid, uid, follow_symlinks=False)
    for d, dirs, files in os.walk(path):
        for n in dirs + files:
            os.chown(os.path.join(d, n), uid, uid, follow_symlinks=False)


def caller_tree(path: str, text: str = "caller\n") -> str:
    os.makedirs(os.path.join(path, "etc"), exist_ok=True)
    with open(os.path.join(path, "etc", "hostname"), "w") as f:
        f.write(text)
    return path


@pytest.fixture
def served(tmp_path, area) -> Iterator[tuple[Daemon, str]]:
    """A daemon allowing uid 65534 (socket 0666), import root <area>/incoming with the caller's
    own directory <area>/incoming/u (65534's), jail root <area>/jails."""
    inc = os.path.join(area, "incoming")
    os.makedirs(os.path.join(inc, "u"))
    os.chmod(inc, 0o755)
    os.chown(os.path.join(inc, "u"), NOBODY, NOBODY)
    os.makedirs(os.path.join(area, "jails"))
    root = str(tmp_path / "store")
    d = Daemon(root, os.path.join(area, "d.sock"), "--socket-mode", "0666", "--allow-uid", str(NOBODY),
               "--import-root", inc, "--jail-root", os.path.join(area, "jails"))
    with d:
        d.start()
        try:
            yield d, os.path.join(inc, "u")
        finally:
            assert d.stop() == 0, d.log()
            with Store(root) as s:
                s.destroy()


CLIENT = r"""
import json, sys
from cowdisk.client import Client
from cowdisk.errors import CowdiskError
sock, calls = sys.argv[1], json.loads(sys.argv[2])
c = Client(sock, timeout=120)
out = []
for method, args, kw in calls:
    try:
        r = getattr(c, method)(*args, **kw)
        out.append({"ok": getattr(r, "id", r) if not isinstance(r, (str, int, type(None))) else r,
                    "digest": getattr(r, "digest", None)})
    except CowdiskError as e:
        out.append({"error": type(e).__name__, "message": str(e)})
print(json.dumps(out))
"""


def as_nobody(sock: str, calls: list[tuple[str, list[Any], dict[str, Any]]]) -> list[dict[str, Any]]:
    """Run client ``calls`` in a process of uid/gid 65534 (no groups): what each returned or raised."""
    def drop() -> None:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    r = subprocess.run([SYSTEM_PYTHON, "-c", CLIENT, sock, json.dumps(calls)], capture_output=True, text=True,
                       preexec_fn=drop, cwd="/", env=env(), timeout=1200)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


_renameat2 = ctypes.CDLL(None, use_errno=True).syscall
_renameat2.restype = ctypes.c_long
RENAME_EXCHANGE = 2
AT_FDCWD = -100


def exchange(a: str, b: str) -> None:
    """Swap the names ``a`` and ``b`` atomically (renameat2 RENAME_EXCHANGE)."""
    if _renameat2(ctypes.c_long(316), ctypes.c_long(AT_FDCWD), ctypes.c_char_p(a.encode()), ctypes.c_long(AT_FDCWD),
                  ctypes.c_char_p(b.encode()), ctypes.c_uint(RENAME_EXCHANGE)) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), a)


class Swapper:
    """A thread swapping ``src`` and ``alt`` until stopped, each name in place for up to 1 ms
    at a time."""

    def __init__(self, src: str, alt: str) -> None:
        self.src, self.alt = src, alt
        self.swaps = 0
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        rnd = random.Random(23)
        while not self.stop.is_set():
            exchange(self.src, self.alt)
            self.swaps += 1
            self.stop.wait(rnd.uniform(0, 0.001))  # a random pace: calls meet either name, or a swap

    def __enter__(self) -> "Swapper":
        self.t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.t.join()
        if self.swaps % 2:  # leave the names as they were
            exchange(self.src, self.alt)


def root_only(area: str) -> str:
    """A root-only directory (0700) holding /etc/hostname and /etc/secret, and a root-only
    raw image (0600) full of the secret."""
    d = os.path.join(area, "rootonly")
    caller_tree(d, "root\n")
    with open(os.path.join(d, "etc", "secret"), "wb") as f:
        f.write(SECRET)
    os.chmod(os.path.join(d, "etc", "secret"), 0o600)
    os.chmod(d, 0o700)
    with open(os.path.join(area, "rootonly.img"), "wb") as f:
        f.write(SECRET * (1 << 20 // len(SECRET)) + b"\0" * ((1 << 20) - len(SECRET) * (1 << 20 // len(SECRET))))
    os.chmod(os.path.join(area, "rootonly.img"), 0o600)
    return d


def holds_secret(img: str) -> bool:
    with open(img, "rb") as f:
        while chunk := f.read(1 << 22):
            if SECRET in chunk:
                return True
    return False


def tally(results: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        k = "ok" if "ok" in r else r["error"] + (" ELOOP" if "ELOOP" in r["message"] else
                                                 " EACCES" if "EACCES" in r["message"] else
                                                 " changed" if "inputs changed" in r["message"] else "")
        out[k] = out.get(k, 0) + 1
    return out


def test_swap_race_never_gives_a_root_only_file(served, area, capsys) -> None:
    d, mine = served
    secret_dir = root_only(area)
    # the caller's tree and image, and beside each the name the thread swaps in: a symlink
    # to the root-only directory / image
    tree = caller_tree(os.path.join(mine, "tree"))
    img = os.path.join(mine, "disk.img")
    with open(img, "wb") as f:
        f.write(b"caller-image\n".ljust(1 << 20, b"\0"))
    chown_tree(mine, NOBODY)
    os.symlink(secret_dir, os.path.join(mine, "tree.alt"))
    os.symlink(os.path.join(area, "rootonly.img"), os.path.join(mine, "disk.img.alt"))
    mine_digest = sha256_file(img)
    # built once before the race: a build whose tree is renamed while mkfs runs is refused as
    # "changed" (its signature takes the tree's change time), so during the race the builds that
    # open the caller's own tree are cache hits after reading all of it through the descriptor
    assert "ok" in as_nobody(d.sock, [("build_template", [tree], {})])[0]
    n = 100
    with Swapper(tree, tree + ".alt") as sw_tree:
        builds = as_nobody(d.sock, [("build_template", [tree], {}) for _ in range(n)])
    with Swapper(img, img + ".alt") as sw_img:
        imports = as_nobody(d.sock, [("import_template", [img], {}) for _ in range(n)])
    assert len(builds) == len(imports) == n
    counts = {"builds": tally(builds), "imports": tally(imports), "swaps": [sw_tree.swaps, sw_img.swaps]}
    with capsys.disabled():
        print(f"\nswap race, {n} builds and {n} imports as uid {NOBODY}: {json.dumps(counts)}")
    # no template holds a root-only byte: every template's image read back
    with Store(d.root, recover=False) as s:
        templates = s.templates()
        assert templates
        held = [t.id for t in templates if holds_secret(t.path)]
        assert held == [], f"templates holding the root-only secret: {held} ({counts})"
    assert {r["digest"] for r in imports if "ok" in r} == {mine_digest}
    # every refusal is one the open gives (a symlink in the path, or no right), or the build's
    # own check that its source did not change while it was read (the swap moves the tree)
    for r in builds + imports:
        assert "ok" in r or (r["error"] == "Forbidden" and ("ELOOP" in r["message"] or "EACCES" in r["message"])) \
            or (r["error"] == "CowdiskError" and "recipe inputs changed" in r["message"]), r
    # both happened: the race was run, not avoided
    assert counts["builds"].get("ok", 0) > 0 and counts["imports"].get("ok", 0) > 0, counts
    assert sum(v for k, v in counts["builds"].items() if k != "ok") > 0, counts


def test_own_0600_file_is_read_another_uids_is_refused(served, area) -> None:
    d, mine = served
    own = os.path.join(mine, "own.img")
    with open(own, "wb") as f:
        f.write(b"own".ljust(1 << 20, b"\0"))
    os.chown(own, NOBODY, NOBODY)
    os.chmod(own, 0o600)
    other = os.path.join(mine, "other.img")  # in the caller's directory, but uid 4242's 0600 file
    with open(other, "wb") as f:
        f.write(SECRET.ljust(1 << 20, b"\0"))
    os.chown(other, 4242, 4242)
    os.chmod(other, 0o600)
    tree = caller_tree(os.path.join(mine, "tree"))
    chown_tree(tree, NOBODY)
    with open(os.path.join(tree, "etc", "shadow"), "wb") as f:  # another uid's 0600 file inside the tree
        f.write(SECRET)
    os.chown(os.path.join(tree, "etc", "shadow"), 4242, 4242)
    os.chmod(os.path.join(tree, "etc", "shadow"), 0o600)
    got = as_nobody(d.sock, [("import_template", [own, "own"], {}), ("import_template", [other, "other"], {}),
                             ("build_template", [tree, "tree"], {})])
    assert "ok" in got[0], got
    assert got[1]["error"] == "Forbidden" and "EACCES" in got[1]["message"] and other in got[1]["message"], got
    assert got[2]["error"] == "Forbidden" and "EACCES" in got[2]["message"], got
    assert f"{tree}/etc/shadow" in got[2]["message"], got  # named by the caller's path, not /proc/self/fd
    assert [t.names for t in d.client.templates()] == [("own",)]
    # root (the library trusting its caller; the daemon's root peer) reads it
    d.client.import_template(other, "by-root")


def test_jail_only_with_the_callers_own_ids(served, area) -> None:
    d, mine = served
    tree = caller_tree(os.path.join(mine, "tree"))
    chown_tree(tree, NOBODY)
    jails = os.path.join(area, "jails")
    own, roots = os.path.join(jails, "own"), os.path.join(jails, "roots")
    os.makedirs(own)
    os.chown(own, NOBODY, NOBODY)
    os.makedirs(roots, mode=0o755)  # root's: 65534 may not write in it
    got = as_nobody(d.sock, [
        ("build_template", [tree, "jbase"], {}),
        ("create_volume", ["jv", "jbase"], {}),
        ("jail", ["jv", own], {"uid": 0}),
        ("jail", ["jv", own], {"uid": 1234, "gid": NOBODY}),
        ("jail", ["jv", own], {"uid": NOBODY, "gid": 0}),
        ("jail", ["jv", roots], {"uid": NOBODY, "gid": NOBODY}),
        ("jail", ["jv", own], {"uid": NOBODY, "gid": NOBODY}),
    ])
    assert "ok" in got[0] and "ok" in got[1], got
    for r in got[2:5]:
        assert r["error"] == "Forbidden" and "only root may jail" in r["message"], r
    assert got[5]["error"] == "Forbidden" and "EACCES" in got[5]["message"], got[5]
    assert got[6].get("ok") == os.path.join(own, "rootfs"), got[6]
    st = os.lstat(os.path.join(own, "rootfs"))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o600)
    assert os.listdir(roots) == []
    # root may jail for anyone, and gets exactly the owner asked for (root's when none)
    d.client.jail("jv", roots, uid=1234, gid=5678)
    st = os.lstat(os.path.join(roots, "rootfs"))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o600)
    d.client.jail("jv", roots)
    st = os.lstat(os.path.join(roots, "rootfs"))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)
    for j in (own, roots):
        os.unlink(os.path.join(j, "rootfs"))
    d.client.remove_volume("jv")


def test_cli_under_sudo_reads_as_the_sudo_user(tmp_path, area) -> None:
    root = str(tmp_path / "store")
    mine = caller_tree(os.path.join(area, "mine"))
    chown_tree(mine, NOBODY)
    secret = root_only(area)

    def cli(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cowdisk", "--root", root, "--backend", "copy", *args],
                              capture_output=True, text=True, env=env(**extra), timeout=300)

    sudo = {"SUDO_UID": str(NOBODY), "SUDO_GID": str(NOBODY), "SUDO_USER": "nobody"}
    r = cli("template", "build", secret, "--name", "s", **sudo)
    assert r.returncode == 4 and "EACCES" in r.stderr and secret in r.stderr, r
    r = cli("template", "import", os.path.join(area, "rootonly.img"), **sudo)
    assert r.returncode == 4 and "EACCES" in r.stderr, r
    r = cli("template", "build", mine, "--name", "mine", **sudo)
    assert r.returncode == 0, r
    # beside a daemon serving the store (where the command line goes through it, as root)
    with Daemon(root, os.path.join(area, "d.sock")) as d:
        d.start()
        sock = {"COWDISK_SOCKET": d.sock}
        r = cli("template", "build", secret, "--name", "s", **sudo, **sock)
        assert r.returncode == 4 and "EACCES" in r.stderr, r
        r = cli("template", "build", mine, "--name", "mine-again", **sudo, **sock)
        assert r.returncode == 0, r
        assert d.stop() == 0, d.log()
    r = cli("template", "build", secret, "--name", "s")  # root's own command line reads as root
    assert r.returncode == 0, r
    with Store(root) as s:
        assert sorted(n for t in s.templates() for n in t.names) == ["mine", "mine-again", "s"]
        s.destroy()


def test_image_builds_read_as_the_caller(served, area) -> None:
    """OCI layouts and archives through the daemon as uid 65534: its own layout builds (skopeo
    runs as it); a copy of an image root built, whose blobs are root-only (an index naming a
    manifest digest is all it takes to name an image), is refused, not served from the cache;
    a symlinked layout is refused with ELOOP."""
    from vmm.images import make_image, oci_archive

    d, mine = served
    layout = os.path.join(mine, "layout")
    make_image(layout, "v1", [lambda r: caller_tree(r, "from-an-image\n")])
    archive = oci_archive(layout, os.path.join(mine, "image.tar"))
    chown_tree(mine, NOBODY)
    locked = os.path.join(mine, "locked")
    shutil.copytree(layout, locked, symlinks=True)
    chown_tree(locked, NOBODY)
    for dd, _, files in os.walk(os.path.join(locked, "blobs")):  # root's 0600 blobs
        for n in files:
            os.chown(os.path.join(dd, n), 0, 0)
            os.chmod(os.path.join(dd, n), 0o600)
    os.symlink(layout, os.path.join(mine, "linked"))
    d.client.build_template_from_image(f"{locked}:v1", "by-root")  # root reads the root-only blobs
    got = as_nobody(d.sock, [("build_template_from_image", [f"{locked}:v1", "locked"], {}),
                             ("build_template_from_image", [f"{os.path.join(mine, 'linked')}:v1"], {}),
                             ("build_template_from_image", [f"{layout}:v1", "img"], {}),
                             ("build_template_from_image", [f"oci-archive:{archive}", "arch"], {})])
    assert "ok" in got[2] and "ok" in got[3], got
    # skopeo (as 65534) is refused the root-only blob by the kernel, and says so
    assert got[0]["error"] == "CowdiskError" and "skopeo" in got[0]["message"] \
        and "permission denied" in got[0]["message"], got[0]
    assert got[1]["error"] == "Forbidden" and "ELOOP" in got[1]["message"], got[1]
    img = d.client.template("img").path
    from vmm.images import debugfs
    assert debugfs(img, "cat /etc/hostname") == "from-an-image\n"
    assert sorted(n for t in d.client.templates() for n in t.names) == ["arch", "by-root", "img"]
