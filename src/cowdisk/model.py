"""What every face of the store hands its callers, as plain data: templates, volumes, their
states, recovery reports, usage, space, shared volumes; and the rules for the ids callers
choose.

The library (:mod:`cowdisk.store`), the daemon and its client (:mod:`cowdisk.client`) all
give these same types, so this module imports nothing of the store, the registry or the
kernel: the client imports it in a few milliseconds.
"""

from __future__ import annotations

import enum
import re
from typing import Any, NamedTuple


from .defaults import DEFAULT_ROOT as DEFAULT_ROOT, default_root as default_root  # the CLI reads them alone
from .errors import InvalidArgument


class VolumeState(enum.StrEnum):
    """A volume's state. Operations come in trying/done pairs (containerd's devmapper
    ``DeviceState``): the trying state is committed with the operation's intent before
    the kernel is touched, the done state with the end of the intent."""

    CREATING = "creating"  # trying: create, restore as a new id, fork (done: attached)
    ATTACHED = "attached"
    CHECKPOINTING = "checkpointing"  # trying: checkpoint (done: checkpointed)
    CHECKPOINTED = "checkpointed"
    RESTORING = "restoring"  # trying: restore in place (done: attached)
    REMOVING = "removing"  # trying: remove (done: the row is gone)
    ERROR = "error"  # recovery could not bring it back; a person looks, `volume rm` clears it


ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+:=@-]*$")
MAX_ID = 64


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


class Template(NamedTuple):
    id: str
    names: tuple[str, ...]
    path: str
    size: int
    digest: str
    source: str
    created: float
    state: str
    users: tuple[str, ...] = ()
    """The caller's volumes over it (root: every volume over it)."""
    owner: int = 0
    """The uid that made it (or root handed it to)."""
    shared: bool = False
    """Usable by every caller, not only its owner."""

    def as_dict(self) -> dict[str, Any]:
        d = self._asdict()
        d["names"] = list(self.names)
        d["users"] = list(self.users)
        return d


class Volume(NamedTuple):
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
    owner: int = 0
    """The uid that made it (or root handed it to); only it and root see it."""

    def as_dict(self) -> dict[str, Any]:
        d = self._asdict()
        d["state"] = self.state.value
        d["links"] = list(self.links)
        return d


class RecoveryReport:
    """What a recovery or ``gc`` pass did, as lists of the volumes, templates and objects
    each action touched. Mutable (the pass appends as it goes), so a plain class and not a
    named tuple; ``FIELDS`` names its lists in the document's order."""

    FIELDS = ("rolled_back", "finished", "reactivated", "orphans_removed", "adopted", "quarantined", "kept",
              "in_quarantine", "errors")
    _fields = FIELDS  # the name the named tuples of this module give their fields (client.py reads it)

    rolled_back: list[str]
    finished: list[str]
    reactivated: list[str]
    orphans_removed: list[str]
    adopted: list[str]
    """Volumes and templates the registry had lost, registered again from their manifests."""
    quarantined: list[str]
    """Data the registry does not account for, moved aside (never deleted by recovery)."""
    kept: list[str]
    in_quarantine: list[str]
    """What the quarantine holds after this pass (``cowdisk gc --purge`` deletes it)."""
    errors: list[str]

    def __init__(self, **lists: list[str]) -> None:
        unknown = sorted(set(lists) - set(self.FIELDS))
        if unknown:
            raise TypeError(f"RecoveryReport: unknown field(s) {', '.join(unknown)}")
        for name in self.FIELDS:
            setattr(self, name, list(lists.get(name, ())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RecoveryReport) and self.as_dict() == other.as_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"RecoveryReport({', '.join(f'{k}={v!r}' for k, v in self.as_dict().items())})"

    @property
    def actions(self) -> int:
        return (len(self.rolled_back) + len(self.finished) + len(self.reactivated) + len(self.orphans_removed)
                + len(self.quarantined) + len(self.adopted))

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.FIELDS}


