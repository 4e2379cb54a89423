"""Templates from container images (issue 14): OCI layouts, OCI archives and ``docker save``
archives the tests build themselves with umoci and skopeo, unpacked into an ext4 template
whose files are checked with debugfs (an outside witness, no mount)."""

from __future__ import annotations

import os
import re
import shutil
import time

import pytest

from cowdisk.errors import InvalidArgument, NotFound
from cowdisk.store import Store
from testutil import assert_same_host, host_state
from vmm.images import debugfs, docker_archive, make_image, oci_archive

pytestmark = pytest.mark.root

MiB = 1 << 20


def _base_layer(rootfs: str) -> None:
    os.makedirs(os.path.join(rootfs, "etc"))
    os.makedirs(os.path.join(rootfs, "bin"))
    with open(os.path.join(rootfs, "etc", "hostname"), "w") as f:
        f.write("from-an-image\n")
    with open(os.path.join(rootfs, "etc", "removed"), "w") as f:
        f.write("a lower layer had me\n")
    secret = os.path.join(rootfs, "etc", "secret")
    with open(secret, "w") as f:
        f.write("s3cret\n")
    os.chown(secret, 1234, 5678)
    os.chmod(secret, 0o640)
    tool = os.path.join(rootfs, "bin", "tool")
    with open(tool, "wb") as f:
        f.write(b"#!/bin/sh\necho tool\n")
    os.chmod(tool, 0o4755)  # setuid survives
    os.link(tool, os.path.join(rootfs, "bin", "tool-link"))
    os.symlink("tool", os.path.join(rootfs, "bin", "tool-sym"))
    os.setxattr(tool, "user.cowdisk", b"kept")
    with open(os.path.join(rootfs, "big.bin"), "wb") as f:
        f.write(os.urandom(8 * MiB))


def _second_layer(rootfs: str) -> None:
    os.unlink(os.path.join(rootfs, "etc", "removed"))  # -> a whiteout in this layer
    with open(os.path.join(rootfs, "etc", "added"), "w") as f:
        f.write("second layer\n")


@pytest.fixture
def layout(tmp_path) -> str:
    path = str(tmp_path / "layout")
    make_image(path, "v1", [_base_layer, _second_layer])
    return path


@pytest.fixture
def store(tmp_path):
    before = host_state()
    s = Store(str(tmp_path / "store"), backend="copy")
    try:
        yield s
    finally:
        s.destroy()
        s.close()
        assert_same_host(before)


def _stat(img: str, path: str) -> dict[str, str]:
    out = debugfs(img, f"stat {path}")
    m = re.search(r"Inode: (\d+)\s+Type: (\w+)\s+Mode:\s+(\d+)", out)
    assert m, out
    u = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", out)
    links = re.search(r"Links: (\d+)", out)
    assert u and links, out
    return {"ino": m.group(1), "type": m.group(2), "mode": m.group(3), "uid": u.group(1), "gid": u.group(2),
            "links": links.group(1)}


def _check_files(img: str) -> None:
    assert debugfs(img, "cat /etc/hostname") == "from-an-image\n"
    assert debugfs(img, "cat /etc/added") == "second layer\n"
    assert "File not found" in debugfs(img, "stat /etc/removed") or \
        "removed" not in debugfs(img, "ls -l /etc")  # the whiteout removed it
    assert ".wh." not in debugfs(img, "ls -l /etc")   # and is not itself in the image
    s = _stat(img, "/etc/secret")
    assert (s["uid"], s["gid"], int(s["mode"], 8)) == ("1234", "5678", 0o640)
    tool, link = _stat(img, "/bin/tool"), _stat(img, "/bin/tool-link")
    assert int(tool["mode"], 8) == 0o4755 and tool["ino"] == link["ino"] and tool["links"] == "2"  # one inode
    assert _stat(img, "/bin/tool-sym")["type"] == "symlink"
    assert "user.cowdisk" in debugfs(img, "ea_list /bin/tool") and "kept" in debugfs(img, "ea_list /bin/tool")


