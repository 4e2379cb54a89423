"""Container images as template sources: an OCI image layout directory, an OCI archive
(a tar of a layout) or a ``docker save`` archive.

Two tools made for this do the work, and nothing here re-implements them:

* ``skopeo copy`` brings any of the three into a private OCI layout (it reads every
  transport, verifies each blob's digest, and converts docker's format to OCI's);
* ``umoci unpack`` applies the layers in order to a root filesystem the way the OCI
  image spec says: whiteouts and opaque directories remove what lower layers had, and
  ownership, modes, xattrs, hard links and device nodes are kept (as root).

What this module reads itself is only the image's identity, cheaply, without unpacking:
the **manifest digest** of the chosen image (``index.json`` of a layout or an OCI
archive), or for a docker archive, which has no manifest digest, the **image id** (the
digest of its config, which names every layer's diff_id). The template cache keys an
image recipe on it, so the same image is built once.

References (``REF``)::

    oci:DIR[:TAG]  oci-archive:FILE[:TAG]  docker-archive:FILE[:NAME:TAG]
    DIR[:TAG] or FILE[:TAG]      the transport found from the content: a directory with
                                 ``oci-layout``; a tar holding ``oci-layout`` (OCI archive)
                                 or ``manifest.json`` (docker save)

A layout or archive holding one image needs no tag; with several, TAG picks by
``org.opencontainers.image.ref.name`` (OCI) or ``RepoTags`` (docker).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Any

from ..contract import IMAGE_TRANSPORTS
from ..errors import CowdiskError, InvalidArgument, KernelError, NotFound, Unsupported
from ..progress import Progress, stage
from ..kernel.creds import Identity, fs_identity
from .mkfs import c_env, proc_fds, run

TRANSPORTS = IMAGE_TRANSPORTS
REF_NAME = "org.opencontainers.image.ref.name"
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
STAGING_TAG = "cowdisk"


@dataclass(frozen=True)
class ImageSource:
    """Where an image is: ``transport`` (one of :data:`TRANSPORTS`), ``path`` (absolute)
    and an optional ``tag``."""

    transport: str
    path: str
    tag: str | None = None

    def __str__(self) -> str:
        return f"{self.transport}:{self.path}" + (f":{self.tag}" if self.tag else "")

    def skopeo_ref(self) -> str:
        """The reference skopeo reads; a docker archive's image by its index (``@N``)."""
        if self.transport == "docker-archive" and self.tag:
            doc = json.loads(_tar_members(self.path, ("manifest.json",)).get("manifest.json", b"[]"))
            return f"docker-archive:{self.path}:@{_docker_index(doc, self)}"
        return str(self)


def _tool(name: str, package: str) -> str:
    path = shutil.which(name, path=c_env()["PATH"])
    if not path:
        raise Unsupported(f"{name} not found on PATH: it is needed to build templates from container images",
                          op="build template from image", obj=name, hint=f"install {package} (install.sh does)")
    return path


def _tar_members(path: str, names: tuple[str, ...]) -> dict[str, bytes]:
    """The contents of the members ``names`` of the (uncompressed) tar ``path``; only
    the headers of the other members are read."""
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                n = m.name.removeprefix("./")
                if n in names and m.isfile():
                    f = tf.extractfile(m)
                    if f is not None:
                        out[n] = f.read()
    except (tarfile.TarError, OSError) as e:
        if isinstance(e, OSError) and e.errno:
            raise KernelError.from_oserror("read image archive", path, e) from None
        raise InvalidArgument(f"read image archive {path}: not an uncompressed tar ({e})",
                              op="read image archive", obj=path,
                              hint="an OCI archive or a `docker save` archive is a plain tar") from None
    return out


def _detect(path: str) -> str:
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "oci-layout")):
            return "oci"
        raise InvalidArgument(f"image {path}: a directory without an oci-layout file is not an OCI image layout",
                              op="read image", obj=path,
                              hint="for a plain root filesystem tree use `cowdisk template build DIR`")
    found = _tar_members(path, ("oci-layout", "manifest.json"))
    if "oci-layout" in found:
        return "oci-archive"
    if "manifest.json" in found:
        return "docker-archive"
    raise InvalidArgument(f"image {path}: a tar with neither oci-layout nor manifest.json is not an image archive",
                          op="read image", obj=path,
                          hint="for a plain rootfs tarball use `cowdisk template build FILE`")


