"""The daemon's API fuzzed from its own OpenAPI document (tests/fuzzapi.py, schemathesis), against
a real daemon process over its unix socket, as root and as two other uids (setuid children).

Bounded in time (about a minute in all): the passes stop at their budget whatever the host's
speed. What must hold: no 500 but a documented KernelError, no hang, every answer as the
document declares it, schema-breaking input refused, no refused request changes the store,
a uid the allowlist does not name is refused everything (403) and changes nothing, and
nothing is left behind (recovery finds nothing to do, no lock file of a volume that does not
exist, the host's loops/dm/mounts as before)."""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any, Callable, Iterable, Iterator

import pytest

import fuzzapi
from cowdisk.store import Store
from daemonutil import Daemon
from testutil import MiB, assert_settled, host_state, make_tree

pytestmark = pytest.mark.root

ALLOWED, OTHER = 65534, 65533


@pytest.fixture
def sockdir() -> Iterator[str]:
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="cdz-", dir="/tmp")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def store_state(root: str) -> dict[str, Any]:
    """The registry's rows and every file of the store (size, mtime), lock files and the
    registry's own files left out (a lock file's coming and going is checked at the end)."""
    db = sqlite3.connect(f"file:{root}/registry.db?mode=ro", uri=True)
    try:
        out: dict[str, Any] = {t: sorted(map(repr, db.execute(f"SELECT * FROM {t}")))  # noqa: S608
                               for t in ("volumes", "templates", "template_names", "links", "intents", "objects")}
    finally:
        db.close()
    files = []
    for d, dirs, names in os.walk(root):
        rel = os.path.relpath(d, root)
        if rel == "locks" or rel.startswith("cache/.locks"):
            continue
        for n in names + [x for x in dirs if os.path.islink(os.path.join(d, x))]:
            if n.startswith("registry.db"):
                continue
            st = os.lstat(os.path.join(d, n))
            files.append((os.path.join(rel, n), st.st_size, st.st_mtime_ns))
    out["files"] = sorted(files)
    return out


def _import_codecs() -> None:
    import encodings
    import importlib
    import pkgutil
    for m in pkgutil.iter_modules(encodings.__path__):
        try:
            importlib.import_module(f"encodings.{m.name}")
        except Exception:  # noqa: BLE001 (mbcs, oem: Windows only)
            pass


