"""What the command line imports to start (issue 22, item 4): a command imports what it
runs and no more. Which modules, not how long (bench/startup.py measures the time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")

PROBE = """
import sys
from cowdisk.cli import main
code = main(sys.argv[2:])
modules = sorted(sys.modules)
import json
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "modules": modules}, f)
"""

HEAVY = ("rich", "sqlite3", "ctypes", "importlib.metadata", "cowdisk.store.core", "cowdisk.registry",
         "cowdisk.backends", "cowdisk.kernel.libc", "cowdisk.kernel.dm", "cowdisk.kernel.loop", "cowdisk.kernel.fs",
         "cowdisk.client", "cowdisk.drive", "cowdisk.daemon", "cowdisk.cache", "cowdisk.doctor")
"""Nothing a bare start needs: the store and what is under it, rich, the client, metadata
(kernel.procfs, os and stat only, is light: store.manifest uses it)."""


def _imported(tmp_path, *args: str) -> tuple[int, set[str]]:
    out = tmp_path / "modules.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COWDISK_")} | {"PYTHONPATH": SRC}
    subprocess.run([sys.executable, "-c", PROBE, str(out), *args], env=env, check=True, timeout=60,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    doc = json.loads(out.read_text())
    return doc["code"], set(doc["modules"])


def _heavy(mods: set[str]) -> list[str]:
    return sorted(m for m in mods if any(m == h or m.startswith(h + ".") for h in HEAVY))


def test_version_imports_click_and_the_root_only(tmp_path) -> None:
    code, mods = _imported(tmp_path, "--version")
    assert code == 0
    assert _heavy(mods) == []
    ours = {m for m in mods if m.startswith("cowdisk")}
    assert ours <= {"cowdisk", "cowdisk.errors", "cowdisk.progress", "cowdisk.units", "cowdisk.store",
                    "cowdisk.defaults", "cowdisk.cli", "cowdisk.cli.app", "cowdisk.cli.base", "cowdisk.cli.light",
                    "cowdisk.cli.root"}, sorted(ours)
    assert "cowdisk.cli.lists" not in mods and "cowdisk.model" not in mods  # the light path's listings: not for this
    assert not {"json", "traceback", "dataclasses", "logging"} & mods  # the model's dataclasses, JSON: when a command needs them
    assert not {"cowdisk.cli.volumes", "cowdisk.cli.templates", "cowdisk.cli.serve", "cowdisk.cli.demo"} & mods


def test_a_listing_without_a_store_imports_no_store(tmp_path) -> None:
    """`volume ls` on a root with no store: its command module, no store, no rich (stdout is
    not a terminal), not the drive module of `volume drive`."""
    code, mods = _imported(tmp_path, "--root", str(tmp_path / "none"), "volume", "ls")
    assert code == 0
    assert _heavy(mods) == []
    assert "cowdisk.cli.volumes" in mods and "cowdisk.cli.admin" not in mods
    assert "logging" not in mods  # only with -v
