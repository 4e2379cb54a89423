"""Test tiers, their markers, and the one backend-factory fixture the store suites share.

Tiers (the directory says which): ``tests/unit`` runs without root and without device
tools (marked neither ``root`` nor ``lab``; tests/host/test_unit_unprivileged.py runs it as
nobody); ``tests/host`` and ``tests/vmm`` need root (every test marked ``root``);
``tests/lab`` runs inside the kernel lab (_labplugin.py). Collection fails when a test's
markers disagree with its tier.

The suites in ``tests/suites/`` are test functions taking ``backend`` (a name from
testutil.HOST_BACKENDS or LAB_BACKENDS) and ``store`` (a fresh store for it, destroyed
afterwards, host left exactly as before, its volumes/ and links/ left empty by the test).
A tier's test file imports the suite functions; ``backend`` is parametrized here with the
tier's backends, narrowed by ``@pytest.mark.backends(...)`` on a test.
"""

import contextlib
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pytest

if TYPE_CHECKING:
    from cowdisk.store import Store

pytest.register_assert_rewrite("suites", "testutil", "faults")

pytest_plugins = ["_labplugin"] if os.path.exists(os.path.join(os.path.dirname(__file__), "_labplugin.py")) else []

TESTS = Path(__file__).resolve().parent
ROOT_TIERS = ("host", "vmm", "ceph")



def pytest_addoption(parser) -> None:
    parser.addoption("--fault-seed", default=None,
                     help="the seed every random fault harness draws from (sets $COWDISK_FAULT_SEED)")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "backends(*names): run this suite test only on these backends")
    seed = config.getoption("--fault-seed", None)
    if seed is not None:
        from faults.harness import SEED_ENV

        os.environ[SEED_ENV] = str(seed)


MIN_FREE_GIB = 8
"""What a whole run writes under its temp dir at most, with a margin (about 6 GiB of stores,
images and mkfs scratch; the Ceph cluster's OSD and the lab's disks beside it)."""


def pytest_sessionstart(session) -> None:
    """Scope the leak witness (testutil.host_state) to this session's temp dirs, and stop at
    once, saying so, when their filesystem cannot hold a run: on a full disk every tier fails
    in its own words (a Ceph monitor that never answers, a lab that cannot write its disk)."""
    base = str(session.config._tmp_path_factory.getbasetemp())
    os.environ["COWDISK_TEST_SCOPE"] = base
    st = os.statvfs(base)
    free = st.f_bavail * st.f_frsize
    in_lab = os.environ.get("COWDISK_IN_LAB") == "1"  # the lab's scratch disk is sized for its tier
    if free < MIN_FREE_GIB << 30 and not in_lab and not session.config.option.collectonly:
        pytest.exit(f"the tests need {MIN_FREE_GIB} GiB free under {base}, and its filesystem has "
                    f"{free / (1 << 30):.1f} GiB: free some space (df -h {base})", returncode=4)


def pytest_sessionfinish(session) -> None:
    """Leave nothing pytest cannot remove: a test that failed before its store's teardown
    leaves chattr +i template images, and pytest's own clean-up of old temp dirs then fails
    on them for good (those runs' gigabytes filled this machine's disk once). Clear the flag
    on every such file under this session's temp dir and name them in the report."""
    if os.geteuid() != 0:
        return
    from cowdisk.kernel import fs

    base = str(session.config._tmp_path_factory.getbasetemp())
    left = []
    for d, _, files in os.walk(base):
        for name in files:
            p = os.path.join(d, name)
            try:  # regular files only: a jail's device nodes and FIFOs are not opened
                if not stat.S_ISREG(os.lstat(p).st_mode):
                    continue
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                if fs.get_flags(fd) & fs.FS_IMMUTABLE_FL:
                    fs.set_immutable_fd(fd, False, p)
                    left.append(os.path.relpath(p, base))
            except OSError:
                pass
            finally:
                os.close(fd)
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if left and tr is not None:
        tr.write("\n")  # after the progress line's [100%]
        tr.write_line(f"tests left {len(left)} chattr +i file(s) under {base} (flag cleared): "
                      + ", ".join(sorted(left)[:10]), yellow=True)