def parse_ref(ref: str) -> ImageSource:
    """``ref`` (see the module docstring) as an :class:`ImageSource`; the path must exist."""
    if not isinstance(ref, str) or not ref or "\0" in ref:
        raise InvalidArgument(f"invalid image reference {ref!r}", op="read image", obj=repr(ref))
    transport = None
    rest = ref
    head, sep, tail = ref.partition(":")
    if sep and head in TRANSPORTS:
        transport, rest = head, tail
    path, tag = rest, None
    if not os.path.lexists(path):  # PATH:TAG; a docker tag has a ':' of its own (name:tag)
        for i, c in enumerate(rest):
            if c == ":" and os.path.lexists(rest[:i]):
                path, tag = rest[:i], rest[i + 1:] or None
                break
    if not os.path.lexists(path):
        raise NotFound(f"image {ref}: {path} does not exist", op="read image", obj=ref)
    path = os.path.abspath(path)
    detected = _detect(path)
    if transport is not None and transport != detected:
        raise InvalidArgument(f"image {ref}: {path} is an {detected} image, not {transport}",
                              op="read image", obj=ref)
    return ImageSource(detected, path, tag)


def _pick(items: list[dict[str, Any]], tag: str | None, names: Any, what: str, src: ImageSource) -> dict[str, Any]:
    if tag is None:
        if len(items) == 1:
            return items[0]
        tags = sorted(t for i in items for t in names(i) if t)
        raise InvalidArgument(f"image {src}: holds {len(items)} images; say which with :TAG",
                              op="read image", obj=str(src), hint=f"tags: {', '.join(tags) or 'none'}")
    hits = [i for i in items if tag in names(i)]
    if len(hits) != 1:
        raise NotFound(f"image {src}: no {what} tagged {tag!r}", op="read image", obj=str(src))
    return hits[0]


def _docker_tags(item: dict[str, Any]) -> list[str]:
    """The names an image of a docker archive answers to: each RepoTag, the same without its
    leading registry or path parts (``docker.io/x/y:t`` -> ``x/y:t``, ``y:t``), and the bare tag ``t``."""
    out = []
    for t in item.get("RepoTags") or []:
        parts = str(t).split("/")
        out += ["/".join(parts[i:]) for i in range(len(parts))]
        out.append(str(t).rsplit(":", 1)[-1])
    return out


def _docker_index(doc: list[dict[str, Any]], src: ImageSource) -> int:
    item = _pick(doc, src.tag, _docker_tags, "image", src)
    return doc.index(item)


def identity(src: ImageSource) -> str:
    """``sha256:<hex>``: the manifest digest (OCI) or the image id (docker archive)."""
    try:
        if src.transport == "oci":
            with open(os.path.join(src.path, "index.json"), "rb") as f:
                raw = f.read()
        else:
            name = "index.json" if src.transport == "oci-archive" else "manifest.json"
            raw = _tar_members(src.path, (name,)).get(name, b"")
            if not raw:
                raise InvalidArgument(f"image {src}: {name} missing", op="read image", obj=str(src))
        doc = json.loads(raw)
    except OSError as e:
        raise KernelError.from_oserror("read image index", src.path, e) from None
    except ValueError as e:
        raise InvalidArgument(f"image {src}: its index is not JSON ({e})", op="read image", obj=str(src)) from None
    if src.transport == "docker-archive":
        if not isinstance(doc, list) or not doc:
            raise InvalidArgument(f"image {src}: manifest.json lists no image", op="read image", obj=str(src))
        item = doc[_docker_index(doc, src)]
        config = str(item.get("Config", ""))
        hexd = os.path.basename(config).removesuffix(".json")
        if len(hexd) != 64:
            raise InvalidArgument(f"image {src}: unexpected Config {config!r}", op="read image", obj=str(src))
        return f"sha256:{hexd}"
    manifests = doc.get("manifests") if isinstance(doc, dict) else None
    if not manifests:
        raise InvalidArgument(f"image {src}: index.json lists no manifest", op="read image", obj=str(src))
    m = _pick(manifests, src.tag, lambda i: [(i.get("annotations") or {}).get(REF_NAME)], "manifest", src)
    if m.get("mediaType") in INDEX_TYPES:
        raise Unsupported(f"image {src}: {m.get('digest')} is an index of several platforms",
                          op="read image", obj=str(src),
                          hint="copy one platform out first: skopeo copy --override-arch amd64 ...")
    digest = str(m.get("digest", ""))
    if not digest.startswith("sha256:") or len(digest) != 71:
        raise InvalidArgument(f"image {src}: manifest digest {digest!r} is not sha256", op="read image",
                              obj=str(src))
    return digest


