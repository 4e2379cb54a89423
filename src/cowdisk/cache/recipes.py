"""What a cache entry is built from, and the key it is cached under.

Recipes (a directory tree, a tarball, a file list), the content digest of their inputs,
the cheap stat signature that tells whether the inputs changed during a build, the
cache key (pure: no I/O) and the validation of recipes and keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from typing import Any, Iterator, Sequence, Union

from ..digest import sha256_file
from ..errors import InvalidArgument, KernelError, NotFound, Unsupported
from ..kernel.creds import Identity, fs_identity
from ..progress import Progress
from .tree import xattrs

FORMAT = 1
SUPPORTED_FS = ("ext4", "btrfs")
KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_KEY_DOMAIN = b"cowdisk-cache-key\0"
_TREE_DOMAIN = b"cowdisk-tree-v1\0"
_FILES_DOMAIN = b"cowdisk-files-v1\0"


@dataclass(frozen=True)
class TreeRecipe:
    """An image of filesystem ``fs`` and ``capacity`` bytes holding the tree under ``source``."""

    source: str
    capacity: int
    fs: str = "ext4"
    mkfs_options: tuple[str, ...] = ()
    reader: Identity | None = None
    origin: str = ""
    kind = "tree"


@dataclass(frozen=True)
class TarRecipe:
    """An image holding the contents of a tarball (any compression GNU tar detects)."""

    tarball: str
    capacity: int
    fs: str = "ext4"
    mkfs_options: tuple[str, ...] = ()
    reader: Identity | None = None
    origin: str = ""
    kind = "tar"


@dataclass(frozen=True)
class FilesRecipe:
    """An image holding a list of ``(source path, destination path in the image)`` entries.

    A source may be a file, a symlink (copied as a link) or a directory (copied whole).
    Entries are applied in order: directories merge, later files replace earlier ones.
    Parent directories that no entry provides are made 0755, owned by the builder.
    """

    files: tuple[tuple[str, str], ...]
    capacity: int
    fs: str = "ext4"
    mkfs_options: tuple[str, ...] = ()
    reader: Identity | None = None
    origin: str = ""
    kind = "files"


@dataclass(frozen=True)
class ImageRecipe:
    """An image holding the root filesystem of a container image (:mod:`.oci`): an OCI
    layout, an OCI archive or a ``docker save`` archive, ``ref`` as :func:`.oci.parse_ref`
    takes it. Its content digest is the image's manifest digest (or a docker archive's
    image id). ``capacity`` 0 means "chosen from the unpacked content" (:func:`.oci.auto_capacity`):
    a function of the image, so the key stays sound."""

    ref: str
    capacity: int = 0
    fs: str = "ext4"
    mkfs_options: tuple[str, ...] = ()
    reader: Identity | None = None
    origin: str = ""
    kind = "image"


Recipe = Union[TreeRecipe, TarRecipe, FilesRecipe, ImageRecipe]
"""Every recipe may carry ``reader``: whose rights its inputs are read with (the digest walks
on this thread under :func:`~cowdisk.kernel.creds.fs_identity`; mkfs over a tree runs as
that user), and ``origin``: the path its caller named when ``source``/``tarball`` is the
``/proc/self/fd/N`` of a descriptor opened once (``store/sources.py``); meta.json records
the origin."""


# --------------------------------------------------------------------------- validation


def check_recipe(recipe: Recipe) -> None:
    if recipe.fs not in SUPPORTED_FS:
        hint = ""
        if recipe.fs == "xfs":
            hint = "mkfs.xfs of xfsprogs < 6.5 cannot populate an image from a directory without mounting it"
        raise Unsupported(f"cache recipes build {', '.join(SUPPORTED_FS)} images, not {recipe.fs!r}",
                          op="cache recipe", obj=recipe.fs, hint=hint)
    cap = recipe.capacity
    if isinstance(recipe, ImageRecipe) and cap == 0:
        pass  # auto: chosen from the unpacked image
    elif not isinstance(cap, int) or isinstance(cap, bool) or cap <= 0 or cap % 512:
        raise InvalidArgument(f"capacity {cap!r} must be a positive multiple of 512 bytes",
                              op="cache recipe", obj=str(cap))
    for o in recipe.mkfs_options:
        if not isinstance(o, str):
            raise InvalidArgument(f"mkfs option {o!r} is not a string", op="cache recipe", obj=str(o))


def validate_key(key: str) -> str:
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise InvalidArgument(f"invalid cache key {key!r}: expected 64 lowercase hex digits",
                              op="cache", obj=str(key))
    return key


def clean_dest(dest: str) -> str:
    """A file list destination as a relative path inside the image ('' for the root)."""
    parts = [p for p in dest.replace("\\", "/").split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise InvalidArgument(f"file list destination {dest!r} contains '..'", op="cache recipe", obj=dest)
    return "/".join(parts)


# --------------------------------------------------------------------------- keys


def cache_key(fs: str, capacity: int, mkfs_fp: str, kind: str, digest: str,
              options: Sequence[str] = ()) -> str:
    """The cache key of a recipe (see :mod:`cowdisk.cache`). Pure: no I/O."""
    doc = {"v": FORMAT, "fs": fs, "capacity": int(capacity), "mkfs": mkfs_fp,
           "options": list(options), "kind": kind, "digest": digest}
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(_KEY_DOMAIN + blob).hexdigest()


# --------------------------------------------------------------------------- digests


def _field(h: "hashlib._Hash", value: bytes | str | int) -> None:
    if isinstance(value, int):
        value = str(value)
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    h.update(len(value).to_bytes(8, "little"))
    h.update(value)


def hash_file(path: str | bytes, progress: Progress | None = None) -> str:
    """:func:`cowdisk.digest.sha256_file`, its OSError named as a KernelError."""
    p = os.fsdecode(path)
    try:
        return sha256_file(p, progress)
    except OSError as e:
        raise KernelError.from_oserror("hash", p, e) from None


def _walk(root: str) -> Iterator[tuple[bytes, bytes, os.stat_result]]:
    """(relative path, absolute path, lstat) of ``root`` (followed if a symlink) and below, sorted."""
    top = os.fsencode(os.path.abspath(root))
    try:
        st = os.stat(top)
    except OSError as e:
        raise KernelError.from_oserror("stat recipe source", root, e) from None
    yield b"", top, st
    if stat.S_ISDIR(st.st_mode):
        yield from _walk_dir(b"", top)


def _walk_dir(rel: bytes, path: bytes) -> Iterator[tuple[bytes, bytes, os.stat_result]]:
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        raise KernelError.from_oserror("list recipe directory", os.fsdecode(path), e) from None
    for name in names:
        r = rel + b"/" + name if rel else name
        p = path + b"/" + name
        try:
            st = os.lstat(p)
        except OSError as e:
            raise KernelError.from_oserror("stat recipe file", os.fsdecode(p), e) from None
        yield r, p, st
        if stat.S_ISDIR(st.st_mode):
            yield from _walk_dir(r, p)


def _type_char(mode: int) -> str:
    for test, c in ((stat.S_ISREG, "f"), (stat.S_ISDIR, "d"), (stat.S_ISLNK, "l"), (stat.S_ISCHR, "c"),
                    (stat.S_ISBLK, "b"), (stat.S_ISFIFO, "p"), (stat.S_ISSOCK, "s")):
        if test(mode):
            return c
    return "?"


def _sig_fields(sig: "hashlib._Hash", rel: bytes, st: os.stat_result) -> None:
    for v in (rel, st.st_ino, st.st_size, st.st_ctime_ns, st.st_mtime_ns, st.st_mode):
        _field(sig, v)


def _tree_digests(root: str) -> tuple[str, str]:
    """(content digest, stat signature) of a tree. The signature changes when anything
    under it is modified (ctime, size, inode), and is cheap to recompute."""
    h = hashlib.sha256(_TREE_DOMAIN)
    sig = hashlib.sha256()
    first: dict[tuple[int, int], bytes] = {}
    for rel, path, st in _walk(root):
        t = _type_char(st.st_mode)
        _field(h, rel)
        _field(h, t)
        _field(h, stat.S_IMODE(st.st_mode))
        _field(h, st.st_uid)
        _field(h, st.st_gid)
        if t == "f":
            _field(h, st.st_size)
            _field(h, hash_file(path))
            if st.st_nlink > 1:
                group = first.setdefault((st.st_dev, st.st_ino), rel)
                _field(h, b"link:" + group)
        elif t == "l":
            try:
                _field(h, os.readlink(path))
            except OSError as e:
                raise KernelError.from_oserror("read symlink", os.fsdecode(path), e) from None
        elif t in "cb":
            _field(h, f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
        for name, value in xattrs(path) if t != "l" else []:
            _field(h, b"xattr:" + name.encode())
            _field(h, value)
        _field(h, b"\n")
        _sig_fields(sig, rel, st)
    return h.hexdigest(), sig.hexdigest()


def _sig_tree(root: str) -> str:
    sig = hashlib.sha256()
    for rel, _path, st in _walk(root):
        _sig_fields(sig, rel, st)
    return sig.hexdigest()


def tree_digest(root: str | os.PathLike[str]) -> str:
    """Content digest of a file tree (or one file): paths, types, permission bits, uid/gid,
    sizes, sha256 of contents, symlink targets, device numbers, hardlink groups, xattrs;
    **not** timestamps."""
    return _tree_digests(os.fspath(root))[0]


def _stat_sig(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError as e:
        raise KernelError.from_oserror("stat recipe source", path, e) from None
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def recipe_digest(recipe: Recipe) -> tuple[str, str]:
    """(content digest, stat signature) of a recipe's inputs, read with ``recipe.reader``'s rights."""
    with fs_identity(recipe.reader):
        return _recipe_digest(recipe)


def _recipe_digest(recipe: Recipe) -> tuple[str, str]:
    if isinstance(recipe, TreeRecipe):
        if not os.path.isdir(recipe.source):
            raise NotFound(f"recipe source {recipe.source} is not a directory", op="cache recipe", obj=recipe.source)
        return _tree_digests(recipe.source)
    if isinstance(recipe, TarRecipe):
        if not os.path.isfile(recipe.tarball):
            raise NotFound(f"recipe tarball {recipe.tarball} is not a file", op="cache recipe", obj=recipe.tarball)
        sig = _stat_sig(recipe.tarball)
        return hash_file(recipe.tarball), sig
    if isinstance(recipe, ImageRecipe):
        from . import oci

        image = oci.parse_ref(recipe.ref)
        image_sig = oci.signature(image)
        ident = oci.identity(image)
        if recipe.reader is not None and not recipe.reader.is_root:
            # an image's identity is read from its index alone, which anyone can write naming
            # any manifest digest: a reader other than root never hits an entry another user
            # built, so its blobs are read (and their digests checked) with its own rights
            ident += f" read-by:{recipe.reader.uid}"
        return ident, image_sig
    if isinstance(recipe, FilesRecipe):
        if not recipe.files:
            raise InvalidArgument("file list recipe has no entries", op="cache recipe", obj="files")
        h = hashlib.sha256(_FILES_DOMAIN)
        fsig = hashlib.sha256()
        _field(h, f"implicit-dirs:0755:{os.geteuid()}:{os.getegid()}")
        for src, dest in recipe.files:
            d = clean_dest(dest)
            if not os.path.lexists(src):
                raise NotFound(f"file list source {src} does not exist", op="cache recipe", obj=src)
            if os.path.islink(src):
                _field(h, d)
                _field(h, "symlink:" + os.readlink(src))
                _field(fsig, src)
                _field(fsig, os.readlink(src))
                continue
            c, s = _tree_digests(src)
            _field(h, d)
            _field(h, c)
            _field(fsig, s)
        return h.hexdigest(), fsig.hexdigest()
    raise InvalidArgument(f"not a cache recipe: {recipe!r}", op="cache recipe", obj=type(recipe).__name__)


def recipe_signature(recipe: Recipe) -> str:
    """Only the stat signature of a recipe's inputs (no hashing of contents), read with
    ``recipe.reader``'s rights."""
    with fs_identity(recipe.reader):
        return _recipe_signature(recipe)


