"""cowdisk.kernel.fs on real filesystems: FICLONE, statfs, FIEMAP usage, sparse copy."""

from __future__ import annotations

import errno
import os
import time

import pytest

from cowdisk.errors import KernelError
from cowdisk.kernel import fs
from testutil import scratch_fs

pytestmark = pytest.mark.root

MiB = 1 << 20


def _file_with_data(path: str, size: int = 64 * MiB) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(MiB)
        f.write(os.urandom(MiB))
        f.seek(40 * MiB)
        f.write(b"z" * 4096)


def test_statfs_names_and_nearest_existing(tmp_path) -> None:
    st = fs.fs_type(str(tmp_path / "does" / "not" / "exist"))
    assert st.path == str(tmp_path)
    assert st.f_type == fs.statfs(str(tmp_path)).f_type
    assert fs.statfs("/proc").name == "proc"
    with pytest.raises(KernelError) as e:
        fs.statfs(str(tmp_path / "missing"))
    assert e.value.errno == errno.ENOENT


def test_sparse_create_copy_and_usage(tmp_path) -> None:
    a = str(tmp_path / "a.img")
    fs.create_sparse(a, 64 * MiB)
    assert fs.disk_usage(a) == 0 and os.path.getsize(a) == 64 * MiB
    _file_with_data(str(tmp_path / "b.img"))
    seen = []
    n = fs.sparse_copy(str(tmp_path / "b.img"), str(tmp_path / "c.img"), progress=lambda d, t: seen.append((d, t)))
    assert n == MiB + 4096
    assert seen and seen[-1][0] == seen[-1][1]
    assert fs.disk_usage(str(tmp_path / "c.img")) <= 2 * MiB
    with open(str(tmp_path / "b.img"), "rb") as x, open(str(tmp_path / "c.img"), "rb") as y:
        assert x.read() == y.read()
    with pytest.raises(KernelError):
        fs.sparse_copy(str(tmp_path / "b.img"), str(tmp_path / "c.img"))  # exists: refused, not clobbered


@pytest.mark.root
@pytest.mark.parametrize("fstype", ["btrfs", "xfs"])
def test_ficlone_shares_then_diverges(fstype: str) -> None:
    with scratch_fs(fstype, 1 << 30) as mnt:
        src, dst = os.path.join(mnt, "t.img"), os.path.join(mnt, "v.img")
        _file_with_data(src)
        st = fs.statfs(mnt)
        assert st.reflink_capable and st.name == fstype
        rs = fs.reflink_support(mnt)
        assert rs.ok and rs.probe_ran and rs.probe_step == "" and rs.fs.name == fstype and rs.probed == mnt
        ahead = fs.reflink_support(os.path.join(mnt, "not", "yet"))  # no probe written into ancestors
        assert ahead.ok and not ahead.probe_ran and ahead.probed == mnt and ahead.fs_can_reflink
        fs.ficlone(src, dst)
        u = fs.shared_usage(dst)
        assert u.exclusive == 0 and u.shared >= MiB
        with open(dst, "r+b") as f:
            f.seek(MiB)
            f.write(b"\1" * 65536)
            f.flush()
            os.fsync(f.fileno())
        u2 = fs.shared_usage(dst)
        assert u2.exclusive >= 65536
        with open(src, "rb") as f:
            f.seek(MiB)
            assert f.read(65536) != b"\1" * 65536
        assert fs.set_immutable(src, True) and fs.is_immutable(src)
        fs.set_immutable(src, False)


@pytest.mark.root
def test_ficlone_refused_on_ext4_names_paths() -> None:
    with scratch_fs("ext4", 256 * MiB) as mnt:
        src, dst = os.path.join(mnt, "s.img"), os.path.join(mnt, "d.img")
        _file_with_data(src, 4 * MiB)
        with pytest.raises(KernelError) as e:
            fs.ficlone(src, dst)
        assert e.value.errno == errno.EOPNOTSUPP and src in str(e.value) and "btrfs or xfs" in str(e.value)
        assert not os.path.exists(dst)
        rs = fs.reflink_support(mnt)
        assert not rs.ok and not rs.fs_can_reflink and rs.fs.name == "ext4"
        assert rs.probe_step == "FICLONE" and rs.probe_errno == errno.EOPNOTSUPP
        assert "ext4" in rs.reason and "FICLONE" in rs.reason
        assert not fs.reflink_support(mnt, probe=False).probe_ran
        assert sorted(os.listdir(mnt)) == ["lost+found", "s.img"]  # the probes left nothing


def _fd_target(pid: int, fd: str) -> str | None:
    """What the process's fd points at, or None when it closed it meanwhile (a starting
    interpreter opens and closes files: CI saw FileNotFoundError on /proc/PID/fd/4)."""
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except FileNotFoundError:
        return None


def test_open_elsewhere_sees_fds_maps_and_loops(tmp_path) -> None:
    """The write-lease probe answers like the /proc search: another process's fd (read or
    write), a mapping whose fd is closed, a hard link's opener, a loop device's backing
    file; our own probe leaves nothing behind (a second probe answers the same)."""
    import subprocess
    import sys

    from cowdisk.kernel import loop

    p = str(tmp_path / "disk.img")
    fs.create_sparse(p, 8 * MiB)
    os.link(p, str(tmp_path / "hard"))
    assert fs.open_elsewhere(p) is False
    assert fs.open_elsewhere(p) is False
    for mode, target in (("rb", p), ("r+b", p), ("rb", str(tmp_path / "hard"))):
        child = subprocess.Popen([sys.executable, "-c", f"f = open({target!r}, {mode!r}); input()"],
                                 stdin=subprocess.PIPE)
        try:
            while not any(_fd_target(child.pid, fd) in (p, str(tmp_path / "hard"))
                          for fd in os.listdir(f"/proc/{child.pid}/fd")):
                assert child.poll() is None
                time.sleep(0.01)
            assert fs.open_elsewhere(p) is True, (mode, target)
        finally:
            child.communicate(b"\n", timeout=30)
        assert fs.open_elsewhere(p) is False
    code = f"import mmap, os; fd = os.open({p!r}, os.O_RDWR); m = mmap.mmap(fd, 4096); os.close(fd); print(1, flush=True); input()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"1"
        assert fs.open_elsewhere(p) is True  # the mapping holds the file, no fd does
    finally:
        child.communicate(b"\n", timeout=30)
    assert fs.open_elsewhere(p) is False
    lp = loop.attach(p, label="cowdisk-test-lease")
    try:
        assert fs.open_elsewhere(p) is True
    finally:
        lp.close()
        loop.detach(lp.number, missing_ok=True)
    end = time.monotonic() + 10  # the loop lets go of its backing file as it clears
    while fs.open_elsewhere(p) is not False:
        assert time.monotonic() < end, "the detached loop still holds the file"
        time.sleep(0.05)
    assert fs.open_elsewhere(str(tmp_path / "missing")) is None
