"""SQLite errors are told apart by their result codes (``sqlite3.Error.sqlite_errorcode``),
never by their message text (issue 22 item 3): each case below is a real SQLite error,
and the ones whose message holds the words the old checks looked for ("locked", "full",
"malformed") are not what those words said."""

from __future__ import annotations

import errno
import sqlite3

import pytest

from cowdisk.errors import CowdiskError, KernelError, status_of
from cowdisk.registry import sqlite_kind
from cowdisk.store.core import _named_errors


def _error(db: str, *sql: str) -> sqlite3.Error:
    c = sqlite3.connect(db, isolation_level=None, timeout=0)
    try:
        for s in sql:
            c.execute(s)
    except sqlite3.Error as e:
        return e
    finally:
        c.close()
    raise AssertionError(f"{sql} did not fail")


def _full(db: str) -> sqlite3.Error:
    """A real SQLITE_FULL: the database may not grow past its page limit."""
    return _error(db, "CREATE TABLE t(x BLOB)", "PRAGMA max_page_count=8", *["INSERT INTO t VALUES (zeroblob(4096))"] * 20)


def test_kinds_by_code(tmp_path) -> None:
    db = str(tmp_path / "r.db")
    assert sqlite_kind(_full(db)) == "full"
    worded = _error(db, "SELECT full, locked, malformed FROM t")  # "no such column: full"
    assert "full" in str(worded) and sqlite_kind(worded) == "other"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        busy = _error(db, "BEGIN IMMEDIATE")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert "locked" in str(busy) and sqlite_kind(busy) == "busy"
    assert sqlite_kind(_error(db, "CREATE TABLE locked(x)", "CREATE TABLE locked(x)")) == "other"  # "table locked already exists"
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 300)
    assert sqlite_kind(_error(str(junk), "SELECT * FROM sqlite_master")) == "corrupt"


def test_a_full_registry_is_enospc_and_507(tmp_path) -> None:
    """A full registry is an ENOSPC of the operation on its object: exit 4, HTTP 507 (the
    daemon's status came from the words of a hint before)."""
    with pytest.raises(KernelError) as ei:
        with _named_errors("create volume", "vm1"):
            raise _full(str(tmp_path / "r.db"))
    e = ei.value
    assert e.errno == errno.ENOSPC and status_of(e) == 507 and e.exit_code == 4
    assert e.op == "create volume" and e.obj == "vm1" and "registry" in str(e)


def test_the_word_full_is_not_a_full_disk(tmp_path) -> None:
    with pytest.raises(CowdiskError) as ei:
        with _named_errors("create volume", "vm1"):
            raise _error(str(tmp_path / "r.db"), "SELECT full FROM sqlite_master")
    e = ei.value
    assert not isinstance(e, KernelError) and status_of(e) == 500 and "free space" not in e.hint
