"""The backend conformance suite: the same volume behaviour on every backend."""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import os
import re
import subprocess
import time

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


def _writer(path: str, stop: "multiprocessing.synchronize.Event", offsets: tuple[int, ...]) -> None:
    """Write an ever larger counter at ``offsets`` of ``path`` until told to stop."""
    fd = os.open(path, os.O_WRONLY)
    try:
        n = 0
        while not stop.is_set():
            n += 1
            for off in offsets:
                os.pwrite(fd, n.to_bytes(8, "little") * 512, off)
    finally:
        os.close(fd)


def test_fork_into_n_at_one_instant(store, backend, tmp_path) -> None:
    """Fork of an attached volume a process keeps writing to: every child is from the same
    instant (their counters are equal), whatever instant that was, and the source goes on."""
    store.build_template(make_tree(str(tmp_path / "tree")), "base")
    v = store.create_volume("src", "base")
    offsets = (12 * MiB, 13 * MiB, 30 * MiB)
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    w = ctx.Process(target=_writer, args=(v.link, stop, offsets))
    w.start()
    try:
        deadline = time.monotonic() + 10
        while read_at(v.link, offsets[-1], 8) == read_at(store.template("base").path, offsets[-1], 8):
            assert time.monotonic() < deadline, "the writer never wrote"
            time.sleep(0.01)
        kids = store.fork("src", ["k1", "k2", "k3", "k4"])
    finally:
        stop.set()
        w.join(10)
    assert w.exitcode == 0
    seen = [[read_at(k.link, off, 4096) for off in offsets] for k in kids]
    assert all(s == seen[0] for s in seen), [[x[:8].hex() for x in s] for s in seen]
    assert [k.state for k in kids] == ["attached"] * 4 and all(k.parent == "src" for k in kids)
    later = read_at(v.link, offsets[0], 8)
    assert int.from_bytes(later, "little") >= int.from_bytes(seen[0][0][:8], "little")
    for k in kids:
        store.remove_volume(k.id)
    store.remove_volume("src")


def test_fork_resets_identity(store, tmp_path) -> None:
    """fork --reset-identity: each child its own machine id, no SSH host keys, its own
    hostname, written offline (read back with debugfs; the filesystem checks clean); the
    source keeps its own."""
    tree = make_tree(str(tmp_path / "tree"))
    os.makedirs(os.path.join(tree, "etc", "ssh"))
    for name in ("ssh_host_ed25519_key", "ssh_host_ed25519_key.pub", "ssh_host_rsa_key", "sshd_config"):
        with open(os.path.join(tree, "etc", "ssh", name), "w") as f:
            f.write(f"{name}\n")
    with open(os.path.join(tree, "etc", "machine-id"), "w") as f:
        f.write("0123456789abcdef0123456789abcdef\n")
    store.build_template(tree, "base")
    src = store.create_volume("src", "base")
    kids = store.fork("src", count=3, prefix="sbx-", reset_identity=True, hostname_prefix="h-")
    ids = set()
    for k in kids:
        _fsck_clean(k.link)
        mid = debugfs_cat(k.link, "/etc/machine-id")
        assert re.fullmatch(rb"[0-9a-f]{32}\n", mid) and mid != b"0123456789abcdef0123456789abcdef\n", mid
        ids.add(mid)
        assert debugfs_cat(k.link, "/etc/hostname") == f"h-{k.id}\n".encode()
        assert _ls(k.link, "/etc/ssh") == ["sshd_config"]
        assert _mode(k.link, "/etc/machine-id") == 0o100444 and _mode(k.link, "/etc/hostname") == 0o100644
    assert len(ids) == 3
    assert debugfs_cat(src.link, "/etc/machine-id") == b"0123456789abcdef0123456789abcdef\n"
    assert debugfs_cat(src.link, "/etc/hostname") == b"template\n"
    assert len(_ls(src.link, "/etc/ssh")) == 4
    with pytest.raises(InvalidArgument, match="not a valid hostname"):
        store.fork("src", ["bad_name"], reset_identity=True)
    for k in kids:
        store.remove_volume(k.id)
    store.remove_volume("src")


def _ls(image: str, d: str) -> list[str]:
    out = subprocess.run(["debugfs", "-R", f"ls -p {d}", image], capture_output=True, text=True, check=True).stdout
    return sorted(n for ln in out.splitlines() if ln.startswith("/") for n in [ln.split("/")[5]]
                  if n not in (".", ".."))


