"""Cache keys: stable for the same inputs, different when anything that shapes the image changes.

No root, no mkfs: the tests that need them are in tests/host/test_cache.py."""

from __future__ import annotations

import os
import shutil

import pytest

from cowdisk.cache import (
    FilesRecipe,
    TreeRecipe,
    cache_key,
    recipe_digest,
    tree_digest,
    validate_key,
)
from cowdisk.errors import InvalidArgument

FP = "ab" * 32
DIG = "cd" * 32


def make_tree(root):
    os.makedirs(root / "etc" / "sub")
    (root / "etc" / "hostname").write_text("cowdisk\n")
    (root / "etc" / "sub" / "big").write_bytes(b"x" * 100_000)
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "bin" / "tool", 0o755)
    os.symlink("etc/hostname", root / "link")
    return root


def test_cache_key_golden_value_is_stable():
    # Pinned: a change here means every existing cache entry silently stops matching.
    assert cache_key("ext4", 64 << 20, FP, "tree", DIG) == cache_key("ext4", 64 << 20, FP, "tree", DIG)
    assert cache_key("ext4", 64 << 20, FP, "tree", DIG) == \
        "a8f0d1da23ff73a6abecad10708e0537d189c571462c2927654bdbb8cd627e01"


def test_cache_key_is_hex_and_valid():
    k = cache_key("ext4", 1 << 30, FP, "tar", DIG)
    assert validate_key(k) == k
    assert len(k) == 64 and all(c in "0123456789abcdef" for c in k)


@pytest.mark.parametrize("change", [
    dict(fs="btrfs"),
    dict(capacity=(64 << 20) + 512),  # one sector more: the seed's MiB rounding would collide here
    dict(mkfs_fp="ab" * 31 + "ac"),
    dict(kind="tar"),
    dict(digest="cd" * 31 + "ce"),
    dict(options=("-b", "4096")),
])
def test_cache_key_sensitive_to_each_input(change):
    base = dict(fs="ext4", capacity=64 << 20, mkfs_fp=FP, kind="tree", digest=DIG, options=())
    assert cache_key(**base) != cache_key(**{**base, **change})


def test_tree_digest_independent_of_location_and_mtime(tmp_path):
    a = make_tree(tmp_path / "a")
    b = make_tree(tmp_path / "b")
    os.utime(b / "etc" / "hostname", (1, 1))
    assert tree_digest(a) == tree_digest(b)
    assert tree_digest(a) == tree_digest(a)


@pytest.mark.parametrize("mutate", [
    "content", "same_size_content", "mode", "new_file", "rename", "symlink_target", "empty_dir", "hardlink",
])
def test_tree_digest_sensitive(tmp_path, mutate):
    a = make_tree(tmp_path / "a")
    before = tree_digest(a)
    if mutate == "content":
        (a / "etc" / "hostname").write_text("other\n")
    elif mutate == "same_size_content":
        (a / "etc" / "hostname").write_text("cowdisK\n")
    elif mutate == "mode":
        os.chmod(a / "bin" / "tool", 0o4755)
    elif mutate == "new_file":
        (a / "etc" / "new").write_text("")
    elif mutate == "rename":
        os.rename(a / "bin" / "tool", a / "bin" / "tool2")
    elif mutate == "symlink_target":
        os.unlink(a / "link")
        os.symlink("etc/sub", a / "link")
    elif mutate == "empty_dir":
        (a / "var").mkdir()
    elif mutate == "hardlink":
        shutil.copy(a / "bin" / "tool", a / "bin" / "copy")
        before = tree_digest(a)
        os.unlink(a / "bin" / "copy")
        os.link(a / "bin" / "tool", a / "bin" / "copy")
        os.chmod(a / "bin" / "tool", 0o755)
    assert tree_digest(a) != before


def test_recipe_digest_tree_matches_tree_digest(tmp_path):
    a = make_tree(tmp_path / "a")
    assert recipe_digest(TreeRecipe(str(a), 64 << 20))[0] == tree_digest(a)


def test_files_recipe_digest_depends_on_destination_and_order(tmp_path):
    a = make_tree(tmp_path / "a")
    h = str(a / "etc" / "hostname")
    t = str(a / "bin" / "tool")
    d1 = recipe_digest(FilesRecipe(((h, "/etc/hostname"), (t, "/usr/bin/tool")), 64 << 20))[0]
    d2 = recipe_digest(FilesRecipe(((h, "etc/hostname"), (t, "usr/bin/tool")), 64 << 20))[0]
    d3 = recipe_digest(FilesRecipe(((h, "/etc/hostname2"), (t, "/usr/bin/tool")), 64 << 20))[0]
    d4 = recipe_digest(FilesRecipe(((t, "/usr/bin/tool"), (h, "/etc/hostname")), 64 << 20))[0]
    assert d1 == d2  # a leading slash is the same destination
    assert d1 != d3
    assert d1 != d4  # later entries win, so order matters


def test_files_recipe_refuses_dotdot(tmp_path):
    a = make_tree(tmp_path / "a")
    with pytest.raises(InvalidArgument, match=r"\.\."):
        recipe_digest(FilesRecipe(((str(a / "link"), "/etc/../../x"),), 64 << 20))


@pytest.mark.parametrize("bad", ["", "ABCD" * 16, "g" * 64, "a" * 63, "../" + "a" * 61, "a" * 64 + "/"])
def test_validate_key_rejects(bad):
    with pytest.raises(InvalidArgument):
        validate_key(bad)
