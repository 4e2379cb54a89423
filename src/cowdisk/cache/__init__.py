"""Template cache: disk images built from a recipe, cached by key, built once per key.

Where things are:

=============  ===================================================================
recipes.py     the recipes, digests of their inputs, the cache key, validation
mkfs.py        finding mkfs, its version fingerprint, running it reproducibly
tree.py        copying a tree keeping owners, modes, xattrs and hard links
build.py       a recipe to an image in a staging directory (assemble, then mkfs)
fscheck.py     same mount for staging and publishing; reflink capability
entries.py     the cache: entries, publish, hold, remove, sweep, clean
=============  ===================================================================

The lock is :class:`cowdisk.locks.FileLock`; process identity is
:mod:`cowdisk.kernel.procfs`; hashes are :func:`cowdisk.digest.sha256_file`; progress
is :class:`cowdisk.progress.Progress` (a stage report as each phase begins).

Layout under the cache directory (on the store's filesystem, e.g. ``<store>/cache``)::

    <cache>/<key>/disk.img                  the image, mode 0400 (optionally chattr +i)
    <cache>/<key>/meta.json                 (0400) key, fs, capacity, recipe summary, mkfs, size, sha256, created
    <cache>/.locks/<key>.lock               per-key flock; holds the last builder's PID as a hint
    <cache>/.staging-<key>-<pid>-<rand>/    a build in progress (or debris of a dead builder)

**Keys** are 64 lowercase hex digits. For a recipe::

    key = sha256(b"cowdisk-cache-key\\0" + canonical_json({
              "v": 1, "fs": fs, "capacity": capacity_bytes,
              "mkfs": mkfs_fingerprint(fs),     # sha256 of `mkfs.<fs> -V` output (LC_ALL=C)
              "options": [extra mkfs args],
              "kind": "tree" | "tar" | "files",
              "digest": recipe content digest}))

where canonical_json is ``json.dumps(sort_keys=True, separators=(",", ":"))`` and the
content digest is :func:`tree_digest` of the directory (paths, types, permission bits,
uid/gid, sizes, sha256 of contents, symlink targets, device numbers, hardlink groups,
xattrs; **not** timestamps), the sha256 of the tarball's bytes, or a digest over the file
list's (destination, tree digest of source) pairs in order. For an imported image the key
is simply the sha256 of the image's bytes (:meth:`TemplateCache.import_image`).

**Publishing**: a build happens in a staging directory inside the cache directory, and
one ``rename(2)`` publishes it, so an entry is either complete or absent. Staging on
another filesystem (or mount) than the cache is refused: a rename across them fails with
EXDEV, and a copy instead would not be atomic. A staging directory holds ``.owner``
(``{"pid", "start", "boot"}``) until it is published; a sweep removes staging debris
whose builder is no longer that process.

**Concurrency**: one builder per key, through an exclusive ``flock`` on the key's lock
file taken with a timeout; a waiter re-checks for the entry once it has the lock and
reuses it. :meth:`TemplateCache.hold` takes the lock shared, so that ``clean_all`` and
``remove`` leave an entry alone while a peer is copying out of it. Lock files are never
deleted (deleting a lock file lets two processes lock two different inodes).

**Shared images**: an entry's image may have a second hard link outside the cache (the
store links it as a template file and sets chattr +i on it). Removing the entry unlinks
only the cache's name and leaves that inode immutable.

ext4 images are reproducible: the filesystem UUID and directory hash seed are derived
from the key and mke2fs runs with a fixed ``E2FSPROGS_FAKE_TIME``, so the same key gives
the same bytes again after a ``clean_all`` (file timestamps still come from the source).
"""

from __future__ import annotations

from ..kernel.procfs import lock_holders
from .build import IMAGE_NAME
from .entries import (
    DEFAULT_LOCK_TIMEOUT,
    LOCK_DIR,
    META_NAME,
    OWNER_NAME,
    STAGING_PREFIX,
    CacheEntry,
    CacheResult,
    CleanResult,
    TemplateCache,
)
from .fscheck import check_reflink, check_same_filesystem
from .mkfs import FAKE_TIME, MkfsInfo, find_mkfs, mkfs_fingerprint
from .recipes import (
    FORMAT,
    FilesRecipe,
    Recipe,
    TarRecipe,
    TreeRecipe,
    cache_key,
    recipe_digest,
    recipe_signature,
    tree_digest,
    validate_key,
)

__all__ = [
    "TemplateCache", "TreeRecipe", "TarRecipe", "FilesRecipe", "Recipe", "CacheEntry", "CacheResult",
    "CleanResult", "MkfsInfo", "cache_key", "tree_digest", "recipe_digest", "mkfs_fingerprint", "find_mkfs",
    "check_reflink", "check_same_filesystem", "lock_holders", "validate_key",
]
