"""The command examples of README.md and docs/ that the host can run, run (issue 22, item 6):
blocks marked ``<!-- example: run -->`` with bash (``set -e -o pipefail``, the substitutions
their marker names made: tests/docexamples.py), blocks marked ``<!-- example: transcript -->``
command by command with their output compared to what the block shows. Each against its own
scratch store (copy backend: template ``base``, volumes vm1 and vm2 attached), ``cowdisk``
on PATH being this checkout. tests/docexamples.py says how blocks are marked;
tests/unit/test_docs.py parses the rest; tests/ceph/test_doc_examples_ceph.py runs the Ceph ones.
"""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from cowdisk.store import Store
from docexamples import Block, Places, Scratch, blocks

pytestmark = pytest.mark.root

RUNNABLE = [b for b in blocks() if b.kind in ("run", "transcript")]


@pytest.fixture
def scratch(tmp_path) -> Iterator[tuple[Scratch, Places]]:
    root = str(tmp_path / "store")
    s = Scratch(str(tmp_path), COWDISK_ROOT=root, COWDISK_BACKEND="copy")
    places = Places(root=root, socket=s.env["COWDISK_SOCKET"])
    image = tmp_path / "base.img"
    image.write_bytes(b"\0" * (1 << 20))
    p = s.bash(f"set -e; cowdisk -q template import {image} --name base; cowdisk -q volume create vm1 -t base; "
               "cowdisk -q volume create vm2 -t base")
    assert p.returncode == 0, p.stderr
    try:
        yield s, places
    finally:
        if os.path.exists(os.path.join(root, "registry.db")):
            with Store(root) as st:
                st.destroy()


def _transcript(body: str) -> list[tuple[str, str]]:
    """(command, the output the block shows for it), in order."""
    steps: list[tuple[str, str]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], ""))
        elif steps:
            cmd, out = steps[-1]
            steps[-1] = (cmd, out + line + "\n")
    return steps


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.where for b in RUNNABLE])
def test_doc_example_runs(block: Block, scratch: tuple[Scratch, Places]) -> None:
    s, places = scratch
    if block.kind == "run":
        s.run_block(block, places)
        return
    steps = _transcript(block.body)
    assert steps, block.where
    sep = "@@@ next command @@@"
    script = "".join(f"{cmd} 2>&1\n__s=$?; echo '{sep}'; (exit $__s)\n" for cmd, _ in steps)
    p = s.bash(script)
    outputs = p.stdout.replace(places.root, "/var/lib/cowdisk").split(sep + "\n")
    assert len(outputs) == len(steps) + 1, (block.where, p.stdout, p.stderr)
    for (cmd, want), got in zip(steps, outputs):
        assert got.rstrip() == want.rstrip(), f"{block.where}: $ {cmd}\nthe doc shows:\n{want}\nit printed:\n{got}"


def test_runnable_examples_are_there() -> None:
    """The run and transcript blocks this tier runs (so a marker cannot quietly vanish):
    the daemon's start (README.md, docs/daemon.md) and the shells' completions among them."""
    where = {b.where.split(":")[0] for b in RUNNABLE}
    assert {"docs/cli.md", "docs/vmm.md", "README.md", "docs/daemon.md"} <= where, where
    subst = {n for b in RUNNABLE for n in b.substitutions}
    assert {"installed", "daemon", "zshrc", "fish"} <= subst, subst
    assert len(RUNNABLE) >= 7
