"""librados and librbd: the Python bindings loaded (Debian's, when not importable as is),
their errors named, a cluster connected from a fresh thread."""

from __future__ import annotations

import contextlib
import errno
import importlib.machinery
import importlib.util
import os
import sys
import sysconfig
from typing import Any, Iterator

from ...errors import CowdiskError, KernelError, Unsupported

DEBIAN_DIST = "/usr/lib/python3/dist-packages"


def librbd() -> tuple[Any, Any]:
    """The ``rados`` and ``rbd`` modules.

    Ceph ships its Python bindings only as Debian's python3-rados and python3-rbd
    (extension modules built for Debian's python3). When they are not importable as is
    (another interpreter of the same version, a virtualenv), exactly these two files are
    loaded from Debian's dist-packages; nothing else of that directory is put on
    ``sys.path``."""
    try:
        import rados
        import rbd

        return rados, rbd
    except ImportError:
        pass
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    mods = []
    for name in ("rados", "rbd"):
        if name in sys.modules:
            mods.append(sys.modules[name])
            continue
        path = os.path.join(DEBIAN_DIST, name + suffix)
        if not os.path.exists(path):
            raise Unsupported(f"rbd backend: the {name} module is not importable and {path} does not exist",
                              op="load librbd", obj=name,
                              hint="install python3-rados and python3-rbd (./install.sh) for this Python "
                                   f"{sys.version_info.major}.{sys.version_info.minor}")
        loader = importlib.machinery.ExtensionFileLoader(name, path)
        spec = importlib.util.spec_from_file_location(name, path, loader=loader)
        assert spec is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            loader.exec_module(mod)
        except ImportError as e:
            del sys.modules[name]
            raise Unsupported(f"rbd backend: cannot load {path}: {e}", op="load librbd", obj=name) from None
        mods.append(mod)
    return mods[0], mods[1]


@contextlib.contextmanager
def named(op: str, obj: str) -> Iterator[None]:
    """librados/librbd errors as KernelError(op, obj, errno)."""
    rados, rbd = librbd()
    try:
        yield
    except CowdiskError:
        raise
    except (rados.Error, rbd.Error) as e:
        err = getattr(e, "errno", None) or errno.EIO
        raise KernelError(op, obj, abs(err), detail=str(e)) from None


def _connect(rados: Any, conf: str, client: str) -> Any:
    c = rados.Rados(conffile=conf, rados_id=client,
                    conf={"rados_mon_op_timeout": "30", "rados_osd_op_timeout": "30",
                          "client_mount_timeout": "20", "rbd_default_clone_format": "1"})
    c.connect(timeout=20)
    return c


def _in_fresh_thread(fn: Any) -> Any:
    """Run ``fn`` in a new thread. librados draws a client's address nonce from a
    thread-local random engine; the main thread of forked processes inherits one state,
    so every forked child would connect as the same client address and the cluster
    would cut their sessions (ops time out). A new thread seeds its own."""
    import threading

    out: list[Any] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            err.append(e)

    t = threading.Thread(target=run, name="cowdisk-rados-connect")
    t.start()
    t.join()
    if err:
        raise err[0]
    return out[0]
