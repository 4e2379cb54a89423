"""The backend conformance suite: the same volume behaviour on every backend."""

from __future__ import annotations

import os
import subprocess

import pytest

from cowdisk.errors import InUse, InvalidArgument, NotFound, StateError, TemplateChanged
from testutil import MiB, debugfs_cat, make_tree, read_at, sha, write_at


def test_lifecycle(store, tmp_path) -> None:
    t = store.build_template(make_tree(str(tmp_path / "tree")), "base")
    digest = sha(t.path)
    assert t.digest == digest
    v = store.create_volume("vm1", "base")
    assert v.state == "attached" and v.device
    assert os.path.realpath(v.link) == os.path.realpath(v.device)
    assert read_at(v.link, 0, MiB) == read_at(t.path, 0, MiB)
    # writes land in the volume, never in the template or a sibling
    w = store.create_volume("vm2", t.id)
    write_at(v.link, 10 * MiB, b"A" * 4096)
    assert read_at(v.link, 10 * MiB, 4096) == b"A" * 4096
    assert read_at(w.link, 10 * MiB, 4096) == read_at(t.path, 10 * MiB, 4096)
    assert sha(t.path) == digest
    names = {x.id for x in store.volumes()}
    assert names == {"vm1", "vm2"}
    assert store.template("base").users == ("vm1", "vm2")
    with pytest.raises(InUse):
        store.remove_template("base")
    store.remove_volume("vm2")
    assert not os.path.lexists(w.link)
    assert not os.path.exists(os.path.dirname(w.link))
    # checkpoint keeps data, restore in place brings it back
    c = store.checkpoint("vm1")
    assert c.state == "checkpointed" and c.device is None
    assert not os.path.lexists(c.link)
    with pytest.raises(StateError):
        store.checkpoint("vm1")
    r = store.restore("vm1")
    assert r.state == "attached"
    assert read_at(r.link, 10 * MiB, 4096) == b"A" * 4096
    store.remove_volume("vm1")
    assert store.volumes() == []
    store.remove_template("base")
    assert store.templates() == []


def test_restore_new_id(store, tmp_path) -> None:
    t = store.build_template(make_tree(str(tmp_path / "tree")), "base")
    a = store.create_volume("a", "base")
    write_at(a.link, 5 * MiB, b"1" * 4096)
    store.checkpoint("a")
    b = store.restore("a", "b")
    # the source's stable link (what a VM snapshot recorded) now leads to b's device
    assert os.path.realpath(store.link_path("a")) == os.path.realpath(b.device)
    assert os.path.realpath(b.link) == os.path.realpath(b.device)
    assert read_at(b.link, 5 * MiB, 4096) == b"1" * 4096
    write_at(b.link, 6 * MiB, b"B" * 4096)
    c = store.restore("a", "c")
    assert os.path.realpath(store.link_path("a")) == os.path.realpath(c.device)
    assert read_at(c.link, 6 * MiB, 4096) == read_at(t.path, 6 * MiB, 4096), "c sees b's write"
    assert read_at(c.link, 5 * MiB, 4096) == b"1" * 4096
    assert store.volume("a").state == "checkpointed"
    store.remove_volume("c")
    # the link never points at a removed device
    assert not os.path.lexists(store.link_path("a"))
    store.remove_volume("b")
    store.remove_volume("a")
    assert store.volumes() == []
    assert sha(t.path) == t.digest


def test_fork_flatten_usage(store, backend, tmp_path) -> None:
    t = store.build_template(make_tree(str(tmp_path / "tree")), "base")
    v = store.create_volume("src", "base")
    fresh = store.usage("src")
    if backend == "copy":  # the honest baseline: a fresh volume costs the template's data
        assert fresh.own_bytes <= store.template_usage("base") + 64 * 1024, fresh
    else:  # copy-on-write: a fresh volume costs (nearly) nothing
        assert fresh.own_bytes < 256 * 1024, fresh
    write_at(v.link, 20 * MiB, os.urandom(MiB))
    after = store.usage("src")
    assert after.own_bytes >= fresh.own_bytes + MiB - 64 * 1024, (fresh, after)
    forks = store.fork("src", ["f1", "f2"])
    assert [f.id for f in forks] == ["f1", "f2"]
    for f in forks:
        assert read_at(f.link, 20 * MiB, MiB) == read_at(v.link, 20 * MiB, MiB)
    write_at(forks[0].link, 0, b"\0" * 4096)
    assert read_at(forks[1].link, 0, 4096) == read_at(t.path, 0, 4096)
    flat = store.flatten("src", "flat")
    r = subprocess.run(["e2fsck", "-fn", flat.path], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert read_at(flat.path, 20 * MiB, MiB) == read_at(v.link, 20 * MiB, MiB)
    assert debugfs_cat(flat.path, "/etc/hostname") == b"template\n"
    assert flat.id != t.id
    for vid in ("f1", "f2", "src"):
        store.remove_volume(vid)
    store.remove_template("flat")
    store.remove_template("base")


def test_bad_input(store, tmp_path) -> None:
    for bad in ["", "a/b", "..", ".hidden", "a b", "a\0b", "x" * 65, "a\nb", "é"]:
        with pytest.raises(InvalidArgument):
            store.create_volume(bad, "nope")
    with pytest.raises(NotFound):
        store.create_volume("ok", "missing-template")
    # a template adopted in place and then modified on disk is refused
    src = str(tmp_path / "adopted.img")
    with open(src, "wb") as f:
        f.truncate(64 * MiB)
    store.import_template(src, "adopted", adopt=True)
    with open(src, "r+b") as f:
        f.seek(4096)
        f.write(b"changed")
    with pytest.raises(TemplateChanged):
        store.create_volume("ok", "adopted")
    assert store.volumes() == []
    assert not os.path.exists(store.link_path("ok"))
    store.remove_template("adopted")