class Usage(NamedTuple):
    """What a volume costs. ``disk_bytes`` is real allocation (st_blocks), not apparent size."""

    disk_bytes: int
    apparent_bytes: int
    exclusive_bytes: int | None = None
    shared_bytes: int | None = None
    cow_used_bytes: int | None = None
    cow_total_bytes: int | None = None
    health: str = "ok"

    @property
    def own_bytes(self) -> int:
        """What this volume alone costs on disk: its exclusive bytes where blocks can be
        shared (reflink), else its allocated bytes (a COW file, a copy)."""
        return self.exclusive_bytes if self.exclusive_bytes is not None else self.disk_bytes

    def as_dict(self) -> dict[str, Any]:
        d = self._asdict()
        d["own_bytes"] = self.own_bytes
        return d


class Space(NamedTuple):
    """One area a store's writes fill, and how full it is: the filesystem holding the
    data, and a backend's own (dm-thin's pool data and metadata, the embedded xfs pool).
    ``state`` is ``ok`` or what the kernel says instead (a thin pool ``out_of_data_space``,
    ``read_only``, ``needs_check``)."""

    area: str
    used_bytes: int
    total_bytes: int
    state: str = "ok"
    detail: str = ""
    grows: bool = False
    """The backend grows this area itself when it fills (a thin pool on files): the store's
    admission control looks at the filesystem under it instead."""

    @property
    def pct(self) -> float:
        return 100.0 * self.used_bytes / self.total_bytes if self.total_bytes else 0.0

    def as_dict(self) -> dict[str, object]:
        return {"area": self.area, "used_bytes": self.used_bytes, "total_bytes": self.total_bytes,
                "pct": round(self.pct, 1), "state": self.state, "detail": self.detail}



class SpaceEvent(NamedTuple):
    """What a backend's space monitor saw and did (dm-thin: ``watch_space``): ``event`` is
    ``grown`` (the pool was extended while guests wrote), ``full`` (out of space and it
    cannot grow: writes wait), ``failing_io`` (still full after the bound: writes now fail),
    ``ok`` (space again after ``full``/``failing_io``) or ``gone`` (the pool was removed:
    the monitor ends). ``reason`` says why it could not grow; ``volumes``: the attached
    volumes whose writes land in that area."""

    area: str
    pool: str
    event: str
    used_bytes: int
    total_bytes: int
    reason: str = ""
    volumes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {"area": self.area, "pool": self.pool, "event": self.event, "used_bytes": self.used_bytes,
                "total_bytes": self.total_bytes, "reason": self.reason, "volumes": list(self.volumes)}

class SharedVolume(NamedTuple):
    """A volume as the shared place (a Ceph pool) records it, whichever store made it."""

    id: str
    size: int
    template_id: str
    template_digest: str
    """The template's full sha256 ("" when its image does not record it)."""
    template_size: int
    owner: str
    """``<store tag>@<host>`` of the store whose registry governs the volume, once a store
    adopted it ("": the store that made it, the only one whose registry has it)."""
    holder: str
    """``<store tag>@<host>`` of the store that has it attached ("" when none does)."""
    clients: tuple[str, ...] = ()
    """Addresses of the clients that have it open right now (a VMM, a mapping daemon)."""

    def as_dict(self) -> dict[str, object]:
        return {"id": self.id, "size": self.size, "template_id": self.template_id,
                "template_digest": self.template_digest, "template_size": self.template_size,
                "owner": self.owner, "holder": self.holder, "clients": list(self.clients)}


__all__ = ["DEFAULT_ROOT", "ID_RE", "MAX_ID", "MAX_FORK", "fork_ids", "HOSTNAME_RE", "hostname_of", "default_root", "validate_id", "VolumeState", "Template", "Volume",
           "RecoveryReport", "Usage", "Space", "SpaceEvent", "SharedVolume"]