def tier_of(path) -> str | None:
    """``unit``, ``host``, ``lab`` or ``vmm`` for a path under tests/, else None."""
    try:
        rel = Path(str(path)).resolve().relative_to(TESTS)
    except ValueError:
        return None
    return rel.parts[0] if len(rel.parts) > 1 else None


def _names_backend_itself(metafunc) -> bool:
    """The test parametrizes ``backend`` itself, or a fixture of that name exists for it."""
    if "backend" in metafunc._arg2fixturedefs:
        return True
    for m in metafunc.definition.iter_markers("parametrize"):
        names = m.args[0] if m.args else m.kwargs.get("argnames", ())
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        if "backend" in names:
            return True
    return False


def pytest_generate_tests(metafunc) -> None:
    if "backend" not in metafunc.fixturenames or _names_backend_itself(metafunc):
        return
    from testutil import CEPH_BACKENDS, HOST_BACKENDS, LAB_BACKENDS

    tier = tier_of(metafunc.definition.path)
    tier_backends = {"host": HOST_BACKENDS, "lab": LAB_BACKENDS, "ceph": CEPH_BACKENDS}.get(tier)
    if tier_backends is None:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: the backend fixture runs only under "
                                f"tests/host, tests/lab or tests/ceph, not {tier!r}")
    mark = metafunc.definition.get_closest_marker("backends")
    wanted = [b for b in tier_backends if mark is None or b in mark.args]
    if not wanted:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: none of its backends {mark.args} runs in "
                                f"tests/{tier} ({', '.join(tier_backends)}); do not import it there")
    metafunc.parametrize("backend", wanted)


NESTED_VMM_ENV = "COWDISK_NESTED_VMM"


def pytest_collection_modifyitems(config, items) -> None:
    """Enforce the tiers' markers (see the module docstring); leave out the tests marked
    ``nested_vmm`` (QEMU inside the kernel lab: minutes each) unless $COWDISK_NESTED_VMM=1."""
    if os.environ.get(NESTED_VMM_ENV) != "1":
        dropped = [it for it in items if it.get_closest_marker("nested_vmm")]
        if dropped:
            items[:] = [it for it in items if not it.get_closest_marker("nested_vmm")]
            config.hook.pytest_deselected(items=dropped)
    bad = []
    for it in items:
        tier = tier_of(it.path)
        marks = {m.name for m in it.iter_markers()}
        if tier in ROOT_TIERS and "root" not in marks:
            bad.append(f"{it.nodeid}: tests under tests/{tier} need root: mark them "
                       "(pytestmark = pytest.mark.root)")
        elif tier == "unit" and marks & {"root", "lab"}:
            bad.append(f"{it.nodeid}: tests under tests/unit run without root or the kernel lab, but it is "
                       f"marked {sorted(marks & {'root', 'lab'})}: move it to tests/host or tests/lab")
    if bad:
        raise pytest.UsageError("tests in the wrong tier:\n  " + "\n  ".join(bad))


# --------------------------------------------------------------------------- suite fixtures


@pytest.fixture
def store(backend: str, tmp_path) -> Iterator["Store"]:
    """A fresh store for ``backend``; the test must leave its volumes/ and links/ empty."""
    from testutil import backend_store, store_files

    with backend_store(backend, str(tmp_path)) as s:
        yield s
        left = store_files(s)
    assert left == [], f"the test left files in the store: {left}"


@pytest.fixture
def base(store, tmp_path):
    """The template ``base`` (testutil.make_tree) in ``store``."""
    from testutil import make_tree

    return store.build_template(make_tree(str(tmp_path / "tree")), "base")


@pytest.fixture
def immutable():
    """set_immutable(path) for the test; always cleared afterwards (or the tmp dir cannot go)."""
    from cowdisk.kernel import fs

    marked: list[str] = []

    def mark(path: str) -> None:
        if not fs.set_immutable(path, True):
            pytest.skip(f"{path}: the filesystem has no immutable flag")
        marked.append(path)

    try:
        yield mark
    finally:
        for p in reversed(marked):
            with contextlib.suppress(FileNotFoundError):  # the test removed it (flag cleared first)
                fs.set_immutable(p, False)
