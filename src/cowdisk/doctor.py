"""What this host can do for cowdisk: kernel features, tools, and the backend ``auto`` picks.

:func:`check` returns plain data (a :class:`Report`); the command line renders it
(``cowdisk doctor``) and a library can call it too. It only reads: it opens
``/dev/mapper/control`` for two ioctls, runs ``statfs`` and, when the store root
already exists, tries one ``FICLONE`` between two probe files it removes again. It
never creates a store, a loop device or a mount.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import asdict, dataclass, field
from typing import Any

from .backends import Space
from .errors import CowdiskError, message_of
from .kernel import dm, fs

__all__ = ["Check", "Report", "check", "space_checks", "message_of", "DM_TARGETS", "TOOLS"]

DM_TARGETS = ("snapshot", "snapshot-origin", "thin-pool", "thin", "linear")
"""The device-mapper targets cowdisk uses or may use, in the order doctor lists them."""

TOOLS = ("mkfs.ext4", "mkfs.xfs", "e2fsck", "debugfs", "xfs_growfs")
"""Programs cowdisk runs: mkfs.ext4 builds templates, mkfs.xfs/xfs_growfs make the pool,
e2fsck and debugfs check and read ext4 images (tests, demo)."""


@dataclass(frozen=True)
class Check:
    """One line of the report. ``ok`` is None for facts that are neither good nor bad."""

    name: str
    ok: bool | None
    detail: str
    hint: str = ""


@dataclass
class Report:
    root: str
    checks: list[Check] = field(default_factory=list)
    dm_version: str | None = None
    dm_targets: dict[str, str | None] = field(default_factory=dict)
    """Target name -> "x.y.z", or None when the kernel lacks it (or has no device-mapper)."""
    tools: dict[str, str | None] = field(default_factory=dict)
    """Program -> its path, or None when it is not on PATH."""
    backend: str = "copy"
    """What ``--backend auto`` would pick for a new store at ``root``."""
    why: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["checks"] = [asdict(c) for c in self.checks]
        return d


SPACE_WARN_PCT = 90.0


def space_checks(spaces: "list[Space]", warn_pct: float = SPACE_WARN_PCT) -> list[Check]:
    """A store's areas (``Store.space()``) as checks: not ok past ``warn_pct`` full or when
    the kernel says the area is not healthy (a thin pool out of space, read-only, flagged
    needs_check)."""
    out = []
    for s in spaces:
        full = s.total_bytes > 0 and s.pct >= warn_pct
        ok = s.state == "ok" and not full
        detail = (f"{s.pct:.1f}% full ({s.used_bytes} of {s.total_bytes} bytes)"
                  + (f", {s.state}" if s.state != "ok" else "") + (f"; {s.detail}" if s.detail else ""))
        hint = "" if ok else ("see docs/dm-thin.md, 'When the pool fills or fails'" if "thin" in s.area
                              else "free space or grow the filesystem")
        out.append(Check(f"space: {s.area}", ok, detail, hint))
    return out


def _v(t: tuple[int, int, int]) -> str:
    return ".".join(map(str, t))


def check(root: str) -> Report:
    """Probe this host for ``root`` (a store root, which need not exist yet)."""
    root = os.path.abspath(root)
    rep = Report(root=root)
    add = rep.checks.append

    add(Check("root privileges", os.geteuid() == 0, f"euid {os.geteuid()}",
              "" if os.geteuid() == 0 else "loop devices, device-mapper and mounts need root"))

    try:
        st = os.stat("/dev/loop-control")
        ok = stat.S_ISCHR(st.st_mode)
        add(Check("loop", ok, "/dev/loop-control" + ("" if ok else " is not a character device")))
    except OSError as e:
        add(Check("loop", False, f"/dev/loop-control: {e.strerror}", "modprobe loop"))

    try:
        ctl = dm.control()
        rep.dm_version = _v(ctl.version())
        add(Check("device-mapper", True, f"ioctl interface {rep.dm_version}"))
        try:
            versions = ctl.list_target_versions()
        except CowdiskError as e:
            versions = {}
            add(Check("dm targets", False, message_of(e), e.hint))
        for name in DM_TARGETS:
            rep.dm_targets[name] = _v(versions[name]) if name in versions else None
        # targets are often modules, loaded on first use: a missing one may still load
        missing = [n for n in ("snapshot", "thin-pool") if rep.dm_targets[n] is None]
        for n in missing:
            try:
                rep.dm_targets[n] = _v(ctl.get_target_version(n))
            except CowdiskError:
                pass
        for n in ("snapshot", "thin-pool"):
            v = rep.dm_targets[n]
            add(Check(f"dm target {n}", v is not None, v or "absent",
                      "" if v else f"modprobe dm-{'snapshot' if n == 'snapshot' else 'thin-pool'}"))
    except (CowdiskError, OSError) as e:
        for name in DM_TARGETS:
            rep.dm_targets[name] = None
        add(Check("device-mapper", False, message_of(e), getattr(e, "hint", "") or "modprobe dm-mod"))

    try:
        rs = fs.reflink_support(root, probe=False)  # doctor only reads: no probe file
        add(Check("reflink", rs.ok, rs.reason,
                  "" if rs.ok else "put the store on xfs (reflink=1) or btrfs for the reflink backend"))
    except CowdiskError as e:
        add(Check("reflink", False, message_of(e), e.hint))

    for tool in TOOLS:
        path = shutil.which(tool)
        rep.tools[tool] = path
        pkg = "xfsprogs" if tool.startswith("mkfs.xfs") or tool.startswith("xfs_") else "e2fsprogs"
        add(Check(tool, path is not None, path or "not found", "" if path else f"install {pkg}"))

    try:
        with open("/proc/filesystems") as f:
            kfs = {line.split()[-1] for line in f if line.strip()}
    except OSError:
        kfs = set()
    add(Check("xfs in kernel", "xfs" in kfs, "listed in /proc/filesystems" if "xfs" in kfs
              else "not listed in /proc/filesystems (it may load as a module on mount)"))

    thin = rep.dm_targets.get("thin-pool") is not None
    tools = [t for t in ("thin_check", "thin_repair", "thin_ls") if shutil.which(t) is None]
    add(Check("dm-thin", thin and not tools,
              ("thin-pool target and thin-provisioning-tools present: dm-thin volumes (one pool per store)"
               if thin and not tools else
               f"thin-pool target {'present' if thin else 'absent'}"
               + (f"; missing {', '.join(tools)} (metadata check/repair after a crash, usage)" if tools else "")),
              "" if thin and not tools else
              ("install thin-provisioning-tools" if thin else "modprobe dm-thin-pool")))

    from .store import explain_backend

    rep.backend, rep.why = explain_backend(root)
    add(Check("auto backend", None, f"{rep.backend} ({rep.why[-1]})" if rep.why else rep.backend))
    rep.checks += mode_checks(root)
    return rep


def mode_checks(root: str) -> list[Check]:
    """The store's files and directories private (``store/modes.py``): any one whose mode
    grants its group or others more than its rule is named (a store that exists only)."""
    from .store import modes

    if not os.path.isfile(os.path.join(root, "store.json")):
        return []
    try:
        wide = modes.wide(root)
    except OSError as e:
        return [Check("store file modes", False, f"walk {root}: {e.strerror}")]
    if not wide:
        return [Check("store file modes", True, "every store file and directory is private to root")]
    shown = "; ".join(str(w) for w in wide[:10]) + (f"; and {len(wide) - 10} more" if len(wide) > 10 else "")
    return [Check("store file modes", False, f"{len(wide)} wider than allowed: {shown}",
                  "chmod go-rwx them (a store is narrowed by itself once, when first opened by a "
                  "cowdisk with these rules)")]
