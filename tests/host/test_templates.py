"""Templates on every host backend: a built template is stored once (the cache's image,
hard-linked) and hashed once (the cache's digest); recovery keeps owned templates immutable."""

from __future__ import annotations

import os

import pytest

from cowdisk.cache import TemplateCache
from cowdisk.kernel import fs
from testutil import make_tree, sha

pytestmark = pytest.mark.root


def test_a_built_template_is_the_cache_image_itself(store, backend, tmp_path) -> None:
    t = store.build_template(make_tree(str(tmp_path / "tree")), "base")
    entries = TemplateCache(os.path.join(store.data_root, "cache")).list()
    assert len(entries) == 1
    img = entries[0].image
    # stored once: one inode, two names (the cache's and the template's)
    assert os.stat(img).st_ino == os.stat(t.path).st_ino and os.stat(t.path).st_nlink == 2
    # hashed once, and right: the registered digest is the cache's, and the bytes' own
    assert t.digest == entries[0].sha256 == sha(t.path)
    assert fs.is_immutable(t.path) and os.stat(t.path).st_mode & 0o777 == 0o444
    # building the same tree again names the same template
    again = store.build_template(str(tmp_path / "tree"), "again")
    assert again.id == t.id and set(again.names) == {"base", "again"}
    assert len(store.templates()) == 1


def test_emptying_the_cache_keeps_the_template_immutable(store, backend, tmp_path) -> None:
    t = store.build_template(make_tree(str(tmp_path / "tree")), "base")
    TemplateCache(os.path.join(store.data_root, "cache")).clean_all()
    assert os.stat(t.path).st_nlink == 1 and fs.is_immutable(t.path)
    v = store.create_volume("v", "base")  # still a good template
    store.remove_volume(v.id)


def test_recovery_makes_an_owned_template_immutable_again(store, backend, tmp_path) -> None:
    t = store.build_template(make_tree(str(tmp_path / "tree")), "base")
    fs.set_immutable(t.path, False)  # a process killed between clearing +i and setting it again
    rep = store.recover()
    assert fs.is_immutable(t.path)
    assert rep.finished == [f"template {t.id}: immutable again"]
    assert store.recover().actions == 0
