"""The Ceph examples of README.md and docs/ (blocks marked ``<!-- example: ceph -->``), run
with bash against the tier's one session cluster and its RADOS Gateway (tests/ceph/conftest.py:
no cluster of their own), the substitutions each marker names made (tests/docexamples.py):
the docs' ``lab/ceph_cluster.py up`` finds the session's cluster running, its ``down`` is not
run, /var/lib/cowdisk* are scratch stores. Issue 22, item 6.

What each block is given, in its scratch directory (also its working directory, holding
``rootfs-dir/``, a small root tree):

* ``roots``: store A (/var/lib/cowdisk, the block's COWDISK_ROOT) a copy store holding
  template ``base``; store B (/var/lib/cowdisk-b) an empty copy store; /var/lib/cowdisk-rbd
  no store yet (docs/rbd.md makes one there, in the pool's default namespace; it is
  destroyed afterwards and the namespace must be left empty);
* ``hosts``: stores A and B, rbd stores sharing one pool namespace, A holding volume vm1 of
  template ``base``, attached (both destroyed afterwards, nothing of theirs left in the pool).
"""

from __future__ import annotations

import os
import subprocess
from typing import Iterator

import pytest

from cowdisk.store import Store
from docexamples import Block, Places, Scratch, blocks
from testutil import MiB, ceph_options, make_tree, two_rbd_hosts

pytestmark = pytest.mark.root

CEPH = [b for b in blocks() if b.kind == "ceph"]


def _default_namespace_images(conf: str, pool: str) -> list[str]:
    r = subprocess.run(["rbd", "-c", conf, "ls", "-p", pool], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def _base_image(path: str) -> str:
    """A 4 MiB raw image: random data in its first and third MiB, holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
        for at in (0, 2 * MiB):
            f.seek(at)
            f.write(os.urandom(MiB))
    return path


@pytest.fixture
def given(request, tmp_path, ceph_cluster) -> Iterator[tuple[Scratch, Places]]:
    block: Block = request.param
    if "--rgw" in block.body:
        request.getfixturevalue("rgw")  # the session's gateway, which `up --rgw` then finds running
    make_tree(str(tmp_path / "rootfs-dir"))
    a, b, rbd_root = str(tmp_path / "host-a"), str(tmp_path / "host-b"), str(tmp_path / "rbd-store")
    places = Places(root=a, root_b=b, root_rbd=rbd_root, ceph_dir=ceph_cluster.dir)
    scratch = Scratch(str(tmp_path), COWDISK_ROOT=a)
    if "hosts" in block.substitutions:
        with two_rbd_hosts(str(tmp_path), ceph_options()) as (sa, _sb):
            sa.build_template(str(tmp_path / "rootfs-dir"), "base")
            sa.create_volume("vm1", "base")
            yield scratch, places
        return
    stores = [Store(a, backend="copy"), Store(b, backend="copy")]
    try:
        stores[0].import_template(_base_image(str(tmp_path / "base.img")), "base")
        yield scratch, places
    finally:
        if os.path.exists(os.path.join(rbd_root, "registry.db")):
            stores.append(Store(rbd_root))
        for s in stores:
            s.destroy()
            s.close()
        opts = ceph_cluster.options()
        assert _default_namespace_images(opts["conf"], opts["pool"]) == []


@pytest.mark.parametrize("given", CEPH, ids=[b.where for b in CEPH], indirect=True)
def test_ceph_doc_example_runs(given: tuple[Scratch, Places], request) -> None:
    scratch, places = given
    block = request.node.callspec.params["given"]
    scratch.run_block(block, places, timeout=300)


def test_ceph_examples_are_there() -> None:
    """The Ceph blocks this tier runs (so a marker cannot quietly vanish): the object store's
    push and pull (README.md, docs/remote.md), docs/rbd.md's try-it and its move to host B."""
    assert sorted(b.where.split(":")[0] for b in CEPH) == ["README.md", "docs/rbd.md", "docs/rbd.md",
                                                           "docs/remote.md"], [b.where for b in CEPH]
    assert {"cluster", "roots", "hosts", "installed"} <= {n for b in CEPH for n in b.substitutions}
