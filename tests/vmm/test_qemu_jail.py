"""Issue 7 item 3: a VMM confined to a jail boots from what ``cowdisk volume jail`` put there.

The jail is built the way Firecracker's jailer builds one: a directory that becomes
the VMM's root, holding only what it needs (here: the kernel and initrd under /boot,
a mount point for /usr and the QMP socket, and the disk ``/rootfs`` that
``cowdisk volume jail`` staged). QEMU then runs

    setpriv --pdeathsig KILL -- unshare --mount --propagation private -- sh -ec '
        mount --bind /usr JAIL/usr; mount -o remount,bind,ro JAIL/usr   # the binary and its libs
        mount --bind SOCKDIR JAIL/run/qmp                                # QMP socket for the test
        exec chroot --userspec=UID:GID JAIL qemu-system-x86_64 ... -drive file=/rootfs,...'

so the bind mounts live only in QEMU's private mount namespace (they go away with
it: nothing to clean on the host), QEMU's root is the jail, it runs as an
unprivileged uid, and the only disk path it is given is ``/rootfs`` inside the jail.
``exec`` all the way down: the PID we started is QEMU's, and we end it by that PID.

Which staging the test covers depends on the store's backend: block backends
(dm-snapshot, in the kernel lab) get a device node with the device's major:minor;
file backends (reflink, pool, copy: this host picks pool) get a hard link, so the
jail has to be on the volume's filesystem (for the pool: inside the pool mount).

Staging without a VMM (stale entries replaced, another filesystem refused) is in
tests/suites/jail.py, run on every backend by tests/host/test_jail.py and
tests/lab/test_jail_dm.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from testutil import assert_same_host, host_state
from vmm import guest as guestlib
from vmm.qemu import Vm

store_mod = pytest.importorskip("cowdisk.store")

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot, mount namespace, volumes)"),
]

SRC = str(Path(__file__).resolve().parents[2] / "src")
JAIL_UID = JAIL_GID = 64123  # an unprivileged id with no account: the jailed VMM's
BACKEND = os.environ.get("COWDISK_TEST_BACKEND", "auto")

JAIL_SCRIPT = r"""J=$1; S=$2; U=$3; shift 3
mount --bind /usr "$J/usr"
mount -o remount,bind,ro "$J/usr"
mount --bind "$S" "$J/run/qmp"
exec chroot --userspec="$U" "$J" "$@"
"""


def cowdisk_cli(root: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("COWDISK_ROOT", None)
    return subprocess.run([sys.executable, "-m", "cowdisk", "--root", root, *args], capture_output=True,
                          text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)


class JailedVm(Vm):
    """A Vm whose QEMU runs chrooted into ``jail`` as ``uid:gid`` (see the module doc)."""

    QMP_IN_JAIL = "/run/qmp/qmp.sock"

    def __init__(self, guest, jail: Path, workdir: Path, *, drive: str = "/rootfs",
                 uid: int = JAIL_UID, gid: int = JAIL_GID, **kw):
        inner = dataclasses.replace(guest, kernel="/boot/vmlinuz", initrd="/boot/initrd")
        # cache=none: the base class would probe O_DIRECT on the host path, which this is not
        super().__init__(inner, drive, workdir, cache="none", **kw)
        self.jail = Path(jail)
        self.uid, self.gid = uid, gid

    def argv(self, incoming_fd: int | None = None) -> list[str]:
        argv = super().argv(incoming_fd)
        host_qmp = f"unix:{os.path.join(self._sockdir, 'qmp.sock')},server=on,wait=off"
        argv[argv.index(host_qmp)] = f"unix:{self.QMP_IN_JAIL},server=on,wait=off"
        os.chown(self._sockdir, self.uid, self.gid)  # the jailed QEMU makes its socket there
        return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-ec", JAIL_SCRIPT,
                "jail", str(self.jail), self._sockdir, f"{self.uid}:{self.gid}", *argv]


def make_jail(jail: Path, guest) -> None:
    """What a jailer prepares: the chroot skeleton with the kernel and initrd (no disk yet)."""
    for d in ("usr", "boot", "run/qmp", "tmp"):
        (jail / d).mkdir(parents=True)
    for name in ("bin", "sbin", "lib", "lib64"):
        if os.path.islink(f"/{name}"):  # merged /usr: /lib -> usr/lib
            os.symlink(os.readlink(f"/{name}"), jail / name)
    for src, dst in ((guest.kernel, "boot/vmlinuz"), (guest.initrd, "boot/initrd")):
        shutil.copyfile(src, jail / dst)
        os.chmod(jail / dst, 0o644)


@pytest.fixture(scope="module")
def guest():
    for tool in ("qemu-system-x86_64", "mkfs.ext4", "debugfs", "unshare", "chroot", "mount"):
        assert shutil.which(tool), f"{tool} missing: run install.sh"
    return guestlib.build()


@pytest.fixture
def store(tmp_path):
    before = host_state()
    s = store_mod.Store(str(tmp_path / "store"), backend=BACKEND)
    try:
        yield s
    finally:
        try:
            s.destroy()
        finally:
            s.close()
        # no loop, dm device or mount left (the jailed QEMU's bind mounts lived and died in
        # its own mount namespace; its copy of the pool mount went with it)
        assert_same_host(before)


def jail_parent(store, tmp_path: Path) -> Path:
    """Where jails go: the volume's filesystem for file backends (hard links), else tmp_path."""
    if store.backend.block_device:
        return tmp_path  # a device node: any filesystem mounted without nodev
    return Path(store.data_root)


