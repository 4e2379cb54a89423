"""Opening a store: the backend is checked before it is recorded, options are recorded
with it, and a refused first choice leaves the store free for another backend."""

from __future__ import annotations

import os

import pytest

from cowdisk.errors import InvalidArgument, Unsupported
from cowdisk.kernel import fs
from cowdisk.store import Store

pytestmark = pytest.mark.root


def test_a_refused_first_backend_is_not_recorded(tmp_path) -> None:
    root = str(tmp_path / "store")
    if fs.reflink_support(str(tmp_path)).ok:
        pytest.skip(f"{tmp_path} can reflink: this test needs a filesystem that cannot")
    with pytest.raises(Unsupported) as ei:
        Store(root, backend="reflink")
    assert ei.value.op == "open store"
    with Store(root, backend="copy") as s:  # the hint's advice is taken, not refused
        assert s.backend_name == "copy" and s.registry.meta("backend") == "copy"
    with Store(root) as s:
        assert s.backend_name == "copy"
    with pytest.raises(InvalidArgument):
        Store(root, backend="pool")


def test_backend_options_are_checked_and_recorded(tmp_path) -> None:
    with pytest.raises(InvalidArgument) as ei:
        Store(str(tmp_path / "a"), backend="copy", backend_options={"pool": "x"})
    assert ei.value.op == "open store" and "pool" in str(ei.value)
    with Store(str(tmp_path / "b"), backend="copy") as s:
        assert s.registry.meta("backend_options") == "{}"
    with pytest.raises(InvalidArgument):
        Store(str(tmp_path / "b"), backend_options={"x": "1"})


def test_an_unavailable_backend_is_refused_before_anything_is_recorded(tmp_path) -> None:
    from cowdisk.backends import backend_class

    ok, why = backend_class("dm-snapshot").available(str(tmp_path))
    if ok:
        pytest.skip("this host has device-mapper: the lab's tests cover dm-snapshot")
    root = str(tmp_path / "store")
    with pytest.raises(Unsupported) as ei:
        Store(root, backend="dm-snapshot")
    assert ei.value.op == "open store" and "device-mapper" in str(ei.value)
    with Store(root, backend="copy") as s:  # nothing recorded, no volume stuck in creating
        assert s.backend_name == "copy" and s.volumes() == []


def _open_pool_store(root: str, out: "multiprocessing.Queue[str]") -> None:
    try:
        with Store(root, backend="pool") as s:
            out.put(s.backend_name)
    except BaseException as e:  # reported to the parent
        out.put(f"{type(e).__name__}: {e}")


def test_processes_opening_a_new_pool_store_at_once_take_turns(tmp_path) -> None:
    import multiprocessing

    from testutil import assert_same_host, host_state

    before = host_state()
    root = str(tmp_path / "store")
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_open_pool_store, args=(root, out)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    results = [out.get(timeout=5) for _ in procs]
    assert results == ["pool"] * 4, results
    with Store(root) as s:
        s.destroy()
    assert_same_host(before)


def test_a_lazily_unmounted_pool_still_held_is_refused_clearly(tmp_path) -> None:
    import subprocess

    from cowdisk.errors import InUse
    from cowdisk.kernel.mount import mounted_at

    root = str(tmp_path / "store")
    s = Store(root, backend="pool")
    pool = s.backend.pool
    held = open(os.path.join(pool.mnt, "held"), "w")  # a shell or a VM still inside it
    try:
        s.close()
        subprocess.run(["umount", "-l", pool.mnt], check=True)  # what an admin's reboot script does
        assert mounted_at(pool.mnt) is None
        with pytest.raises(InUse) as ei:
            Store(root)
        assert ei.value.op == "mount pool" and f"PID {os.getpid()}" in str(ei.value)
    finally:
        held.close()
    with Store(root) as s:  # its last user gone, the loop went with it: mounted again
        assert mounted_at(s.backend.pool.mnt)
        s.destroy()


def test_ids_are_validated_by_every_operation(tmp_path) -> None:
    with Store(str(tmp_path / "s"), backend="copy") as s:
        for op in (s.remove_volume, s.checkpoint, s.restore, lambda v: s.fork(v, ["n"]), s.flatten):
            with pytest.raises(InvalidArgument) as ei:
                op("../x")
            assert ei.value.op == "validate id"
        os.makedirs(str(tmp_path / "jail"))
        with pytest.raises(InvalidArgument):
            s.jail("nope", str(tmp_path / "jail"), name="../escape")


def test_a_store_that_cannot_open_keeps_no_file_open(tmp_path) -> None:
    """Opening refused after the registry opened (another backend named than the recorded
    one): the registry's files are closed again, nothing of the store stays open."""
    from cowdisk.errors import InvalidArgument

    root = str(tmp_path / "s")
    Store(root, backend="copy").close()
    with pytest.raises(InvalidArgument):
        Store(root, backend="reflink")
    mine = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")]
    assert not [p for p in mine if p.startswith(root)], mine
