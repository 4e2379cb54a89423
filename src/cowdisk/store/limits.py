"""Per-owner quotas and the high-water mark: what the store refuses before an operation
starts, whichever face (library, command line, daemon) asks.

They come from the store's own config, ``<root>/config.toml``, read when the store is
opened (a missing file: no quotas, a mark of 90%), over which the daemon lays the same
keys from its own config (:mod:`cowdisk.daemon.config`)::

    high_water = 90                   # percent: a create, fork or restore-as that would
                                      # fill the store's filesystem, the pool or a thin pool
                                      # past it is refused before it starts
    [quotas]
    default = { volumes = 20, bytes = "20G" }   # every owner but root
    1000 = { volumes = 100 }                    # uid 1000 (replaces default for it)
    0 = { bytes = "1T" }                        # root only when named

A quota counts an owner's volumes and the bytes they take on disk by the backend's own
accounting (:meth:`Backend.usage`: exclusive bytes where blocks are shared, else
allocated; thin_ls on dm-thin, rbd du on rbd). Refusals are ``KernelError`` with
``EDQUOT`` (a quota) or ``ENOSPC`` (the mark): HTTP 507, exit code 4.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from ..errors import InvalidArgument

CONFIG_FILE = "config.toml"
DEFAULT_HIGH_WATER = 90.0
KEYS = ("quotas", "high_water")
QUOTA_KEYS = ("volumes", "bytes")


@dataclass(frozen=True)
class Quota:
    volumes: int | None = None
    """How many volumes the owner may have (None: no limit)."""
    bytes: int | None = None
    """How many bytes its volumes may take on disk (None: no limit)."""

    def as_dict(self) -> dict[str, int | None]:
        return {"volumes": self.volumes, "bytes": self.bytes}


@dataclass(frozen=True)
class Limits:
    quotas: Mapping[str, Quota] = field(default_factory=dict)
    """By owner uid (as text), and ``default`` for every owner but root."""
    high_water: float = DEFAULT_HIGH_WATER
    source: str = "defaults"

    def quota(self, owner: int) -> Quota:
        """The quota of ``owner``: its own entry, else ``default`` (root: none unless named)."""
        q = self.quotas.get(str(owner))
        if q is not None:
            return q
        return Quota() if owner == 0 else self.quotas.get("default", Quota())

    def over(self, quotas: Mapping[str, Quota] | None, high_water: float | None, source: str) -> "Limits":
        """These limits with ``quotas`` (entry by entry) and ``high_water`` laid over them."""
        if not quotas and high_water is None:
            return self
        return Limits({**self.quotas, **(quotas or {})}, self.high_water if high_water is None else high_water,
                      f"{self.source}, {source}")

    def as_dict(self) -> dict[str, Any]:
        return {"quotas": {k: q.as_dict() for k, q in self.quotas.items()}, "high_water": self.high_water,
                "source": self.source}


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"([0-9]+)\s*([KMGT]?)(?:I?B)?", re.I)


def _bad(key: str, value: Any, want: str, where: str) -> InvalidArgument:
    return InvalidArgument(f"config {where}: {key} = {value!r}: {want}", op="load config", obj=key)


def _count(key: str, value: Any, where: str, *, size: bool) -> int:
    if isinstance(value, str) and size and (m := _SIZE.fullmatch(value.strip())):
        return int(m.group(1)) * _UNITS[m.group(2).upper()]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(key, value, "a whole number, not negative" + (" (or a size such as \"10G\")" if size else ""),
                   where)
    return value


def parse_quotas(value: Any, where: str) -> dict[str, Quota]:
    """``{owner: {volumes, bytes}}`` (owner: a uid, or ``default``) as checked quotas."""
    if not isinstance(value, Mapping):
        raise _bad("quotas", value, "a table of owners (a uid or \"default\") to {volumes, bytes}", where)
    out: dict[str, Quota] = {}
    for owner, q in value.items():
        owner = str(owner).strip()
        if owner != "default" and not owner.isdigit():
            raise _bad(f"quotas.{owner}", q, "owners are a uid or \"default\"", where)
        if not isinstance(q, Mapping) or set(q) - set(QUOTA_KEYS):
            raise _bad(f"quotas.{owner}", q, f"a table with {' and/or '.join(QUOTA_KEYS)}", where)
        out[str(int(owner)) if owner.isdigit() else owner] = Quota(
            None if q.get("volumes") is None else _count(f"quotas.{owner}.volumes", q["volumes"], where, size=False),
            None if q.get("bytes") is None else _count(f"quotas.{owner}.bytes", q["bytes"], where, size=True))
    return out


def parse_high_water(value: Any, where: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise _bad("high_water", value, "a percentage between 1 and 100", where) from None
    if isinstance(value, bool) or not 1 <= f <= 100:
        raise _bad("high_water", value, "a percentage between 1 and 100", where)
    return f



def read_toml(path: str, keys: Iterable[str], *, must_exist: bool = False) -> dict[str, Any] | None:
    """The TOML table in the config file at ``path`` (None when there is none, unless
    ``must_exist``); a file that does not parse, cannot be read or has keys not in ``keys``
    is refused naming the file (and the key). The store's and the daemon's config read here."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if must_exist:
            raise InvalidArgument(f"config file {path} does not exist", op="load config", obj=path) from None
        return None
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(f"config file {path}: {e}", op="load config", obj=path) from None
    except OSError as e:
        raise InvalidArgument(f"config file {path}: {e.strerror}", op="load config", obj=path) from None
    known = list(keys)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InvalidArgument(f"config file {path}: unknown key(s) {', '.join(unknown)}", op="load config", obj=path,
                              hint=f"known keys: {', '.join(known)}")
    return data

def load(root: str) -> Limits:
    """The limits in ``<root>/config.toml`` (defaults when there is none); a file that does
    not parse, or has unknown keys or wrong values, is refused naming the key."""
    path = os.path.join(root, CONFIG_FILE)
    data = read_toml(path, KEYS)
    if data is None:
        return Limits()
    return Limits(parse_quotas(data.get("quotas", {}), path),
                  parse_high_water(data["high_water"], path) if "high_water" in data else DEFAULT_HIGH_WATER,
                  path)