def _recipe_signature(recipe: Recipe) -> str:
    if isinstance(recipe, TarRecipe):
        return _stat_sig(recipe.tarball)
    if isinstance(recipe, TreeRecipe):
        return _sig_tree(recipe.source)
    if isinstance(recipe, ImageRecipe):
        from . import oci

        return oci.signature(oci.parse_ref(recipe.ref))
    sig = hashlib.sha256()
    for src, _dest in recipe.files:
        if os.path.islink(src):
            _field(sig, src)
            _field(sig, os.readlink(src))
        else:
            _field(sig, _sig_tree(src))
    return sig.hexdigest()


def summary(recipe: Recipe) -> dict[str, Any]:
    """What meta.json records of a recipe."""
    if isinstance(recipe, TreeRecipe):
        return {"source": recipe.origin or os.path.abspath(recipe.source), "mkfs_options": list(recipe.mkfs_options)}
    if isinstance(recipe, TarRecipe):
        return {"tarball": recipe.origin or os.path.abspath(recipe.tarball),
                "mkfs_options": list(recipe.mkfs_options)}
    if isinstance(recipe, ImageRecipe):
        return {"image": recipe.origin or recipe.ref, "mkfs_options": list(recipe.mkfs_options)}
    files = [[os.path.abspath(s), "/" + clean_dest(d)] for s, d in recipe.files]
    return {"files": files[:100], "count": len(files), "mkfs_options": list(recipe.mkfs_options)}
