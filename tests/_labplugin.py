"""pytest plugin: run the lab tier (device-mapper tests) inside the kernel lab, in one boot.

Loaded from tests/conftest.py (``pytest_plugins = ["_labplugin"]``).

Lab tests are the tests under ``tests/lab/`` and any test marked ``lab``.

* On the host (``COWDISK_IN_LAB`` unset) each selected lab test is replaced by a proxy item
  with the same node id and no fixtures. The kernel lab (lab/kernel_lab.py) boots once and
  runs all the selected lab tests inside it in one pytest process; each proxy then reports
  its own test's result. A test skipped inside the lab, or missing from the results, FAILS
  (lab tests must not skip silently). If the lab cannot boot, every lab proxy fails with
  the reason.
* When the session runs other tests too, the lab starts in the background as the test loop
  starts, the host's tests run beside it, and the proxies run last: the first waits for the
  lab and prints its output then. The lab's guest keeps about one host core busy (its tests run one at a
  time), so on a 2-core machine the two halves overlap instead of adding up.
  ``COWDISK_LAB_BACKGROUND=0`` runs it in the foreground at the first proxy, as before.
* Inside the lab (``COWDISK_IN_LAB=1``) lab tests run normally.

Options: ``--lab-timeout SECONDS`` (or ``COWDISK_LAB_TIMEOUT``; default 1800) bounds the run.
Fixtures: ``in_lab`` (bool) and ``lab_scratch`` (Path of the lab's scratch ext4 mount, or
None outside the lab). Helper: ``running_in_lab()``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shutil
import sys
import tempfile
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

LAB_DIR = Path(__file__).resolve().parent / "lab"
KERNEL_LAB = Path(__file__).resolve().parent.parent / "lab" / "kernel_lab.py"
DEFAULT_TIMEOUT = 30 * 60.0
LAB_SCRATCH = "8G"
"""The whole lab tier's scratch ext4 (a sparse file on the host): the tier's stores keep their
files until the session ends, and at 2G the later tests met the stores' own space checks
(past the 90% high-water mark, or under the 8 MiB reserve): 10 lab failures in one CI run."""


def running_in_lab() -> bool:
    """True inside the kernel lab's guest."""
    return os.environ.get("COWDISK_IN_LAB") == "1"


@pytest.fixture(scope="session")
def in_lab() -> bool:
    return running_in_lab()


@pytest.fixture(scope="session")
def lab_scratch() -> Path | None:
    """The lab's scratch directory (a real ext4 mount on a virtio disk), or None on the host."""
    p = os.environ.get("COWDISK_LAB_SCRATCH")
    return Path(p) if running_in_lab() and p else None


def pytest_addoption(parser):
    group = parser.getgroup("cowdisk-lab", "cowdisk kernel lab")
    group.addoption("--lab-timeout", type=float, default=None, metavar="SECONDS",
                    help="bound the kernel lab run (default $COWDISK_LAB_TIMEOUT or 1800)")


def is_lab_item(item) -> bool:
    try:
        in_dir = Path(str(item.path)).resolve().is_relative_to(LAB_DIR)
    except (AttributeError, OSError):
        in_dir = False
    return in_dir or item.get_closest_marker("lab") is not None


# --------------------------------------------------------------------------- results


def junit_key(nodeid: str) -> tuple[str, str]:
    """(classname, name) that pytest's junitxml writes for a node id (mangle_test_address)."""
    path, bracket, params = nodeid.partition("[")
    names = path.split("::")
    names[0] = re.sub(r"\.py$", "", names[0].replace("/", "."))
    names[-1] += bracket + params
    return ".".join(names[:-1]), names[-1]


@dataclass
class LabOutcome:
    outcome: str  # passed, failed, skipped, xfailed, missing, laberror
    text: str = ""


def parse_junit(path: str | os.PathLike) -> dict[tuple[str, str], LabOutcome]:
    """Per-testcase outcomes from a pytest junit XML file, keyed by (classname, name)."""
    res: dict[tuple[str, str], LabOutcome] = {}
    root = ET.parse(path).getroot()
    for tc in root.iter("testcase"):
        key = (tc.get("classname", ""), tc.get("name", ""))
        out = LabOutcome("passed")
        texts = []
        for child in tc:
            msg = child.get("message", "")
            body = (child.text or "").strip()
            if child.tag in ("failure", "error"):
                out.outcome = "failed"
                texts.append(f"[{child.tag}] {msg}\n{body}".strip())
            elif child.tag == "skipped" and out.outcome == "passed":
                out.outcome = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
                texts.append(msg or body)
            elif child.tag in ("system-out", "system-err") and body:
                texts.append(f"--- captured {child.tag[7:]} (in the lab) ---\n{body}")
        out.text = "\n".join(texts)
        if key in res and res[key].outcome != "passed":
            continue
        res[key] = out
    return res