def test_oci_layout_archive_and_docker_archive(store: Store, layout: str, tmp_path) -> None:
    stages: list[str] = []
    t = store.build_template_from_image(f"{layout}:v1", "img", progress=lambda d, n, s="": s and stages.append(s))
    assert any("skopeo" in s for s in stages) and any("umoci" in s for s in stages)
    _check_files(t.path)
    # the size follows the content (8 MiB file + small ones: 1.5x + 64 MiB, whole MiB), not a fixed guess
    assert 64 * MiB + 12 * MiB <= t.size <= 64 * MiB + 16 * MiB and t.size % MiB == 0
    assert t.source.startswith("cache:")  # the recipe's key: the image's manifest digest in it

    # the same image as an OCI archive: same manifest digest, so the cache builds nothing
    arch = oci_archive(layout, str(tmp_path / "img.oci.tar"))
    stages.clear()
    t2 = store.build_template_from_image(arch, progress=lambda d, n, s="": s and stages.append(s))
    assert t2.id == t.id and not any("umoci" in s for s in stages)
    assert any(s.startswith("cache hit") for s in stages)
    t3 = store.build_template_from_image(f"oci-archive:{arch}:v1")
    assert t3.id == t.id

    # docker save's format (converted by skopeo), keyed on the image id
    dock = docker_archive(layout, "v1", str(tmp_path / "img.docker.tar"))
    t4 = store.build_template_from_image(dock, "from-docker")
    _check_files(t4.path)
    assert store.build_template_from_image(f"{dock}:cowdisk-test/img:v1").id == t4.id
    assert store.build_template_from_image(f"docker-archive:{dock}:img:v1").id == t4.id

    # an explicit size wins
    t5 = store.build_template_from_image(f"oci:{layout}:v1", size=200 * MiB)
    assert t5.size == 200 * MiB and t5.id != t.id
    _check_files(t5.path)


def test_image_refusals(store: Store, layout: str, tmp_path) -> None:
    make_image(layout, "v2", [lambda r: open(os.path.join(r, "v2"), "w").close()])  # a second image
    with pytest.raises(InvalidArgument, match="holds 2 images") as e:
        store.build_template_from_image(layout)
    assert "v1" in e.value.hint and "v2" in e.value.hint
    with pytest.raises(NotFound, match="no manifest tagged 'v9'"):
        store.build_template_from_image(f"{layout}:v9")
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(InvalidArgument, match="oci-layout") as e2:
        store.build_template_from_image(str(plain))
    assert "template build DIR" in e2.value.hint
    with pytest.raises(NotFound):
        store.build_template_from_image(str(tmp_path / "nope"))
    with pytest.raises(InvalidArgument, match="is an oci image, not docker-archive"):
        store.build_template_from_image(f"docker-archive:{layout}")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar" * 100)
    with pytest.raises(InvalidArgument, match="not an uncompressed tar"):
        store.build_template_from_image(str(junk))
    assert store.templates() == []
    assert [n for n in os.listdir(os.path.join(store.root, "templates")) if not n.startswith(".")] == []


def test_a_build_that_fails_leaves_nothing(store: Store, layout: str, tmp_path) -> None:
    """umoci is missing: the error names the tool and the package; no entry, no staging left."""
    env_path = os.environ["PATH"]
    os.environ["PATH"] = "/nonexistent"
    try:
        from cowdisk.errors import Unsupported

        with pytest.raises(Unsupported, match="skopeo not found") as e:
            store.build_template_from_image(f"{layout}:v1")
        assert "install skopeo" in e.value.hint
    finally:
        os.environ["PATH"] = env_path
    cache = os.path.join(store.root, "cache")
    assert [n for n in os.listdir(cache) if not n.startswith(".locks")] == [] if os.path.isdir(cache) else True
    t0 = time.monotonic()
    assert shutil.which("umoci") and store.build_template_from_image(f"{layout}:v1").size > 0
    assert time.monotonic() - t0 < 120
