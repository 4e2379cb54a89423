"""Bad input: invalid volume ids, a missing template, a template changed on disk.

Each is refused with its error type before anything is made: the host is exactly as
before (loops, dm devices, mounts) and no file appears under the store's volumes/ and
links/ directories.
"""

from __future__ import annotations

import os
import shutil

import pytest

from cowdisk.errors import InvalidArgument, NotFound, TemplateChanged
from testutil import MiB, assert_settled, host_state, store_files

BAD_IDS = ["", "a/b", "/abs", "..", "a..b", ".hidden", "-dash", "a b", "a\tb", "a\0b", "a\nb", "x" * 65,
           "é", "vm*", "vm;rm", "$(x)"]


def test_invalid_ids(store, base) -> None:
    v = store.create_volume("ok", "base")
    store.checkpoint("ok")
    before, files = host_state(), store_files(store)
    for bad in BAD_IDS:
        for op in (lambda: store.create_volume(bad, "base"),
                   lambda: store.restore("ok", bad),
                   lambda: store.fork("ok", [bad])):
            with pytest.raises(InvalidArgument) as ei:
                op()
            assert ei.value.op == "validate id" and ei.value.obj == repr(bad), (bad, ei.value)
        assert_settled(before)
        assert store_files(store) == files, bad
    assert [x.id for x in store.volumes()] == ["ok"]
    # the longest valid id fits (for dm-snapshot: the dm name limit with the store's prefix)
    longest = "x" * 64
    w = store.create_volume(longest, "base")
    assert os.path.basename(os.path.realpath(w.link)) == os.path.basename(w.device)
    store.remove_volume(longest)
    store.remove_volume(v.id)


def test_missing_template(store, base) -> None:
    before, files = host_state(), store_files(store)
    with pytest.raises(NotFound) as ei:
        store.create_volume("vm", "no-such-template")
    assert ei.value.obj == "no-such-template", ei.value
    assert_settled(before)
    assert store_files(store) == files == []
    assert store.volumes() == []


@pytest.mark.parametrize("how", ["write", "truncate", "mtime"])
def test_template_changed_on_disk(store, how: str) -> None:
    inbox = os.path.join(store.data_root, "inbox")  # same filesystem as the volumes (reflink needs it)
    os.makedirs(inbox)
    try:
        src = os.path.join(inbox, "adopted.img")
        with open(src, "wb") as f:
            f.truncate(16 * MiB)
            f.seek(MiB)
            f.write(b"original")
        t = store.import_template(src, "adopted", adopt=True)
        # a volume made before the change, checkpointed: restore must refuse too
        store.create_volume("before", "adopted")
        store.checkpoint("before")
        if how == "write":
            with open(src, "r+b") as f:
                f.seek(8 * MiB)
                f.write(b"changed")
        elif how == "truncate":
            os.truncate(src, 16 * MiB + 4096)
        else:
            st = os.stat(src)
            os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        before, files = host_state(), store_files(store)
        for op in (lambda: store.create_volume("after", "adopted"),
                   lambda: store.restore("before"),
                   lambda: store.restore("before", "before2")):
            with pytest.raises(TemplateChanged) as ei:
                op()
            assert ei.value.obj == t.id, ei.value
        assert_settled(before)
        assert store_files(store) == files
        assert store.template("adopted").state == "changed"
        assert {v.id: v.state for v in store.volumes()} == {"before": "checkpointed"}
        store.remove_volume("before")
        store.remove_template("adopted")
    finally:
        shutil.rmtree(inbox, ignore_errors=True)


def test_refused_calls_leave_no_lock_file(store, base) -> None:
    """A call refused for an id no volume has (remove, checkpoint, restore, fork, a create of a
    missing template or of an impossible size) leaves no lock file of that id behind: one lock
    file per volume that exists, not one per id anyone named (the API fuzz found a file per
    refused remove). A size past what a file can hold is refused as invalid (it was a 500:
    OverflowError from the registry)."""
    store.create_volume("ok", "base")
    locks = os.path.join(store.root, "locks")
    before = sorted(os.listdir(locks))
    calls = [(NotFound, lambda: store.remove_volume("ghost1")),
             (NotFound, lambda: store.checkpoint("ghost2")),
             (NotFound, lambda: store.restore("ghost3")),
             (NotFound, lambda: store.restore("ghost4", "ghost5")),
             (NotFound, lambda: store.fork("ghost6", ["ghost7"])),
             (NotFound, lambda: store.create_volume("ghost8", "no-such-template")),
             (InvalidArgument, lambda: store.create_volume("ghost9", "base", size=1 << 80))]
    for err, call in calls:
        with pytest.raises(err) as ei:
            call()
        assert "ghost" in str(ei.value) or ei.value.obj == "no-such-template", ei.value
    assert sorted(os.listdir(locks)) == before
    assert [v.id for v in store.volumes()] == ["ok"]
    store.remove_volume("ok")
    assert "volume-ok.lock" not in os.listdir(locks)
