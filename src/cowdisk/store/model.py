"""What the store hands its callers: templates, volumes and recovery reports as plain data,
and the rules for the ids callers choose."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgument

if TYPE_CHECKING:  # annotations only: importing the model does not import the registry (SQLite)
    from ..registry import TemplateRow, VolumeState

DEFAULT_ROOT = "/var/lib/cowdisk"
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+:=@-]*$")
MAX_ID = 64


def default_root() -> str:
    return os.environ.get("COWDISK_ROOT") or DEFAULT_ROOT


def validate_id(vid: str, what: str = "volume id") -> str:
    """Volume ids end up in dm names and paths: allow only a safe charset and length.
    The error's ``obj`` is ``repr(vid)``: the id as given, whitespace and NULs visible."""
    if not isinstance(vid, str) or not vid:
        raise InvalidArgument(f"invalid {what} {vid!r}: empty", op="validate id", obj=repr(vid))
    if len(vid.encode()) > MAX_ID:
        raise InvalidArgument(f"invalid {what} {vid!r}: longer than {MAX_ID} bytes", op="validate id",
                              obj=repr(vid))
    if not ID_RE.match(vid) or ".." in vid:
        raise InvalidArgument(
            f"invalid {what} {vid!r}: use letters, digits and _ . + : = @ -, starting with a letter or "
            "digit (no '/', '..', whitespace or NUL)", op="validate id", obj=repr(vid))
    return vid


MAX_FORK = 1000
"""The most children one fork makes."""


def fork_ids(vid: str, new_ids: list[str] | tuple[str, ...], count: int | None, prefix: str | None) -> list[str]:
    """The children of a fork of ``vid``: ``new_ids`` as given, or ``count`` ids named
    ``<prefix><n>`` (n from 1; ``prefix`` defaults to ``<vid>-``). Each checked; none may
    repeat or name the source."""
    op = "fork volume"
    if count is not None:
        if new_ids:
            raise InvalidArgument(f"fork volume {vid}: give new ids or a count, not both", op=op, obj=vid)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_FORK:
            raise InvalidArgument(f"fork volume {vid}: count {count!r} is not between 1 and {MAX_FORK}", op=op,
                                  obj=vid)
        pfx = f"{vid}-" if prefix is None else prefix
        ids = [f"{pfx}{i}" for i in range(1, count + 1)]
    elif prefix is not None:
        raise InvalidArgument(f"fork volume {vid}: a prefix names the children of a count", op=op, obj=vid,
                              hint="give a count with the prefix")
    else:
        ids = list(new_ids)
    if not ids:
        raise InvalidArgument(f"fork volume {vid}: no new volume ids", op=op, obj=vid)
    if len(ids) > MAX_FORK:
        raise InvalidArgument(f"fork volume {vid}: {len(ids)} children, more than {MAX_FORK}", op=op, obj=vid)
    for n in ids:
        validate_id(n, "new volume id")
    if len(set(ids)) != len(ids) or vid in ids:
        raise InvalidArgument(f"fork volume {vid}: the new ids repeat or name the source", op=op, obj=vid)
    return ids


HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def hostname_of(prefix: str | None, vid: str) -> str:
    """The hostname a fork's child ``vid`` gets with ``reset_identity``: ``<prefix><vid>``,
    checked (RFC 1123 labels, at most 253 characters)."""
    name = f"{prefix or ''}{vid}"
    if len(name) > 253 or not HOSTNAME_RE.match(name):
        raise InvalidArgument(f"fork volume: hostname {name!r} for {vid} is not a valid hostname", op="fork volume",
                              obj=vid, hint="letters, digits and '-' in dot-separated labels; choose other ids "
                                            "or another hostname prefix")
    return name


@dataclass(frozen=True)
class Template:
    id: str
    names: tuple[str, ...]
    path: str
    size: int
    digest: str
    source: str
    created: float
    state: str
    users: tuple[str, ...] = ()

    @classmethod
    def of(cls, row: TemplateRow, users: list[str]) -> "Template":
        return cls(row.id, row.names, row.path, row.size, row.digest, row.source, row.created, row.state,
                   tuple(users))

    def as_dict(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["names"] = list(self.names)
        d["users"] = list(self.users)
        return d


@dataclass(frozen=True)
class Volume:
    id: str
    template_id: str
    backend: str
    state: VolumeState
    size: int
    device: str | None
    link: str
    data_path: str
    created: float
    parent: str | None
    error: str | None
    links: tuple[str, ...] = ()
    """Every stable link that leads to the volume: its own first (while it is attached), then
    the links of the sources a ``restore --as`` retargeted to it."""

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["state"] = self.state.value
        d["links"] = list(self.links)
        return d


@dataclass
class RecoveryReport:
    rolled_back: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    reactivated: list[str] = field(default_factory=list)
    orphans_removed: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    """Volumes and templates the registry had lost, registered again from their manifests."""
    quarantined: list[str] = field(default_factory=list)
    """Data the registry does not account for, moved aside (never deleted by recovery)."""
    kept: list[str] = field(default_factory=list)
    in_quarantine: list[str] = field(default_factory=list)
    """What the quarantine holds after this pass (``cowdisk gc --purge`` deletes it)."""
    errors: list[str] = field(default_factory=list)

    @property
    def actions(self) -> int:
        return (len(self.rolled_back) + len(self.finished) + len(self.reactivated) + len(self.orphans_removed)
                + len(self.quarantined) + len(self.adopted))

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)
