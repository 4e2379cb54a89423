"""The package type-checks under ``mypy --strict`` (issue 14), so that users who check their
code against cowdisk's API get the truth; pyproject.toml's [tool.mypy] holds the settings and
the (shrinking) list of modules whose strict-mode errors their authors still owe."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_mypy_strict_is_clean(tmp_path) -> None:
    if shutil.which("mypy") is None and subprocess.run([sys.executable, "-m", "mypy", "--version"],
                                                       capture_output=True).returncode != 0:
        pytest.fail("mypy is missing: `pip install -e '.[test]'` (install.sh does) installs it")
    env = {**os.environ, "MYPYPATH": os.path.join(ROOT, "src")}
    p = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "mypy-cache"),
                        "-p", "cowdisk"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-2000:]
    assert "Success: no issues found" in p.stdout
