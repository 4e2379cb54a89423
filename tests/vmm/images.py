"""Container images the tests build themselves, with umoci (no registry, no network).

``make_image(layout, tag, layers)`` makes an OCI image layout at ``layout`` whose image
``tag`` has one layer per callable in ``layers``: each gets the bundle's rootfs directory
(holding everything the layers before it left there) and changes it; ``umoci repack``
then records the difference as a layer, deletions as whiteouts (``.wh.NAME``).
``oci_archive`` and ``docker_archive`` turn a layout into the two archive forms.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import Callable, Sequence

Layer = Callable[[str], None]


def _run(*cmd: str) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    return p.stdout


def make_image(layout: str, tag: str, layers: Sequence[Layer]) -> str:
    """Build image ``tag`` in the OCI layout ``layout`` (created if missing); returns ``layout:tag``."""
    if not os.path.exists(os.path.join(layout, "oci-layout")):
        _run("umoci", "init", "--layout", layout)
    _run("umoci", "new", "--image", f"{layout}:{tag}")
    work = tempfile.mkdtemp(prefix="cowdisk-img-")
    try:
        bundle = os.path.join(work, "bundle")
        _run("umoci", "unpack", "--image", f"{layout}:{tag}", bundle)
        for layer in layers:
            layer(os.path.join(bundle, "rootfs"))
            _run("umoci", "repack", "--image", f"{layout}:{tag}", bundle)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _run("umoci", "gc", "--layout", layout)
    return f"{layout}:{tag}"


def copy_tree(src: str) -> Layer:
    """A layer that adds the tree ``src`` (owners, modes, xattrs, hard links kept)."""
    def layer(rootfs: str) -> None:
        _run("cp", "-a", "--", f"{src}/.", rootfs)
    return layer


def oci_archive(layout: str, out: str) -> str:
    """The layout as an OCI archive (a plain tar of the layout directory)."""
    _run("tar", "-C", layout, "-cf", out, ".")
    return out


def docker_archive(layout: str, tag: str, out: str, name: str = "cowdisk-test/img") -> str:
    """Image ``tag`` of ``layout`` as a ``docker save`` archive (skopeo writes docker's format)."""
    _run("skopeo", "--insecure-policy", "copy", "--quiet", f"oci:{layout}:{tag}", f"docker-archive:{out}:{name}:{tag}")
    return out


def debugfs(image: str, request: str) -> str:
    """``debugfs -R REQUEST IMAGE`` (read-only): an outside witness of an ext4 image's files."""
    return _run("debugfs", "-R", request, image)
