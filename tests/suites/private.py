"""Private by default (issue 23 item 1): after the conformance suite and more (templates
built from a tree holding a 0600 secret, imported, flattened; volumes attached,
checkpointed, forked, restored as new), every file and directory of the store is walked
by uid 65534 in a real setuid child: nothing is readable or listable, and nothing below
the store root is searchable, with the process's umask at 000 the whole time.

The walker reaches the store through a descriptor of its root opened before it drops
root (the tests' tmp directories are not searchable by others): that is what any user
gets where the store root sits in a public directory such as /var/lib."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from typing import Iterator

import pytest

from cowdisk.store import modes
from suites.conformance import test_fork_flatten_usage, test_larger_volume, test_lifecycle, test_restore_new_id

NOBODY = 65534


@pytest.fixture
def umask0() -> Iterator[None]:
    """umask 000 while the store is made and used: its modes must not come from the umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def secret_tree(d: str) -> str:
    os.makedirs(os.path.join(d, "etc"))
    with open(os.path.join(d, "etc", "hostname"), "w") as f:
        f.write("private\n")
    p = os.path.join(d, "etc", "api-key")
    with open(p, "w") as f:
        f.write("sk-cowdisk-private-0123456789\n")
    os.chmod(p, 0o600)
    return d


def walk_as_nobody(root: str, *, root_mode: int | None = None) -> dict[str, list[str]]:
    """Every path of the store (listed by root) tried by uid/gid 65534 through a descriptor of
    the root: {"read": files it opened, "listed": directories it read, "searched": directories
    it looked into, "refused": how many tries were refused, "errors": other errnos}.
    ``root_mode``: the store root's mode during the walk (put back afterwards)."""
    paths = []
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            paths.append(os.path.relpath(os.path.join(d, n), root))
    old = stat.S_IMODE(os.stat(root).st_mode)
    if root_mode is not None:
        os.chmod(root, root_mode)
    rfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: uid 65534, no groups
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out: dict[str, list[str]] = {"read": [], "listed": [], "searched": [], "refused": [], "errors": []}

            def tried(kind: str, rel: str, fn) -> None:
                try:
                    fd = fn()
                    if isinstance(fd, int):
                        os.close(fd)
                    out[kind].append(rel)
                except PermissionError:
                    out["refused"].append(rel)
                except OSError as e:
                    out["errors"].append(f"{rel}: {e}")

            tried("listed", ".", lambda: os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=rfd))
            for rel in paths:
                try:
                    kind = stat.S_IFMT(os.stat(rel, dir_fd=rfd, follow_symlinks=False).st_mode)
                except PermissionError:
                    out["refused"].append(rel)
                    continue
                except OSError as e:
                    out["errors"].append(f"{rel}: {e}")
                    continue
                # it could stat rel: its parent is searchable
                out["searched"].append(os.path.dirname(rel) or ".")
                if kind == stat.S_IFDIR:
                    tried("listed", rel, lambda: os.open(rel, os.O_RDONLY | os.O_DIRECTORY, dir_fd=rfd))
                elif kind == stat.S_IFREG:
                    tried("read", rel, lambda: os.open(rel, os.O_RDONLY | os.O_NONBLOCK, dir_fd=rfd))
            out["searched"] = sorted(set(out["searched"]))
            os.write(w, json.dumps(out).encode())
            os._exit(0)
        except BaseException as e:  # noqa: BLE001
            os.write(w, json.dumps({"child": repr(e)}).encode())
            os._exit(1)
    os.close(w)
    os.close(rfd)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    if root_mode is not None:
        os.chmod(root, old)
    doc = json.loads(data)
    assert "child" not in doc, doc
    return doc


def test_every_store_file_is_private_to_root(umask0, store, backend, tmp_path) -> None:
    # the conformance suite first, on this one store
    for i, run in enumerate((lambda p: test_lifecycle(store, p), lambda p: test_restore_new_id(store, p),
                             lambda p: test_fork_flatten_usage(store, backend, p),
                             lambda p: test_larger_volume(store, p))):
        (tmp_path / f"c{i}").mkdir()
        run(tmp_path / f"c{i}")
        for t in store.templates():  # each builds its own "base": the next one may name its own
            if "base" in t.names:
                store.remove_template(t.id)
    # then a store with some of everything in it
    t = store.build_template(secret_tree(str(tmp_path / "secret")), "secret")
    store.create_volume("p1", "secret")
    store.create_volume("p2", "secret")
    store.checkpoint("p2")
    store.restore("p2", "p3")
    store.fork("p1", ["p4"])
    flat = store.flatten("p1", "flat")
    root = store.root
    try:
        assert modes.wide(root, store.data_root) == [], modes.wide(root, store.data_root)
        # as the library leaves it (root 0700): nothing at all
        seen = walk_as_nobody(root)
        assert seen["read"] == [] and seen["listed"] == [] and seen["searched"] == [], seen
        assert seen["errors"] == [], seen
        assert len(seen["refused"]) >= 20
        # with the root searchable (0711, the daemon's documented exception for its default
        # import root): the names right under it can be looked up, nothing more
        seen = walk_as_nobody(root, root_mode=0o711)
        assert seen["read"] == [] and seen["listed"] == [] and seen["searched"] == ["."], seen
        assert seen["errors"] == [], seen
        # the reproduction: debugfs reads the 0600 file out of the template image
        img = store.template(t.id).path
        rel = os.path.relpath(img, root)
        for tid, path in ((t.id, img), (flat.id, store.template(flat.id).path)):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o400, (tid, oct(os.stat(path).st_mode))
        as_root = subprocess.run(["debugfs", "-R", "cat /etc/api-key", img], capture_output=True, text=True)
        assert "sk-cowdisk-private" in as_root.stdout, as_root  # the test can see it as root
        old = stat.S_IMODE(os.stat(root).st_mode)
        os.chmod(root, 0o711)
        try:
            def drop() -> None:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)

            rfd = os.open(root, os.O_PATH | os.O_DIRECTORY)
            try:
                # debugfs opens the image by path: through the root's descriptor (/proc/self/fd
                # is the child's own; opened before the drop, kept across exec)
                nobody = subprocess.run(["debugfs", "-R", "cat /etc/api-key", f"/proc/self/fd/{rfd}/{rel}"],
                                        capture_output=True, text=True, preexec_fn=drop, pass_fds=(rfd,))
            finally:
                os.close(rfd)
        finally:
            os.chmod(root, old)
        assert "sk-cowdisk-private" not in nobody.stdout, nobody
        assert "Permission denied" in nobody.stderr, nobody
    finally:
        for v in ("p4", "p3", "p2", "p1"):
            store.remove_volume(v)
