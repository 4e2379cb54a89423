"""The one contract (issue 22): :class:`cowdisk.contract.StoreAPI` names every operation,
and the library's Store and the daemon's Client both keep it: each has every method
with the protocol's parameters (names, kinds, defaults, in order). mypy checks the
types (cowdisk.store.core and cowdisk.client assign their class to type[StoreAPI]); this
checks what mypy lets pass (an extra keyword, another default)."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from cowdisk.client import Client
from cowdisk.contract import StoreAPI
from cowdisk.store import Store

MEMBERS = sorted(n for n in dir(StoreAPI) if not n.startswith("_") or n in ("__enter__", "__exit__"))
PROPERTIES = {n for n in MEMBERS if isinstance(inspect.getattr_static(StoreAPI, n), property)}


def _params(fn: object) -> list[tuple[str, object, object]]:
    sig = inspect.signature(fn)  # type: ignore[arg-type]
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def test_the_protocol_names_the_operations() -> None:
    assert {"create_volume", "remove_volume", "checkpoint", "restore", "fork", "flatten", "build_template",
            "build_template_from_image", "import_template", "template_doc", "info", "space", "destroy_store",
            "recover", "gc", "jail", "root", "backend"} <= set(MEMBERS)


@pytest.mark.parametrize("cls", [Store, Client], ids=["Store", "Client"])
@pytest.mark.parametrize("name", MEMBERS)
def test_each_face_keeps_the_contract(cls: type, name: str) -> None:
    if name in PROPERTIES:
        return  # an instance attribute (Store) or a property (Client): mypy checks it
    assert hasattr(cls, name), f"{cls.__name__} has no {name} (StoreAPI names it)"
    want = _params(getattr(StoreAPI, name))
    got = _params(getattr(cls, name))
    assert got == want, f"{cls.__name__}.{name}{inspect.signature(getattr(cls, name))} is not " \
                        f"StoreAPI.{name}{inspect.signature(getattr(StoreAPI, name))}"


def test_a_missing_keyword_is_found() -> None:
    """The check above fails for a face that drops a keyword or changes a default."""
    class Drifted(Client):
        def gc(self) -> None:  # type: ignore[override]
            pass

        def remove_volume(self, vid: str, *, deadline_s: float = 1.0) -> None:
            pass

    for name in ("gc", "remove_volume"):
        assert _params(getattr(Drifted, name)) != _params(getattr(StoreAPI, name))


def test_client_imports_neither_the_daemon_nor_the_store() -> None:
    """cowdisk.client imports the contract, the model and the errors only: no daemon/, no
    store/ and nothing of SQLite or the kernel (it was 110-168 ms of imports)."""
    code = ("import sys, cowdisk.client; "
            "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('cowdisk') or m in "
            "('sqlite3', '_sqlite3', 'http.client', 'fastapi', 'pydantic'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["cowdisk", "cowdisk.client", "cowdisk.contract", "cowdisk.defaults", "cowdisk.errors",
                   "cowdisk.model", "cowdisk.progress"], out


def test_the_client_tells_a_jobs_first_stage() -> None:
    """A job's 202 answer has no stage yet; the first stage the next answer brings is told
    to ``progress`` (it was dropped: the push job's caller heard no stage at all), and each
    stage's last byte counts once."""
    from cowdisk.client import _feed

    heard: list[tuple[int, int, str]] = []
    told: list[tuple[str, int, int]] = []

    def progress(done: int, total: int, stage: str = "") -> None:
        heard.append((done, total, stage))

    _feed(progress, told, {"progress": {"stage": "", "done": 0, "total": 0}, "stages": []})
    _feed(progress, told, {"stages": [{"stage": "push", "done": 5, "total": 10}]})
    _feed(progress, told, {"stages": [{"stage": "push", "done": 10, "total": 10},
                                      {"stage": "manifest", "done": 0, "total": 0}]})
    assert heard == [(0, 0, "push"), (5, 10, ""), (10, 10, ""), (0, 0, "manifest")]
