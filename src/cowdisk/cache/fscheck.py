"""Where a cache may live: one mount for staging and publishing, reflinks for clones."""

from __future__ import annotations

import errno
import os

from ..errors import KernelError, Unsupported
from ..kernel import fs as kfs
from ..kernel.mount import mount_id


def check_same_filesystem(staging_parent: str | os.PathLike[str], cache_dir: str | os.PathLike[str]) -> None:
    """Refuse (KernelError EXDEV) when ``staging_parent`` and ``cache_dir`` are on different
    filesystems or mounts: publishing is one rename(2), which is atomic only within one
    mount and fails with EXDEV across them."""
    a, b = os.fspath(staging_parent), os.fspath(cache_dir)
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError as e:
        raise KernelError.from_oserror("stat for same-filesystem check", e.filename or f"{a} {b}", e) from None
    why = ""
    if sa.st_dev != sb.st_dev:
        why = (f"staging {a} is on device {os.major(sa.st_dev)}:{os.minor(sa.st_dev)} "
               f"({kfs.statfs(a).name}), cache {b} on {os.major(sb.st_dev)}:{os.minor(sb.st_dev)} "
               f"({kfs.statfs(b).name})")
    else:
        ma, mb = mount_id(a), mount_id(b)
        if ma is not None and mb is not None and ma != mb:
            why = f"staging {a} is on mount {ma}, cache {b} on mount {mb} (one filesystem, two mounts)"
    if why:
        raise KernelError("publish cache entry", b, errno.EXDEV, detail=why,
                          hint="a rename across filesystems or mounts is not atomic (the kernel refuses it "
                               "with EXDEV); stage inside the cache directory")


def check_reflink(path: str | os.PathLike[str], *, probe: bool = True) -> kfs.StatFs:
    """Return the statfs of ``path`` (or its nearest existing ancestor) when reflinks work
    there; raise Unsupported saying which path was probed, which filesystem it is and what
    to do otherwise. The facts come from :func:`cowdisk.kernel.fs.reflink_support` (statfs
    f_type, then a FICLONE probe inside ``path`` when it is an existing directory and
    ``probe`` is true; nothing is written into ancestors of a path that does not exist yet).
    """
    r = kfs.reflink_support(path, probe=probe)
    if r.ok:
        return r.fs
    p, st = r.path, r.fs
    where = p if r.probed == p else f"{p} (does not exist yet; probed its nearest existing ancestor {r.probed})"
    what = "put the store (and its cache) on btrfs, or on xfs made with reflink=1 (the mkfs.xfs default), " \
           "or use the embedded pool or the copy backend"
    if r.probe_ran:
        raise Unsupported(
            f"reflink not supported at {where}: it is {st.name} (statfs f_type 0x{st.f_type:x}) "
            f"and a FICLONE probe there failed"
            + (" (an xfs made with reflink=0?)" if st.f_type == kfs.XFS_MAGIC else ""),
            op="check reflink", obj=p, hint=what)
    raise Unsupported(f"reflink not supported at {where}: it is {st.name} (statfs f_type 0x{st.f_type:x}), "
                      "not btrfs or xfs", op="check reflink", obj=p, hint=what)
