"""Each backend class declares (names among its bases) exactly the optional features it
implements (issue 22 item 7): the store asks ``isinstance(backend, Feature)``, so a class
that has a feature's methods without declaring it, or declares it without them (or with
other signatures: dm-thin's ``grow`` is not the pool's), would be served wrongly."""

from __future__ import annotations

import inspect

import pytest

from cowdisk.backends import BACKENDS, FEATURES, backend_class


def _members(feature: type) -> list[str]:
    names = {n for n in vars(feature) if not n.startswith("_")} | set(getattr(feature, "__annotations__", {}))
    return sorted(names)


def _params(fn: object) -> list[tuple[str, object, bool]]:
    return [(p.name, p.kind, p.default is inspect.Parameter.empty) for p in inspect.signature(fn).parameters.values()]  # type: ignore[arg-type]


def _implements(cls: type, feature: type) -> bool:
    """The class has every member of the feature itself (not only through the protocol
    base), methods with the protocol's parameters."""
    for name in _members(feature):
        owner = next((k for k in cls.__mro__ if name in vars(k) or name in getattr(k, "__annotations__", {})), None)
        if owner is None or owner in FEATURES:
            return False
        proto = vars(feature).get(name)
        if callable(proto) and _params(getattr(cls, name)) != _params(proto):
            return False
    return True


@pytest.mark.parametrize("name", BACKENDS)
def test_backend_declares_exactly_what_it_implements(name: str) -> None:
    cls = backend_class(name)
    declared = {f.__name__ for f in FEATURES if f in cls.__mro__}
    implemented = {f.__name__ for f in FEATURES if _implements(cls, f)}
    assert declared == implemented, f"{name}: declares {sorted(declared)}, implements {sorted(implemented)}"


def test_features_are_where_the_docs_say() -> None:
    """The expected map, written once: a feature lost or gained by a backend shows here."""
    got = {n: sorted(f.__name__ for f in FEATURES if f in backend_class(n).__mro__) for n in BACKENDS}
    assert got == {
        "dm-thin": ["HoldsTemplates", "LazyOrigin", "OpenCount", "OwnSpace", "PreparesCopies", "Thaw", "WatchesSpace"],
        "dm-snapshot": ["LazyOrigin", "OpenCount", "Thaw"],
        "reflink": ["RecordsAhead"],
        "pool": ["GrowsPool", "RecordsAhead"],
        "copy": ["CopiesData", "RecordsAhead"],
        "rbd": ["Shared"],
    }
