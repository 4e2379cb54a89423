"""The unit tier really runs without root: ``pytest tests/unit`` as nobody passes.

The checkout is copied to a directory nobody can read (pytest's own temp dirs are
private to root), HOME is a fresh directory nobody owns, and all supplementary groups
are dropped (setpriv). When this interpreter lives where nobody cannot reach it (pyenv
under /root, mode 0700), its installation is bind-mounted at a readable path inside a
private mount namespace, which goes away with the run: nothing to clean on the host.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

NOBODY = 65534
CHECKOUT = Path(__file__).resolve().parents[2]
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def as_nobody(argv: list[str], cwd: str, home: str, env: dict[str, str] | None = None,
              binds: list[tuple[str, str]] = ()) -> subprocess.CompletedProcess[str]:
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
           "env", "-i", f"HOME={home}", f"PATH={PATH}", "LANG=C.UTF-8",
           *(f"{k}={v}" for k, v in (env or {}).items()), *argv]
    if binds:
        mounts = " && ".join(f'mount --bind "{src}" "{dst}"' for src, dst in binds)
        cmd = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-ec",
               f'{mounts} && exec "$@"', "as-nobody", *cmd]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)


def python_for_nobody(work: str, home: str) -> tuple[list[str], dict[str, str], list[tuple[str, str]]]:
    """(python argv, env, bind mounts) that run this interpreter, with pytest, as nobody."""
    probe = [sys.executable, "-c", "import pytest"]
    if as_nobody(probe, work, home).returncode == 0:
        return [sys.executable], {}, []
    base = os.path.realpath(sys.base_prefix)
    exe = os.path.realpath(sys.executable)
    if not exe.startswith(base + os.sep):
        pytest.fail(f"nobody cannot run {sys.executable}, and it is not under {base} to bind-mount")
    binds, env = [(base, os.path.join(work, "py"))], {}
    python = os.path.join(work, "py", os.path.relpath(exe, base))
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    if libdir.startswith(base + os.sep):  # a shared libpython found through an absolute rpath
        env["LD_LIBRARY_PATH"] = os.path.join(work, "py", os.path.relpath(libdir, base))
    if os.path.realpath(sys.prefix) != base:  # a virtual environment: its site-packages too
        binds.append((os.path.realpath(sys.prefix), os.path.join(work, "venv")))
        purelib = os.path.realpath(sysconfig.get_paths()["purelib"])
        env["PYTHONPATH"] = os.path.join(work, "venv", os.path.relpath(purelib, os.path.realpath(sys.prefix)))
    for _, dst in binds:
        os.mkdir(dst)
    return [python], env, binds


def test_unit_tier_passes_as_nobody() -> None:
    work = tempfile.mkdtemp(prefix=f"cowdisk-test-{os.getpid()}-unpriv-")
    try:
        os.chmod(work, 0o755)
        ignore = shutil.ignore_patterns("__pycache__", ".pytest_cache", "*.pyc")
        for d in ("src", "tests", "lab", "docs", "bench", "contrib"):  # docs and the rest: tests/unit/test_docs.py
            shutil.copytree(CHECKOUT / d, os.path.join(work, d), ignore=ignore, symlinks=True)
        for f in ("pyproject.toml", "README.md"):
            shutil.copy(CHECKOUT / f, work)
        home = os.path.join(work, "home")
        os.mkdir(home)
        os.chown(home, NOBODY, NOBODY)
        python, env, binds = python_for_nobody(work, home)

        who = as_nobody([*python, "-c", "import os; print(os.getuid(), os.geteuid(), os.getgroups())"],
                        work, home, env, binds)
        assert who.returncode == 0, who.stderr
        assert who.stdout.split("\n")[0] == f"{NOBODY} {NOBODY} []", who.stdout

        r = as_nobody([*python, "-m", "pytest", "-q", "tests/unit", "-p", "no:cacheprovider",
                       f"--basetemp={os.path.join(home, 'basetemp')}"], work, home, env, binds)
        tail = (r.stdout + r.stderr)[-4000:]
        assert r.returncode == 0, tail
        assert " passed" in r.stdout.splitlines()[-1], tail
    finally:
        shutil.rmtree(work, ignore_errors=True)
