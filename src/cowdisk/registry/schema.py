"""The registry's tables: the schema's version and its migrations (applied in order on
open), and the rows as frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..model import VolumeState

SCHEMA_VERSION = 3

MIGRATIONS: list[list[str]] = [
    # version 1
    [
        """CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
        """CREATE TABLE templates (
            id TEXT PRIMARY KEY,
            path TEXT NOT NULL,
            size INTEGER NOT NULL,
            digest TEXT NOT NULL,
            mtime_ns INTEGER NOT NULL,
            ino INTEGER NOT NULL,
            owned INTEGER NOT NULL,
            source TEXT NOT NULL,
            created REAL NOT NULL,
            state TEXT NOT NULL DEFAULT 'ready'
        )""",
        """CREATE TABLE template_names (
            name TEXT PRIMARY KEY,
            template_id TEXT NOT NULL REFERENCES templates(id) ON DELETE CASCADE
        )""",
        """CREATE TABLE template_loops (
            template_id TEXT PRIMARY KEY REFERENCES templates(id) ON DELETE CASCADE,
            loop INTEGER NOT NULL,
            devno TEXT NOT NULL
        )""",
        """CREATE TABLE volumes (
            id TEXT PRIMARY KEY,
            template_id TEXT NOT NULL REFERENCES templates(id),
            backend TEXT NOT NULL,
            state TEXT NOT NULL,
            size INTEGER NOT NULL,
            data_path TEXT NOT NULL,
            device TEXT,
            created REAL NOT NULL,
            updated REAL NOT NULL,
            parent TEXT,
            error TEXT
        )""",
        """CREATE INDEX volumes_template ON volumes(template_id)""",
        """CREATE TABLE objects (
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            volume_id TEXT NOT NULL,
            created REAL NOT NULL,
            PRIMARY KEY (kind, name)
        )""",
        """CREATE TABLE links (
            path TEXT PRIMARY KEY,
            volume_id TEXT NOT NULL,
            target TEXT NOT NULL
        )""",
        """CREATE TABLE intents (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            op TEXT NOT NULL,
            volume_id TEXT,
            template_id TEXT,
            pid INTEGER NOT NULL,
            pid_start TEXT NOT NULL,
            started REAL NOT NULL,
            data TEXT NOT NULL DEFAULT '{}'
        )""",
    ],
    # version 2: a template's change time joins its quick identity check (ctime cannot be
    # set from user space, unlike mtime)
    [
        """ALTER TABLE templates ADD COLUMN ctime_ns INTEGER NOT NULL DEFAULT 0""",
    ],
    # version 3: owners. Every volume and template records the uid that made it (rows of an
    # older store: root, 0); a shared template is usable by every caller
    [
        """ALTER TABLE volumes ADD COLUMN owner INTEGER NOT NULL DEFAULT 0""",
        """ALTER TABLE templates ADD COLUMN owner INTEGER NOT NULL DEFAULT 0""",
        """ALTER TABLE templates ADD COLUMN shared INTEGER NOT NULL DEFAULT 0""",
        """CREATE INDEX volumes_owner ON volumes(owner)""",
    ],
]
assert len(MIGRATIONS) == SCHEMA_VERSION



@dataclass(frozen=True)
class TemplateRow:
    id: str
    path: str
    size: int
    digest: str
    mtime_ns: int
    ino: int
    owned: bool
    source: str
    created: float
    state: str
    names: tuple[str, ...] = ()
    ctime_ns: int = 0
    """0 for rows made before the change time was recorded: then it is not compared."""
    owner: int = 0
    """The uid that made it (root, 0, for rows of a store older than owners)."""
    shared: bool = False
    """Usable by every caller (only its owner and root change it)."""

    def visible_to(self, uid: int | None) -> bool:
        """Whether caller ``uid`` may see and use it (None: every caller, root's view)."""
        return uid is None or self.owner == uid or self.shared


@dataclass(frozen=True)
class VolumeRow:
    id: str
    template_id: str
    backend: str
    state: VolumeState
    size: int
    data_path: str
    device: str | None
    created: float
    updated: float
    parent: str | None
    error: str | None
    owner: int = 0
    """The uid that made it (root, 0, for rows of a store older than owners)."""


@dataclass(frozen=True)
class Intent:
    id: int
    op: str
    volume_id: str | None
    template_id: str | None
    pid: int
    pid_start: str
    started: float
    data: dict[str, Any] = field(default_factory=dict)
