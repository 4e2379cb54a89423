"""Opening a store: the backend is checked before it is recorded, options are recorded
with it, and a refused first choice leaves the store free for another backend."""

from __future__ import annotations

import pytest

from cowdisk.errors import InvalidArgument, Unsupported
from cowdisk.kernel import fs
from cowdisk.store import Store

pytestmark = pytest.mark.root


def test_a_refused_first_backend_is_not_recorded(tmp_path) -> None:
    root = str(tmp_path / "store")
    if fs.reflink_support(str(tmp_path)).ok:
        pytest.skip(f"{tmp_path} can reflink: this test needs a filesystem that cannot")
    with pytest.raises(Unsupported) as ei:
        Store(root, backend="reflink")
    assert ei.value.op == "open store"
    with Store(root, backend="copy") as s:  # the hint's advice is taken, not refused
        assert s.backend_name == "copy" and s.registry.meta("backend") == "copy"
    with Store(root) as s:
        assert s.backend_name == "copy"
    with pytest.raises(InvalidArgument):
        Store(root, backend="pool")


def test_backend_options_are_checked_and_recorded(tmp_path) -> None:
    with pytest.raises(InvalidArgument) as ei:
        Store(str(tmp_path / "a"), backend="copy", backend_options={"pool": "x"})
    assert ei.value.op == "open store" and "pool" in str(ei.value)
    with Store(str(tmp_path / "b"), backend="copy") as s:
        assert s.registry.meta("backend_options") == "{}"
    with pytest.raises(InvalidArgument):
        Store(str(tmp_path / "b"), backend_options={"x": "1"})
