"""The command examples of README.md and docs/ that the host can run, run (issue 22, item 6):
blocks marked ``<!-- example: run -->`` with bash (``set -e -o pipefail``), blocks marked
``<!-- example: transcript -->`` command by command with their output compared to what the
block shows. Each against its own scratch store (copy backend: template ``base``, volumes
vm1 and vm2 attached), ``cowdisk`` on PATH being this checkout. tests/docexamples.py says
how blocks are marked; tests/unit/test_docs.py parses the rest.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from typing import Iterator

import pytest

from cowdisk.store import Store
from docexamples import REPO, Block, blocks

pytestmark = pytest.mark.root

RUNNABLE = [b for b in blocks() if b.kind in ("run", "transcript")]


class Scratch:
    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.root = os.path.join(tmp, "store")
        self.home = os.path.join(tmp, "home")
        bindir = os.path.join(tmp, "bin")
        os.makedirs(bindir)
        os.makedirs(os.path.join(self.home, ".config", "fish", "completions"))
        wrapper = os.path.join(bindir, "cowdisk")
        with open(wrapper, "w") as f:
            f.write(f'#!/bin/sh\nexec {sys.executable} -m cowdisk "$@"\n')
        os.chmod(wrapper, stat.S_IRWXU)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("COWDISK_")} | {
            "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONPATH": os.path.join(REPO, "src"),
            "COWDISK_ROOT": self.root, "COWDISK_BACKEND": "copy", "HOME": self.home, "NO_COLOR": "1",
            "COWDISK_SOCKET": os.path.join(tmp, "no-daemon.sock")}

    def bash(self, script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", script], env=self.env, cwd=self.tmp, capture_output=True, text=True,
                              timeout=120)


@pytest.fixture
def scratch(tmp_path) -> Iterator[Scratch]:
    s = Scratch(str(tmp_path))
    image = tmp_path / "base.img"
    image.write_bytes(b"\0" * (1 << 20))
    p = s.bash(f"set -e; cowdisk -q template import {image} --name base; cowdisk -q volume create vm1 -t base; "
               "cowdisk -q volume create vm2 -t base")
    assert p.returncode == 0, p.stderr
    try:
        yield s
    finally:
        if os.path.exists(os.path.join(s.root, "registry.db")):
            with Store(s.root) as st:
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
def test_doc_example_runs(block: Block, scratch: Scratch) -> None:
    if block.kind == "run":
        p = scratch.bash("set -e -o pipefail\n" + block.body)
        assert p.returncode == 0, f"{block.where}: exit {p.returncode}\n{block.body}\nstdout:\n{p.stdout}\n" \
                                  f"stderr:\n{p.stderr}"
        return
    steps = _transcript(block.body)
    assert steps, block.where
    sep = "@@@ next command @@@"
    script = "".join(f"{cmd} 2>&1\n__s=$?; echo '{sep}'; (exit $__s)\n" for cmd, _ in steps)
    p = scratch.bash(script)
    outputs = p.stdout.replace(scratch.root, "/var/lib/cowdisk").split(sep + "\n")
    assert len(outputs) == len(steps) + 1, (block.where, p.stdout, p.stderr)
    for (cmd, want), got in zip(steps, outputs):
        assert got.rstrip() == want.rstrip(), f"{block.where}: $ {cmd}\nthe doc shows:\n{want}\nit printed:\n{got}"


def test_runnable_examples_are_there() -> None:
    """The run and transcript blocks this tier runs (so a marker cannot quietly vanish)."""
    where = {b.where.split(":")[0] for b in RUNNABLE}
    assert {"docs/cli.md", "docs/vmm.md"} <= where, where
    assert len(RUNNABLE) >= 4