def signature(src: ImageSource) -> str:
    """A cheap stat signature that changes when the image is replaced or rewritten."""
    p = os.path.join(src.path, "index.json") if src.transport == "oci" else src.path
    try:
        st = os.stat(p)
    except OSError as e:
        raise KernelError.from_oserror("stat image", p, e) from None
    return f"{src.transport}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def unpack(src: ImageSource, dest: str, progress: Progress | None = None, *,
           reader: Identity | None = None) -> str:
    """Unpack the image's root filesystem under ``dest`` (a new, empty staging directory);
    returns the rootfs directory. Refuses an image that is not the one :func:`identity`
    named when it started (it changed meanwhile).

    ``reader``: the image is read with that user's rights: its index on this thread under
    :func:`~cowdisk.kernel.creds.fs_identity`, and skopeo runs as that user. skopeo resolves
    every path it is given to its real path and looks it up again, so it cannot write into
    the store's private staging: it writes the layout into a directory of the reader's in a
    root-owned directory of the system's temporary directory (``/tmp/cowdisk-read-*``, 0711:
    the reader cannot move or replace its directory there); the layout is root's again when
    skopeo is done (its directory first, so nothing new can be made in it), refused if it
    holds anything but directories and regular files, and umoci unpacks it as root (it sets
    owners). skopeo's own second lookup of the source is made with the reader's rights."""
    skopeo = _tool("skopeo", "skopeo")
    umoci = _tool("umoci", "umoci")
    with fs_identity(reader):
        want = identity(src)
        sref = src.skopeo_ref()
    layout = os.path.join(dest, "layout")
    bundle = os.path.join(dest, "bundle")
    stage(progress, f"copying {src} into an OCI layout (skopeo)")
    hint = "is it a complete image? `skopeo inspect` it"
    station = None
    try:
        if reader is not None and not reader.is_root:
            station = tempfile.mkdtemp(prefix="cowdisk-read-")
            os.chmod(station, 0o711)
            layout = os.path.join(station, "layout")
            os.mkdir(layout, 0o700)
            os.chown(layout, reader.uid, reader.gid)
            env = c_env()
            env["HOME"] = "/nonexistent"  # the reader's tool reads no configuration of root's
            env.pop("XDG_CONFIG_HOME", None)
            run([skopeo, "--insecure-policy", "copy", "--quiet", sref, f"oci:{layout}:{STAGING_TAG}"],
                "copy image", str(src), env=env, hint=hint, progress=progress, user=reader,
                pass_fds=proc_fds(src.path))
            _take_back(layout, str(src))
        else:
            run([skopeo, "--insecure-policy", "copy", "--quiet", sref, f"oci:{layout}:{STAGING_TAG}"],
                "copy image", str(src), hint=hint, progress=progress, pass_fds=proc_fds(src.path))
        # an OCI source keeps its manifest byte for byte; docker's is converted (a new manifest and
        # config), so there the archive itself is read again
        if src.transport == "docker-archive":
            with fs_identity(reader):
                got = identity(src)
        else:
            got = identity(ImageSource("oci", layout, STAGING_TAG))
        if got != want:
            raise CowdiskError(f"image {src} changed while it was read ({want} -> {got}); not building",
                               op="copy image", obj=str(src), hint="retry once the image is stable")
        stage(progress, "unpacking the layers (umoci)")
        cmd = [umoci, "unpack", "--image", f"{layout}:{STAGING_TAG}", bundle]
        if os.geteuid() != 0:
            cmd.insert(2, "--rootless")
        run(cmd, "unpack image", str(src), progress=progress)
    finally:
        shutil.rmtree(station or layout, ignore_errors=True)
    return os.path.join(bundle, "rootfs")


def _take_back(layout: str, what: str) -> None:
    """The layout a reader's skopeo wrote, root's again (its directory first: nothing new can
    be made in it); anything in it but directories and regular files is refused."""
    os.chown(layout, os.geteuid(), os.getegid())
    for d, dirs, files in os.walk(layout):
        for n in dirs + files:
            p = os.path.join(d, n)
            st = os.lstat(p)
            if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                raise CowdiskError(f"copy image {what}: the copied layout holds {os.path.relpath(p, layout)}, "
                                   "neither a directory nor a file; not unpacking it", op="copy image", obj=what)
            os.chown(p, os.geteuid(), os.getegid(), follow_symlinks=False)


def tree_bytes(root: str) -> int:
    """What the tree under ``root`` needs in an ext4 image: each file's data in 4 KiB blocks,
    one block per directory and symlink, an inode (256 bytes) per entry; hard links once."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for d, dirs, files in os.walk(root):
        total += 4096 + 256
        for n in dirs:
            if os.path.islink(os.path.join(d, n)):
                total += 4096 + 256
        for n in files:
            st = os.lstat(os.path.join(d, n))
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += (st.st_size + 4095) // 4096 * 4096 + 256
    return total


def auto_capacity(root: str) -> int:
    """An image size for the tree under ``root`` with headroom for the guest to write: one
    and a half times what it needs plus 64 MiB, rounded up to a MiB, at least 64 MiB. The
    image file is sparse, so the headroom costs no disk until written."""
    need = tree_bytes(root)
    return max(64 << 20, (need * 3 // 2 + (64 << 20) + (1 << 20) - 1) // (1 << 20) * (1 << 20))


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