def outcome_for(nodeid: str, results: dict[tuple[str, str], LabOutcome] | None,
                lab_error: str | None) -> LabOutcome:
    if lab_error:
        return LabOutcome("laberror", lab_error)
    assert results is not None
    r = results.get(junit_key(nodeid))
    if r is None:
        return LabOutcome("missing", f"{nodeid} is missing from the kernel lab's results")
    return r


# --------------------------------------------------------------------------- host side


def load_kernel_lab():
    """lab/kernel_lab.py as a module (it is a script, not part of the package)."""
    name = "cowdisk_kernel_lab"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, KERNEL_LAB)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {KERNEL_LAB}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses need the module registered while it executes
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


class LabFailure(Exception):
    pass


class LabRun:
    """Runs all selected lab tests in one kernel lab boot, once."""

    def __init__(self, config, nodeids: list[str]):
        self.config = config
        self.nodeids = nodeids
        self.done = False
        self.results: dict[tuple[str, str], LabOutcome] | None = None
        self.error: str | None = None
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._log: io.BufferedRandom | None = None  # the lab's output while in the background

    def timeout(self) -> float:
        t = self.config.getoption("lab_timeout")
        if t is None:
            t = float(os.environ.get("COWDISK_LAB_TIMEOUT") or DEFAULT_TIMEOUT)
        return t

    def start(self) -> None:
        """Run the lab in a background thread, its output kept until ``ensure`` shows it."""
        if self.done or self._thread is not None:
            return
        self._log = tempfile.TemporaryFile(prefix="cowdisk-lab-out-")
        self._thread = threading.Thread(target=self._guarded, name="cowdisk-lab", daemon=True)
        self._thread.start()

    def ensure(self) -> None:
        """The lab's results: wait for the background run (showing its output), or run it now."""
        if self._thread is not None:
            if not self.done:
                self.done = True
                self._thread.join()
                self._show_log()
            return
        if self.done:
            return
        self.done = True
        self._guarded()

    def cancel(self) -> None:
        """End a background run nobody waited for (the session stopped early): QEMU killed."""
        if self._thread is not None and self._thread.is_alive():
            self._cancel.set()
            self._thread.join()

    def _guarded(self) -> None:
        try:
            self._run()
        except Exception as e:  # the lab itself broke: every proxy fails with this reason
            self.error = f"kernel lab failed: {type(e).__name__}: {e}"

    def _show_log(self) -> None:
        if self._log is None:
            return
        capman = self.config.pluginmanager.getplugin("capturemanager")
        with capman.global_and_fixture_disabled():
            self._log.seek(0)
            sys.stdout.write("\n")
            sys.stdout.flush()
            shutil.copyfileobj(self._log, sys.stdout.buffer)
            sys.stdout.flush()
        self._log.close()
        self._log = None

    def _line(self, text: str) -> None:
        """A status line: on the terminal, or into the background run's log."""
        if self._log is not None:
            self._log.write(f"{text}\n".encode())
            return
        capman = self.config.pluginmanager.getplugin("capturemanager")
        tw = self.config.get_terminal_writer()
        with capman.global_and_fixture_disabled():
            tw.line(text, bold=True)
            sys.stdout.flush()

    def _run(self) -> None:
        kl = load_kernel_lab()
        tmp = tempfile.mkdtemp(prefix="cowdisk-lab-pytest-")
        try:
            junit = os.path.join(tmp, "junit.xml")
            argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                    f"--junitxml={junit}", "-o", "junit_logging=all", "-o", "junit_family=xunit1"]
            if self.config.inipath:
                argv += ["-c", str(self.config.inipath)]
            argv += ["--rootdir", str(self.config.rootpath), *self.nodeids]
            log = self._log  # the background run's; None: the terminal, capture off while it runs
            self._line(f"\n[cowdisk-lab] running {len(self.nodeids)} lab test(s) in the kernel lab"
                       f"{' in the background' if log is not None else ''} (one boot, timeout {self.timeout():.0f}s)")
            capman = self.config.pluginmanager.getplugin("capturemanager")
            with contextlib.nullcontext() if log is not None else capman.global_and_fixture_disabled():
                res = kl.run_in_lab(argv, cwd=str(self.config.rootpath), timeout=self.timeout(),
                                    out=log if log is not None else sys.stdout.buffer, scratch_size=LAB_SCRATCH,
                                    cancel=self._cancel)
            boot = f"{res.boot_seconds:.1f}s" if res.boot_seconds is not None else "n/a"
            self._line(f"[cowdisk-lab] {res.status}: exit status {res.returncode}, boot {boot}, "
                       f"total {res.total_seconds:.1f}s")
            if not res.ok:
                tail = "" if res.started else f"\n--- last console output ---\n{res.output_tail[-3000:]}"
                raise LabFailure(f"{res.message}{tail}")
            if not os.path.exists(junit):
                raise LabFailure(f"the lab's pytest (exit status {res.returncode}) wrote no results")
            self.results = parse_junit(junit)
            if res.returncode not in (0, 1):
                self._rc_note = f"\nthe lab's pytest exited with status {res.returncode}"
            # Failures not tied to a requested test (e.g. collection errors) explain missing ones.
            wanted = {junit_key(n) for n in self.nodeids}
            extra = [f"{'::'.join(x for x in k if x)}: {o.text}" for k, o in self.results.items()
                     if k not in wanted and o.outcome == "failed"]
            if extra:
                self._rc_note += "\nother errors in the lab run:\n" + "\n".join(extra)[-4000:]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    _rc_note = ""


