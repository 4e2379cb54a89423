"""Templates on every host backend: a built template is stored once (the cache's image
moves into templates/) and hashed once (the cache's digest); its identity check cannot
be fooled by stat; recovery keeps owned templates immutable; a half-published import is
undone."""

from __future__ import annotations

import os
import signal

import pytest

from cowdisk.cache import TemplateCache, TreeRecipe
from cowdisk.errors import TemplateChanged
from cowdisk.kernel import fs
from testutil import make_tree, sha

pytestmark = pytest.mark.root


def test_a_built_template_is_the_cache_image_itself(store, backend, tmp_path) -> None:
    cache = TemplateCache(os.path.join(store.data_root, "cache"))
    tree = make_tree(str(tmp_path / "tree"))
    key = cache.key_for(TreeRecipe(tree, 64 << 20))
    t = store.build_template(tree, "base")
    # stored once: the image moved out of the cache (no second copy, no second name)
    assert cache.list() == [] and os.stat(t.path).st_nlink == 1
    # hashed once, and right: the registered digest is the bytes' own
    assert t.digest == sha(t.path) and t.source == f"cache:{key}"
    assert fs.is_immutable(t.path) and os.stat(t.path).st_mode & 0o777 == 0o400
    # building the same tree again finds the template by its recipe key: nothing is built
    ino = os.stat(t.path).st_ino
    again = store.build_template(tree, "again")
    assert again.id == t.id and set(again.names) == {"base", "again"}
    assert os.stat(t.path).st_ino == ino and cache.list() == [] and len(store.templates()) == 1


def test_a_changed_template_is_refused_until_verify_clears_it(store, backend, tmp_path) -> None:
    t = store.build_template(make_tree(str(tmp_path / "tree")), "base")
    # a touch with no content change moves ctime (user space cannot set it back)
    fs.set_immutable(t.path, False)
    st = os.stat(t.path)
    os.utime(t.path, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back: only ctime tells
    fs.set_immutable(t.path, True)
    with pytest.raises(TemplateChanged) as ei:
        store.create_volume("v", "base")
    assert ei.value.obj == t.id
    assert store.template("base").state == "changed"
    with pytest.raises(TemplateChanged):  # stays refused: the mark is sticky
        store.create_volume("v", "base")
    ok = store.verify_template("base")  # same bytes: the mark goes, the record is refreshed
    assert ok.state == "ready"
    v = store.create_volume("v", "base")
    store.remove_volume(v.id)


def test_a_rewritten_template_is_refused_by_create_fork_restore_and_flatten(store, backend, tmp_path) -> None:
    t = store.build_template(make_tree(str(tmp_path / "tree")), "base")
    store.create_volume("a", "base")
    store.create_volume("b", "base")
    store.checkpoint("b")
    fs.set_immutable(t.path, False)
    os.chmod(t.path, 0o644)
    st = os.stat(t.path)
    with open(t.path, "r+b") as f:  # same size, mtime put back
        f.seek(4 << 20)
        f.write(b"evil")
    os.utime(t.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    for op in (lambda: store.create_volume("c", "base"), lambda: store.fork("a", ["d"]),
               lambda: store.restore("b"), lambda: store.flatten("a", "flat")):
        with pytest.raises(TemplateChanged):
            op()
    with pytest.raises(TemplateChanged):
        store.verify_template("base")  # the bytes differ: stays changed
    assert store.template("base").state == "changed"
    assert sorted(v.id for v in store.volumes()) == ["a", "b"]
    store.remove_volume("a")
    store.remove_volume("b")


def test_recovery_makes_an_owned_template_immutable_again(store, backend, tmp_path) -> None:
    t = store.build_template(make_tree(str(tmp_path / "tree")), "base")
    fs.set_immutable(t.path, False)
    rep = store.recover()
    assert fs.is_immutable(t.path)
    assert rep.finished == [f"template {t.id}: immutable again"]
    assert store.recover().actions == 0


def test_a_killed_import_leaves_no_file_and_imports_again(store, backend, tmp_path) -> None:
    img = tmp_path / "img.raw"
    img.write_bytes(os.urandom(1 << 20))
    pid = os.fork()
    if pid == 0:
        os.environ["COWDISK_CRASH_AT"] = "import:publish"
        try:
            type(store)(store.root, recover=False).import_template(str(img), "img")
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    tid = sha(str(img))[:16]
    assert os.path.exists(os.path.join(store.data_root, "templates", tid, "disk.img"))  # published, no row
    rep = store.recover()
    assert rep.rolled_back == [f"import {tid}"]
    assert not os.path.exists(os.path.join(store.data_root, "templates", tid))
    t = store.import_template(str(img), "img")  # and the same content imports again
    assert t.id == tid and fs.is_immutable(t.path)