def _mode(image: str, path: str) -> int:
    out = subprocess.run(["debugfs", "-R", f"stat {path}", image], capture_output=True, text=True, check=True).stdout
    m = re.search(r"Mode:\s+(\d+)", out)
    assert m, out
    return 0o100000 | int(m.group(1), 8)


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
    assert flat.id != t.id and flat.size == t.size
    # read through a volume of the new template (a backend may hold its data: dm-thin)
    ff = store.create_volume("ff", "flat")
    _fsck_clean(ff.link)
    assert read_at(ff.link, 20 * MiB, MiB) == read_at(v.link, 20 * MiB, MiB)
    assert debugfs_cat(ff.link, "/etc/hostname") == b"template\n"
    assert store.verify_template("flat").digest == flat.digest == sha(ff.link)
    for vid in ("ff", "f1", "f2", "src"):
        store.remove_volume(vid)
    store.remove_template("flat")
    store.remove_template("base")


def _size(path: str) -> int:
    """Bytes of a file or block device (lseek to its end)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _ext_bytes(path: str) -> int:
    """Bytes the ext filesystem on ``path`` spans (dumpe2fs: block count x block size)."""
    out = subprocess.run(["dumpe2fs", "-h", path], capture_output=True, text=True, check=True).stdout
    f = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return int(f["Block count"]) * int(f["Block size"])


def _fsck_clean(path: str) -> None:
    r = subprocess.run(["e2fsck", "-fn", path], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_larger_volume(store, tmp_path) -> None:
    """create_volume(size=): a device larger than its template with the ext4 grown to fill
    it (or left as it is with grow_fs=False); copies keep the size; a backend that cannot
    refuses with nothing made; bad sizes are refused."""
    t = store.build_template(make_tree(str(tmp_path / "tree")), "base", size=16 * MiB)  # small: TCG writes it
    base, big = t.size, t.size + 40 * MiB
    if not store.backend.larger_volumes:
        with pytest.raises(InvalidArgument, match=f"backend {store.backend_name} makes volumes of their template"):
            store.create_volume("big", "base", size=big)
        assert store.volumes() == [] and not os.path.lexists(store.link_path("big"))
        assert store.create_volume("same", "base", size=base).size == base  # the template's size is fine
        store.remove_volume("same")
        store.remove_template("base")
        return
    for bad in (base - 512, base + 100, 0, -4096):
        with pytest.raises(InvalidArgument, match="size"):
            store.create_volume("bad", "base", size=bad)
    assert store.volumes() == []
    v = store.create_volume("big", "base", size=big)
    assert v.size == big and _size(v.link) == big
    assert _ext_bytes(v.link) == big  # resize2fs grew it to the whole device
    _fsck_clean(v.link)
    assert debugfs_cat(v.link, "/etc/hostname") == b"template\n"
    payload = tmp_path / "big.bin"  # larger than the whole template: fits only in the grown filesystem
    payload.write_bytes(os.urandom(base + 8 * MiB))
    subprocess.run(["debugfs", "-w", "-R", f"write {payload} /big.bin", v.link], check=True, capture_output=True)
    assert debugfs_cat(v.link, "/big.bin") == payload.read_bytes()
    _fsck_clean(v.link)
    n = store.create_volume("nogrow", "base", size=big, grow_fs=False)
    assert _size(n.link) == big and _ext_bytes(n.link) == _ext_bytes(t.path)
    write_at(n.link, base + 24 * MiB, b"Z" * 4096)  # past the template's end: outside its filesystem
    assert read_at(n.link, base + 24 * MiB, 4096) == b"Z" * 4096
    assert read_at(n.link, base + 16 * MiB, 4096) == b"\0" * 4096
    _fsck_clean(n.link)
    store.remove_volume("nogrow")
    # copies (restore as, fork) and flatten keep the size and the data
    store.checkpoint("big")
    b2 = store.restore("big", "big2")
    assert b2.size == big and _size(b2.link) == big
    f = store.fork("big2", ["big3"])[0]
    assert f.size == big and _size(f.link) == big and debugfs_cat(f.link, "/big.bin") == payload.read_bytes()
    flat = store.flatten("big3", "flatbig")
    fv = store.create_volume("fromflat", "flatbig")
    assert flat.size == big and fv.size == big and _ext_bytes(fv.link) == big
    _fsck_clean(fv.link)
    assert debugfs_cat(fv.link, "/big.bin") == payload.read_bytes()
    for vid in ("fromflat", "big3", "big2", "big"):
        store.remove_volume(vid)
    store.remove_template("flatbig")
    assert sha(t.path) == t.digest and _ext_bytes(t.path) == base
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