class LabProxyItem(pytest.Item):
    """Stands in on the host for a lab test; reports that test's result from the lab run."""

    def __init__(self, *, labrun: LabRun, location, **kw):
        super().__init__(**kw)
        self._labrun = labrun
        self._loc = location

    def reportinfo(self):
        return self._loc

    def runtest(self) -> None:
        run = self._labrun
        run.ensure()
        r = outcome_for(self.nodeid, run.results, run.error)
        if r.outcome == "passed":
            return
        if r.outcome == "xfailed":
            pytest.xfail(f"xfailed in the kernel lab: {r.text}")
        if r.outcome == "skipped":
            raise LabFailure(f"SKIPPED inside the kernel lab (lab tests must not skip): {r.text}")
        if r.outcome == "missing":
            raise LabFailure(r.text + run._rc_note)
        if r.outcome == "failed":
            raise LabFailure(f"FAILED inside the kernel lab:\n{r.text}")
        raise LabFailure(r.text)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, LabFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    if running_in_lab():
        return
    lab_items = [it for it in items if is_lab_item(it)]
    if not lab_items:
        return
    labrun = LabRun(config, [it.nodeid for it in lab_items])
    config.stash[_LABRUN_KEY] = labrun
    for i, it in enumerate(items):
        if not is_lab_item(it):
            continue
        proxy = LabProxyItem.from_parent(it.parent, name=it.name, labrun=labrun,
                                         location=it.reportinfo())
        if proxy.nodeid != it.nodeid:  # would not match the lab's results
            raise pytest.UsageError(f"lab proxy node id {proxy.nodeid} != {it.nodeid}")
        proxy.own_markers = list(it.own_markers)
        proxy.keywords.update(it.keywords)
        items[i] = proxy
    if background(items):  # the lab's results are waited for last: everything else runs beside it
        items[:] = [it for it in items if not isinstance(it, LabProxyItem)] + \
            [it for it in items if isinstance(it, LabProxyItem)]


def background(items) -> bool:
    """Run the lab beside the host's tests: there are some, and $COWDISK_LAB_BACKGROUND is not 0."""
    return os.environ.get("COWDISK_LAB_BACKGROUND") != "0" and not all(isinstance(it, LabProxyItem) for it in items)


_LABRUN_KEY = pytest.StashKey[LabRun]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    """Start the lab in the background when the session has host tests to run beside it."""
    run = session.config.stash.get(_LABRUN_KEY, None)
    if run is not None and not session.config.option.collectonly and background(session.items):
        run.start()  # else the first proxy runs it in the foreground
    return None


def pytest_sessionfinish(session):
    run = session.config.stash.get(_LABRUN_KEY, None)
    if run is not None:
        run.cancel()
