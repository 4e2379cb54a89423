"""A lost or damaged registry on every host backend: the store says so with exit code 13
and the command that fixes it, nothing is deleted, and the rebuild from the manifests
brings back every template and volume with its state, data and links."""

from __future__ import annotations

import os

import pytest

from cowdisk.errors import RegistryDamaged
from cowdisk.store import Store
from testutil import MiB, make_tree, read_at, write_at

pytestmark = pytest.mark.root

DATA = b"kept-through-the-rebuild".ljust(4096, b"=")


def _world(store, tmp_path):
    store.build_template(make_tree(str(tmp_path / "tree")), "base")
    a = store.create_volume("a", "base")
    write_at(a.link, 2 * MiB, DATA)
    c = store.create_volume("c", "base")
    write_at(c.link, 3 * MiB, DATA)
    store.checkpoint("c")
    store.restore("c", "d")  # c's link now serves d
    return {v.id: v.state for v in store.volumes()}


def _damage(db: str, how: str) -> None:
    if how == "deleted":
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(db + suffix):
                os.unlink(db + suffix)
    elif how == "truncated":
        os.truncate(db, 1000)
        for suffix in ("-wal", "-shm"):
            if os.path.exists(db + suffix):
                os.unlink(db + suffix)
    elif how == "corrupted":
        with open(db, "r+b") as f:
            f.write(b"this is no SQLite file anymore" * 100)


@pytest.mark.parametrize("how", ["deleted", "truncated", "corrupted"])
def test_a_damaged_registry_is_rebuilt_from_the_manifests(store, backend, tmp_path, how) -> None:
    before = _world(store, tmp_path)
    root, tid = store.root, store.template("base").id
    store.close()
    _damage(os.path.join(root, "registry.db"), how)
    with pytest.raises(RegistryDamaged) as ei:
        Store(root)
    assert ei.value.exit_code == 13 and "--rebuild-registry" in ei.value.hint
    s, rep, moved = Store.rebuild_registry(root)
    try:
        assert {v.id: v.state for v in s.volumes()} == before
        assert s.template("base").id == tid and s.template("base").names == ("base",)
        assert sorted(rep.adopted) == sorted([f"template {tid}", "volume a (attached)", "volume c (checkpointed)",
                                               "volume d (attached)"])
        assert rep.errors == [] and s.recover().actions == 0
        assert all(os.path.exists(m) for m in moved) and (how == "deleted") == (moved == [])
        assert read_at(s.volume("a").link, 2 * MiB, 4096) == DATA
        assert read_at(s.link_path("c"), 3 * MiB, 4096) == DATA  # the retargeted link is back
        s.restore("c")  # the checkpoint restores in place (d keeps its own data)
        assert read_at(s.volume("c").link, 3 * MiB, 4096) == DATA
    finally:
        for v in s.volumes():
            s.remove_volume(v.id)
        s.close()
        for m in moved:
            os.unlink(m)


def test_wal_deleted_rows_come_back_from_the_manifests(store, backend, tmp_path) -> None:
    _world(store, tmp_path)
    root = store.root
    # a kill of every process at once, then the WAL lost: the last commits are gone
    store.close()
    db = os.path.join(root, "registry.db")
    if os.path.exists(db + "-wal"):
        os.unlink(db + "-wal")
    s = Store(root)  # whatever the registry lost, recovery adopts from the manifests, never deletes
    try:
        assert {v.id for v in s.volumes()} == {"a", "c", "d"}
        assert read_at(s.volume("a").link, 2 * MiB, 4096) == DATA
        assert not os.path.exists(os.path.join(s.data_root, "quarantine"))
    finally:
        for v in s.volumes():
            s.remove_volume(v.id)
        s.close()


@pytest.mark.backends("copy")
def test_the_cli_says_exit_13_and_rebuilds(store, backend, tmp_path) -> None:
    import json

    from testutil import cowdisk_cli

    _world(store, tmp_path)
    root = store.root
    store.close()
    os.unlink(os.path.join(root, "registry.db"))
    p = cowdisk_cli(root, "volume", "ls")
    assert p.returncode == 13 and "--rebuild-registry" in p.stderr, (p.returncode, p.stderr)
    p = cowdisk_cli(root, "recover", "--rebuild-registry", "--json")
    assert p.returncode == 0, p.stderr
    assert sorted(json.loads(p.stdout)["adopted"])[-3:] == ["volume a (attached)", "volume c (checkpointed)",
                                                            "volume d (attached)"]
    p = cowdisk_cli(root, "volume", "ls", "-q")
    assert p.returncode == 0 and set(p.stdout.split()) == {"a", "c", "d"}, p.stdout
    with Store(root) as s:
        for v in s.volumes():
            s.remove_volume(v.id)


@pytest.mark.backends("copy")
def test_quarantine_is_listed_and_purged_only_past_its_age(store, backend, tmp_path) -> None:
    ghost = os.path.join(store.data_root, "volumes", "ghost")
    os.makedirs(ghost)
    with open(os.path.join(ghost, "disk.img"), "wb") as f:
        f.write(DATA)
    rep = store.recover()
    [moved] = rep.in_quarantine
    assert rep.quarantined == [f"{ghost} -> {moved}"]
    assert store.gc(purge=True, older_than_s=3600).in_quarantine == [moved]  # too young: kept
    assert os.path.exists(os.path.join(moved, "disk.img"))
    rep = store.gc(purge=True, older_than_s=0)
    assert rep.orphans_removed == [f"purged {moved}"] and rep.in_quarantine == []
    assert not os.path.exists(moved)
