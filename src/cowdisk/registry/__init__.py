"""Durable state of one store in SQLite (WAL): templates, volumes, kernel objects, intents.

All SQL lives here. Only the store writes through this package. One connection per
thread; every write is one ``BEGIN IMMEDIATE`` transaction, so several processes and
threads can share a store. The schema has one version number and an ordered list of
migrations applied on open.

``engine.py``: the transaction engine (connections, writer locks, group commit, deferred
writes, migrations run on open); ``schema.py``: the schema version, its migrations and the
rows; ``tables.py``: :class:`Registry`, what is read and written. Every public name is
re-exported here.
"""

from __future__ import annotations

from ..model import VolumeState as VolumeState
from ..operations import (  # the allowed state changes, derived from the operations' declarations
    ATTACHED as ATTACHED,
    CHECKPOINTED as CHECKPOINTED,
    CHECKPOINTING as CHECKPOINTING,
    CREATING as CREATING,
    ERROR as ERROR,
    REMOVING as REMOVING,
    RESTORING as RESTORING,
    TRANSITIONS as TRANSITIONS,
)
from .engine import Engine as Engine, QuickCheckFailed as QuickCheckFailed, sqlite_kind as sqlite_kind
from .schema import (
    MIGRATIONS as MIGRATIONS,
    SCHEMA_VERSION as SCHEMA_VERSION,
    Intent as Intent,
    TemplateRow as TemplateRow,
    VolumeRow as VolumeRow,
)
from .tables import Registry as Registry
