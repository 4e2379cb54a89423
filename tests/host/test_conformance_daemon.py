"""The library's conformance suite (suites/conformance.py) run through the daemon: its
``store`` is a :class:`cowdisk.client.Client` of a real cowdiskd serving a copy store
(issue 22: the client keeps the Store's contract in behaviour, not only in signatures).
One daemon for the module; each test leaves no volume, as the suite requires; its
templates are removed after it."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterator

import pytest

from cowdisk.client import Client
from cowdisk.store import Store
from daemonutil import Daemon
from suites.conformance import (  # noqa: F401  (collected here, on the daemon's store)
    test_bad_input,
    test_fork_flatten_usage,
    test_larger_volume,
    test_lifecycle,
    test_restore_new_id,
)
from testutil import assert_same_host, host_state

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    top = tempfile.mkdtemp(prefix="cdconf-", dir="/tmp")
    root = os.path.join(top, "store")
    Store(root, backend="copy").close()
    try:
        with Daemon(root, os.path.join(top, "d.sock"), "--import-root", str(tmp_path_factory.getbasetemp()),
                    backend="copy") as d:
            d.start()
            yield d
            assert d.stop() == 0, d.log()
    finally:
        with Store(root) as s:
            s.destroy()
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def backend() -> str:
    return "copy"


@pytest.fixture
def store(daemon: Daemon) -> Iterator[Client]:
    before = host_state()
    with Client(daemon.sock, timeout=120) as c:
        yield c
        assert c.volumes() == [], "the test left volumes"
        assert os.listdir(os.path.join(daemon.root, "volumes")) == []
        for t in c.templates():  # (a fresh store per test on the library's side)
            c.remove_template(t.id)
    assert_same_host(before)
