"""Give a fork's child an identity of its own, on its disk, without mounting it.

N children of one VM share its machine id, SSH host keys and hostname ("Restoring
Uniqueness in MicroVM Snapshots", arXiv 2102.12892). For a child that boots from its disk
(not one resumed from the parent's memory, whose guest keeps the old identity in memory
and must not have its filesystem changed under its page cache), ``fork(reset_identity=)``
resets them on the child's ext2/3/4 filesystem in the fork's own ``identity`` step, before
the child's link exists (nobody has it open):

* ``/etc/machine-id``: a new random id (32 hex digits, mode 0444);
* ``/etc/ssh/ssh_host_*``: removed (sshd's start regenerates them: ``ssh-keygen -A``);
* ``/etc/hostname``: the child's id, after an optional prefix (mode 0644).

All through ``debugfs -w`` (no mount, no kernel filesystem driver). A filesystem whose
journal still holds transactions (the source was attached to a running guest) has its
journal replayed first (``e2fsck -E journal_only``): a change written beside an unreplayed
journal would be overwritten by the replay at the child's first mount.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import tempfile

from ..errors import KernelError, Unsupported
from .growfs import is_ext, run_tool

log = logging.getLogger(__name__)

OP = "reset identity"
FEATURE_INCOMPAT = 1024 + 0x60
INCOMPAT_RECOVER = 0x0004
"""The superblock's "journal needs recovery" flag (ext3/4)."""


def needs_recovery(path: str) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return bool(int.from_bytes(os.pread(fd, 4, FEATURE_INCOMPAT), "little") & INCOMPAT_RECOVER)
    finally:
        os.close(fd)


def _debugfs(path: str, vid: str, cmds: list[str], *, write: bool) -> str:
    """Run debugfs commands on ``path``; any error line it prints is a KernelError (debugfs
    itself exits 0 after a failed command)."""
    with tempfile.NamedTemporaryFile("w", prefix="cowdisk-debugfs-", suffix=".cmds") as f:
        f.write("\n".join(cmds) + "\n")
        f.flush()
        r = run_tool(["debugfs", *(["-w"] if write else []), "-f", f.name, path], OP)
    errs = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("debugfs ")]
    if r.returncode != 0 or errs:
        raise KernelError(OP, vid, errno.EIO, detail=f"debugfs on {path}: {'; '.join(errs) or r.returncode}")
    return r.stdout


def _names(path: str, vid: str, d: str) -> set[str]:
    """Entry names in directory ``d`` of the filesystem ("" when it is not there)."""
    out = _debugfs(path, vid, [f"ls -p {d}"], write=False) if _exists(path, vid, d) else ""
    return {ln.split("/")[5] for ln in out.splitlines() if ln.startswith("/") and len(ln.split("/")) > 6}


def _exists(path: str, vid: str, p: str) -> bool:
    r = run_tool(["debugfs", "-R", f"stat {p}", path], OP)
    return r.returncode == 0 and "not found" not in r.stderr


def _put(cmds: list[str], tmp: str, name: str, data: str, dest: str, mode: int, present: bool) -> None:
    src = os.path.join(tmp, name)
    with open(src, "w") as f:
        f.write(data)
    if present:
        cmds.append(f"rm {dest}")
    cmds += [f"write {src} {dest}", f"sif {dest} mode 0{0o100000 | mode:o}", f"sif {dest} uid 0",
             f"sif {dest} gid 0"]


def reset(path: str, vid: str, hostname: str) -> dict[str, object]:
    """Reset the identity on ``path`` (volume ``vid``'s device or file, nobody has it open);
    returns what changed: the new machine id, the host keys removed, the hostname."""
    if not is_ext(path):
        raise Unsupported(f"reset identity of volume {vid}: {path} holds no ext2/3/4 filesystem", op=OP, obj=vid,
                          hint="fork without --reset-identity, or reset it in the guest")
    if needs_recovery(path):
        r = run_tool(["e2fsck", "-E", "journal_only", "-p", path], OP)
        if r.returncode not in (0, 1):
            raise KernelError(OP, vid, errno.EIO, detail=f"journal replay (e2fsck -E journal_only {path}, exit "
                                                         f"{r.returncode}): {(r.stderr or r.stdout).strip()}")
    etc = _names(path, vid, "/etc")
    if not etc and not _exists(path, vid, "/etc"):
        raise Unsupported(f"reset identity of volume {vid}: its filesystem has no /etc", op=OP, obj=vid)
    keys = sorted(n for n in _names(path, vid, "/etc/ssh") if n.startswith("ssh_host_")) if "ssh" in etc else []
    machine_id = secrets.token_hex(16)
    cmds = [f"rm /etc/ssh/{k}" for k in keys]
    with tempfile.TemporaryDirectory(prefix="cowdisk-identity-") as tmp:
        _put(cmds, tmp, "machine-id", machine_id + "\n", "/etc/machine-id", 0o444, "machine-id" in etc)
        _put(cmds, tmp, "hostname", hostname + "\n", "/etc/hostname", 0o644, "hostname" in etc)
        _debugfs(path, vid, cmds, write=True)
    log.info("volume %s: identity reset (machine id %s, %d host keys removed, hostname %s)", vid, machine_id,
             len(keys), hostname)
    return {"machine_id": machine_id, "host_keys_removed": keys, "hostname": hostname}