@pytest.fixture
def jails(store, tmp_path):
    made: list[Path] = []

    def new(name: str) -> Path:
        j = jail_parent(store, tmp_path) / f"jail-{name}"
        j.mkdir()
        made.append(j)
        return j

    try:
        yield new
    finally:
        for j in made:
            shutil.rmtree(j, ignore_errors=True)


def test_jailed_qemu_boots_from_the_staged_disk(guest, store, jails, tmp_path, record_property):
    tpl = store.build_template(guest.rootfs_dir, "vmm-guest")
    v = store.create_volume("jvm", tpl.id)
    jail = jails("jvm")
    make_jail(jail, guest)

    p = cowdisk_cli(store.root, "volume", "jail", "jvm", str(jail), "--uid", str(JAIL_UID),
                    "--gid", str(JAIL_GID), "--json")
    assert p.returncode == 0, p.stderr
    staged = Path(json.loads(p.stdout)["path"])
    assert staged == jail / "rootfs"
    st = os.lstat(staged)
    assert (st.st_uid, st.st_gid) == (JAIL_UID, JAIL_GID)
    if store.backend.block_device:
        assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.stat(v.device).st_rdev
    else:
        assert stat.S_ISREG(st.st_mode)
        vst = os.stat(v.device)
        assert (st.st_dev, st.st_ino) == (vst.st_dev, vst.st_ino)  # a hard link: the volume's own file
        assert st.st_nlink == 2
    record_property("staging", "device node" if store.backend.block_device else "hard link")

    with JailedVm(guest, jail, tmp_path, name="J") as vm:
        bootid = vm.wait_ready(timeout=120)
        pid = vm.proc.pid
        # confined: its root is the jail, it is not root, and its disk is the staged file
        assert os.readlink(f"/proc/{pid}/root") == str(jail)
        with open(f"/proc/{pid}/status") as f:
            uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
        assert set(uids) == {str(JAIL_UID)}
        assert "file=/rootfs," in " ".join(vm.argv())
        assert vm.command("cat", "a") == bootid
        vm.command("write", "jailed", "written-in-the-jail")
        assert vm.poweroff() == 0
    record_property("jailed_boot_s", round(vm.times["boot"], 2))

    # from the host, without QEMU: the write is in the volume
    vol = store.volume("jvm")
    assert guestlib.read_file(vol.device, "/data/jailed") == b"written-in-the-jail\n"
    assert guestlib.read_file(vol.link, "/data/a") == f"{bootid}\n".encode()

    os.unlink(staged)  # the jailer's teardown; then the volume goes as usual
    store.remove_volume("jvm")
    assert not os.path.lexists(vol.link) and not os.path.exists(vol.data_path)
