"""Turning a recipe into an image inside a staging directory: assemble the tree the
recipe describes (unpack the tarball, copy the file list), then run mkfs over it."""

from __future__ import annotations

import os
import stat
from typing import Any

from ..errors import CowdiskError, InvalidArgument, KernelError
from ..kernel.creds import fs_identity
from ..progress import Progress, stage
from .mkfs import MkfsInfo, make_image, proc_fds, run
from .oci import auto_capacity, parse_ref, unpack
from .recipes import FilesRecipe, ImageRecipe, Recipe, TarRecipe, TreeRecipe, clean_dest, recipe_signature, summary
from .tree import copy_node, makedirs_owned, remove_tree

IMAGE_NAME = "disk.img"


def build_image(recipe: Recipe, mk: MkfsInfo, key: str, staging: str, digest: str, sig: str,
                progress: Progress | None) -> dict[str, Any]:
    """Build ``<staging>/disk.img`` for ``recipe``; returns the recipe summary for meta.json.

    ``digest`` and ``sig`` are the recipe's content digest and the stat signature taken
    when the digest was computed: if the inputs changed meanwhile, the image does not
    match the key and is not published.
    """
    img = os.path.join(staging, IMAGE_NAME)
    tree = populate(recipe, staging, progress)
    capacity = recipe.capacity
    extra: dict[str, Any] = {}
    if isinstance(recipe, ImageRecipe) and capacity == 0 and tree is not None:
        capacity = extra["auto_capacity"] = auto_capacity(tree)
    stage(progress, f"formatting {recipe.fs} image of {capacity} bytes")
    # over the caller's own tree mkfs reads as the caller; a tree this build assembled is root's
    make_image(mk, key, img, capacity, tree, recipe.mkfs_options, progress,
               reader=recipe.reader if isinstance(recipe, TreeRecipe) else None)
    if tree is not None and tree.startswith(staging + os.sep):
        stage(progress, "removing the unpacked tree")
        # an image's rootfs sits in umoci's bundle (config.json, mtree): all of it goes
        remove_tree(os.path.dirname(tree) if isinstance(recipe, ImageRecipe) else tree, "remove build tree")
    if recipe_signature(recipe) != sig:
        raise CowdiskError(f"recipe inputs changed while building cache entry {key}; not publishing",
                           op="build cache entry", obj=key, hint="retry once the source is stable")
    return {"kind": recipe.kind, "digest": digest, **summary(recipe), **extra}


def populate(recipe: Recipe, staging: str, progress: Progress | None) -> str | None:
    """The directory mkfs populates the image from: the recipe's own tree, or a tree
    assembled under ``<staging>/tree``."""
    if isinstance(recipe, TreeRecipe):
        return os.path.abspath(recipe.source)
    tree = os.path.join(staging, "tree")
    os.mkdir(tree, 0o755)
    if os.geteuid() == 0:
        os.chown(tree, 0, 0)
    if isinstance(recipe, ImageRecipe):
        os.rmdir(tree)
        with fs_identity(recipe.reader):
            image = parse_ref(recipe.ref)
        return unpack(image, staging, progress, reader=recipe.reader)
    if isinstance(recipe, TarRecipe):
        stage(progress, f"unpacking {recipe.tarball}")
        cmd = ["tar", "-x", "-f", os.path.abspath(recipe.tarball), "-C", tree, "--numeric-owner",
               "--same-permissions", "--xattrs", "--xattrs-include=*"]
        if os.geteuid() == 0:
            cmd.append("--same-owner")
        # tar runs as root (it writes owners into the private staging tree) and reads only the
        # tarball, through the descriptor its caller opened with its own rights
        run(cmd, "unpack tarball", recipe.origin or recipe.tarball, progress=progress,
            pass_fds=proc_fds(recipe.tarball))
        return tree
    assert isinstance(recipe, FilesRecipe)
    stage(progress, f"assembling {len(recipe.files)} file list entries")
    links: dict[tuple[int, int], str] = {}
    for src, dest in recipe.files:
        d = clean_dest(dest)
        target = os.path.join(tree, d) if d else tree
        parent = os.path.dirname(target)
        try:
            makedirs_owned(parent, tree)
            if not d:  # the root itself
                if not os.path.isdir(src) or os.path.islink(src):
                    raise InvalidArgument(f"file list source {src} for destination / must be a directory",
                                          op="cache recipe", obj=src)
                for name in sorted(os.listdir(src)):
                    copy_node(os.path.join(src, name), os.path.join(tree, name), links)
                s = os.stat(src)
                os.chown(tree, s.st_uid, s.st_gid)
                os.chmod(tree, stat.S_IMODE(s.st_mode))
            else:
                copy_node(src, target, links)
        except OSError as e:
            raise KernelError.from_oserror("copy file list entry", f"{src} -> /{d}", e) from None
    return tree