def as_uid(uid: int, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()`` in a forked child running as ``uid`` (gid the same, no groups): its JSON result.
    Everything it needs is imported already (the root pass ran): a process of another uid
    cannot read this interpreter's modules. Codecs are looked up lazily (a body the fuzzer
    sends as utf-16 made the child fail with 'unknown encoding: utf-16-be'): all of them first."""
    _import_codecs()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            out = json.dumps(fn()).encode()
        except BaseException as e:  # noqa: BLE001 (reported to the parent)
            out, code = json.dumps({"child_error": repr(e)}).encode(), 1
        with os.fdopen(w, "wb") as f:
            f.write(out)
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    res: dict[str, Any] = json.loads(data or b"{}")
    assert os.WEXITSTATUS(status) == 0 and "child_error" not in res, res
    return res


def report(what: str, c: fuzzapi.Counts | dict[str, Any]) -> dict[str, Any]:
    d = c.as_dict() if isinstance(c, fuzzapi.Counts) else c
    print(f"fuzz {what}: {json.dumps({k: v for k, v in d.items() if k != 'failures'})}, "
          f"{len(d['failures'])} failures")
    return d


def test_api_fuzzed_from_its_openapi_document(tmp_path, sockdir) -> None:
    before = host_state()
    root = str(tmp_path / "store")
    jails = str(tmp_path / "jails")
    os.makedirs(jails)
    incoming = os.path.join(root, "incoming")
    tree = make_tree(os.path.join(incoming, "tree"))
    image = os.path.join(incoming, "image.raw")
    with open(image, "wb") as f:
        f.truncate(4 * MiB)
    with Store(root, backend="copy") as s:
        s.build_template(tree, "base")
        s.create_volume("vm1", "base")
        s.create_volume("vm2", "base")
        s.checkpoint("vm2")
    sock = os.path.join(sockdir, "d.sock")
    known = {"vid": ["vm1", "vm2", "fz1"], "ref": ["base"], "template": ["base"], "id": ["fz1", "fz2", "vm1"],
             "new_id": ["fz3", "vm1"], "new_ids": [["fz4", "fz5"], ["vm1"]], "source": [tree, image, "/etc"],
             "dir": [os.path.join(jails, "j1"), "/etc"], "name": ["base", "fz-t"]}
    with Daemon(root, sock, "--socket-mode", "0666", "--allow-uid", str(ALLOWED), "--jail-root", jails) as d:
        d.start()
        # root: everything the document allows, steered to objects that exist
        doc = fuzzapi.session(sock).get(f"{fuzzapi.BASE}/openapi.json", timeout=60).json()
        ops = sum(len(v) for v in doc["paths"].values())
        c = report("root", fuzzapi.run_pass(sock, 30, budget_s=40, state=lambda: store_state(root), known=known,
                                            skip=lambda m, p: (m, p) == ("DELETE", "/v1/store")))
        assert c["failures"] == [] and c["requests"] > 300 and c["operations"] == ops - 1, c["failures"][:20]
        roots = {v.id: v for v in d.client.volumes()}
        templates = d.client.templates()
        # a uid the allowlist does not name: everything refused, nothing changed
        was = store_state(root)
        c = report(f"uid {OTHER}", as_uid(OTHER, lambda: fuzzapi.run_pass(
            sock, 3, budget_s=15, doc=doc, expect=fuzzapi.forbidden, skip=lambda m, p: p == "/metrics").as_dict()))
        assert c["failures"] == [] and c["requests"] > 50 and set(c["statuses"]) == {"403"}, c
        assert store_state(root) == was
        # the allowed non-root uid, steered to root's volumes and templates (and the whole
        # store: DELETE /v1/store): the same checks as root's, and root's objects unchanged
        others = {**known, "vid": sorted(roots), "id": sorted(roots), "new_id": sorted(roots)}
        c = report(f"uid {ALLOWED}", as_uid(ALLOWED, lambda: fuzzapi.run_pass(sock, 5, budget_s=15,
                                                                             known=others).as_dict()))
        assert c["failures"] == [] and c["requests"] > 50, c["failures"][:20]
        assert {v.id: v for v in d.client.volumes() if v.id in roots} == roots
        # root's templates unchanged, but for their users: the allowed uid may make volumes of a
        # shared one (and only of a shared one: its own volumes are all it sees of it)
        def unused(ts: Iterable[Any]) -> dict[str, Any]:
            return {t.id: t._replace(users=()) for t in ts}
        after, was = {t.id: t for t in d.client.templates()}, unused(templates)
        assert {k: v for k, v in unused(after.values()).items() if k in was} == was
        for t in templates:
            assert t.shared or after[t.id].users == t.users, (t, after[t.id])
            assert set(after[t.id].users) - set(t.users) <= {v.id for v in d.client.volumes()}
        assert d.stop() == 0
    with Store(root, backend="copy") as s:
        rep = s.recover()
        assert rep.actions == 0 and rep.errors == [], rep.as_dict()
        vols = {v.id for v in s.volumes()}
        assert set(roots) <= vols
        left = [n for n in os.listdir(os.path.join(root, "locks"))
                if n.startswith("volume-") and n[len("volume-"):-len(".lock")] not in vols]
        assert left == [], f"lock files of volumes that do not exist: {left}"
        debris = [os.path.join(dp, n) for dp, _, ns in os.walk(root) for n in ns if ".tmp" in n]
        assert debris == []
        s.destroy()
    assert_settled(before)
