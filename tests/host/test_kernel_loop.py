"""cowdisk.kernel.loop against this host's kernel, with `losetup` as the outside witness."""

from __future__ import annotations

import errno
import multiprocessing
import os
import subprocess
import time

import pytest

from cowdisk.errors import KernelError
from cowdisk.kernel import blk, fs, loop
from testutil import assert_same_host, host_state

pytestmark = pytest.mark.root


@pytest.fixture
def img(tmp_path) -> str:
    p = str(tmp_path / "backing.img")
    fs.create_sparse(p, 64 << 20)
    return p


@pytest.fixture(autouse=True)
def no_leaks():
    before = host_state()
    yield
    assert_same_host(before)


def losetup_list() -> dict[str, dict[str, str]]:
    out = subprocess.run(["losetup", "--list", "--noheadings", "--raw", "-O", "NAME,RO,AUTOCLEAR,BACK-FILE"],
                         capture_output=True, text=True, check=True).stdout
    rows = {}
    for line in out.splitlines():
        name, ro, ac, back = line.split(" ", 3)
        rows[name] = {"ro": ro, "autoclear": ac, "back": back}
    return rows


def test_attach_read_only_autoclear_witnessed(img: str) -> None:
    lp = loop.attach(img, read_only=True, autoclear=True, label="cowdisk:test:ro")
    try:
        w = losetup_list()[lp.path]
        assert w == {"ro": "1", "autoclear": "1", "back": img}
        st = loop.get_status(lp.fd)
        assert st.read_only and st.autoclear and st.label == "cowdisk:test:ro"
        s = os.stat(img)
        assert (st.backing_dev, st.backing_inode) == (s.st_dev, s.st_ino)
        assert blk.size_bytes(lp.path) == 64 << 20
        assert blk.devno_str(lp.path) == lp.devno
        with pytest.raises(OSError) as e:
            fd = os.open(lp.path, os.O_WRONLY)
            try:
                os.write(fd, b"x" * 512)
            finally:
                os.close(fd)
        assert e.value.errno == errno.EPERM
        assert [li.number for li in loop.find_by_backing(img)] == [lp.number]
    finally:
        lp.close()
    # autoclear: our close was the last: the kernel detached it
    assert lp.path not in losetup_list()
    assert loop.find_by_backing(img) == []


def test_rw_attach_write_through_and_explicit_detach(img: str) -> None:
    lp = loop.attach(img, autoclear=False, label="cowdisk:test:rw")
    try:
        assert losetup_list()[lp.path]["ro"] == "0"
        fd = os.open(lp.path, os.O_WRONLY)
        os.pwrite(fd, b"hello", 4096)
        os.fsync(fd)
        os.close(fd)
    finally:
        lp.detach()
    time.sleep(0.01)
    assert lp.path not in losetup_list()
    with open(img, "rb") as f:
        f.seek(4096)
        assert f.read(5) == b"hello"


def test_lists_and_detaches_a_loop_losetup_made(img: str) -> None:
    dev = subprocess.run(["losetup", "-f", "--show", img], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        n = loop.number_from_path(dev)
        infos = {li.number: li for li in loop.list_loops()}
        assert infos[n].backing_file == img and not infos[n].read_only
        assert loop.info(n) == infos[n]
        loop.detach(n)
        time.sleep(0.01)
        assert dev not in losetup_list()
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def test_detach_missing(img: str) -> None:
    lp = loop.attach(img)
    n = lp.number
    lp.close()
    with pytest.raises(KernelError) as e:
        loop.detach(n)
    assert e.value.errno == errno.ENXIO and f"/dev/loop{n}" in str(e.value)
    loop.detach(n, missing_ok=True)


def test_bad_backing_file(tmp_path) -> None:
    missing = str(tmp_path / "nope.img")
    with pytest.raises(KernelError) as e:
        loop.attach(missing)
    assert e.value.errno == errno.ENOENT and missing in str(e.value) and "loop attach" in str(e.value)
    with pytest.raises(KernelError) as e:
        loop.attach(str(tmp_path))  # a directory
    assert "loop attach" in str(e.value)


def _racer(img: str, q: "multiprocessing.Queue[object]") -> None:
    try:
        lp = loop.attach(img, label="cowdisk:test:race")
        q.put(lp.number)
        time.sleep(0.5)  # hold it while the others attach
        lp.close()
    except Exception as e:  # report, the parent asserts
        q.put(repr(e))


def test_get_free_race_all_succeed(tmp_path) -> None:
    """Several processes attach at once: LOOP_CTL_GET_FREE hands them the same index and
    the losers get EBUSY from LOOP_CONFIGURE; attach retries, so every one gets its own loop."""
    imgs = []
    for i in range(6):
        p = str(tmp_path / f"r{i}.img")
        fs.create_sparse(p, 1 << 20)
        imgs.append(p)
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(p, q)) for p in imgs]
    for p in procs:
        p.start()
    got = [q.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(30)
    assert all(isinstance(x, int) for x in got), got
    assert len(set(got)) == len(got), f"two processes got one loop: {got}"


def test_ebusy_on_a_taken_number(img: str, tmp_path) -> None:
    """LOOP_CONFIGURE on a bound loop is EBUSY: the kernel's side of the race."""
    other = str(tmp_path / "other.img")
    fs.create_sparse(other, 1 << 20)
    lp = loop.attach(img)
    try:
        import fcntl

        bfd = os.open(other, os.O_RDWR)
        try:
            cfg = loop.loop_config.pack(bfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, b"", b"", b"", 0, 0, *([0] * 8))
            with pytest.raises(OSError) as e:
                fcntl.ioctl(lp.fd, loop.LOOP_CONFIGURE, cfg)
            assert e.value.errno == errno.EBUSY
        finally:
            os.close(bfd)
    finally:
        lp.close()
