"""The daemon's settings: one TOML file, the same keys as environment variables and flags.

Precedence, lowest first: the defaults, the file (``/etc/cowdisk/cowdisk.toml``, or
``--config`` / ``COWDISK_CONFIG``), the environment (``COWDISK_<KEY>`` upper-cased:
``COWDISK_ROOT``, ``COWDISK_SOCKET``, ``COWDISK_ALLOW_UIDS=0,1000``...), the flags of
``cowdisk serve``. A missing default file is no error; a missing file named explicitly
is. Unknown keys and wrong types are refused (a typo must not pass silently), which is
what ``cowdisk serve --check-config`` reports.

Example file::

    root = "/var/lib/cowdisk"
    backend = "auto"                  # only matters when the store is made
    socket = "/run/cowdisk/cowdisk.sock"
    socket_mode = "0660"
    socket_group = "cowdisk"          # used when the group exists, else the socket is root-only
    allow_uids = []                   # empty and allow_gids empty: whoever can open the socket
    allow_gids = []
    jail_roots = ["/srv/jailer"]      # where `volume jail` may stage nodes; empty: jails refused
    import_roots = ["/var/lib/cowdisk-incoming"]  # where import/build sources may live
    log_format = "json"               # or "text"
    log_level = "info"
    shutdown_timeout = 30             # seconds SIGTERM waits for in-flight operations
    lazy_keep_interval = 10           # seconds between looks at the lazy templates' keepers
    processes = 4                     # store worker processes (default: one per core, 2 to 8)
    high_water = 90                   # percent: creates, forks, restores refused past it
    [quotas]                          # per owner uid, or "default" (every owner but root)
    default = { volumes = 20, bytes = "20G" }
    1000 = { volumes = 100 }

``high_water`` and ``quotas`` are laid over the store's own ``<root>/config.toml`` (same
keys, :mod:`cowdisk.store.limits`), entry by entry; ``COWDISK_QUOTAS`` takes the table as
JSON (``{"1000": {"volumes": 10}}``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..backends import BACKENDS
from ..errors import InvalidArgument
from ..store import limits as limits_mod
from ..store.limits import Limits, Quota
from ..store.model import default_root
from .protocol import DEFAULT_CONFIG, DEFAULT_SOCKET

LOG_FORMATS = ("json", "text")


def default_processes() -> int:
    """Store worker processes by default: one per core, at least 2, at most 8."""
    return min(8, max(2, os.cpu_count() or 1))
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class Config:
    root: str = field(default_factory=default_root)
    backend: str = "auto"
    socket: str = DEFAULT_SOCKET
    socket_mode: int = 0o660
    socket_group: str = "cowdisk"
    allow_uids: list[int] = field(default_factory=list)
    allow_gids: list[int] = field(default_factory=list)
    jail_roots: list[str] = field(default_factory=list)
    import_roots: list[str] = field(default_factory=list)
    log_format: str = "json"
    log_level: str = "info"
    shutdown_timeout: float = 30.0
    lock_timeout: float = 30.0
    workers: int = 32
    processes: int = field(default_factory=lambda: default_processes())
    """Store worker processes (:mod:`.workers`); 0: store calls run in ``workers`` threads of
    the daemon's own process."""
    job_retention: float = 3600.0
    lazy_keep_interval: float = 10.0
    """Seconds between the daemon's looks at its lazy templates' servers (one whose keeper
    was killed is served again: ``Store.keep_lazy_served``); well inside the 30 s an nbd
    device holds its I/O for a dead server. 0: no looks."""
    quotas: dict[str, Quota] = field(default_factory=dict)
    """Per-owner quotas (:mod:`cowdisk.store.limits`), over the store's own config."""
    high_water: float | None = None
    """The admission mark in percent, over the store's own config (default there: 90)."""
    source: str = field(default="defaults", compare=False)
    """Where the settings came from (for --check-config and the start log)."""

    def store_limits(self) -> Limits:
        """The limits the daemon's stores enforce: the store's own config, then this one's."""
        return limits_mod.load(self.root).over(self.quotas, self.high_water, f"daemon config ({self.source})")

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["socket_mode"] = f"{self.socket_mode:04o}"
        return d


KEYS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "source")


def _bad(key: str, value: Any, want: str, where: str) -> InvalidArgument:
    return InvalidArgument(f"config {where}: {key} = {value!r}: {want}", op="load config", obj=key)


def _coerce(key: str, value: Any, where: str) -> Any:
    """A value from TOML (typed) or the environment/flags (text) as the field's type."""
    if key in ("allow_uids", "allow_gids"):
        if isinstance(value, str):
            value = [v for v in value.replace(" ", ",").split(",") if v]
        if not isinstance(value, list):
            raise _bad(key, value, "a list of numbers", where)
        try:
            out = [int(v) for v in value]
        except (TypeError, ValueError):
            raise _bad(key, value, "a list of numbers", where) from None
        if any(v < 0 for v in out):
            raise _bad(key, value, "ids are not negative", where)
        return out
    if key == "quotas":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise _bad(key, value, "a JSON table of owners to {volumes, bytes}", where) from None
        return limits_mod.parse_quotas(value, where)
    if key == "high_water":
        return limits_mod.parse_high_water(value, where)
    if key in ("jail_roots", "import_roots"):
        if isinstance(value, str):
            value = [v for v in value.split(":") if v]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _bad(key, value, "a list of absolute paths", where)
        if not all(os.path.isabs(v) for v in value):
            raise _bad(key, value, "paths must be absolute", where)
        return [os.path.normpath(v) for v in value]
    if key == "socket_mode":
        if isinstance(value, str):
            try:
                value = int(value, 8)
            except ValueError:
                raise _bad(key, value, "an octal mode such as \"0660\"", where) from None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0o777:
            raise _bad(key, value, "an octal mode such as \"0660\"", where)
        return value
    if key in ("shutdown_timeout", "lock_timeout", "job_retention", "lazy_keep_interval"):
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise _bad(key, value, "a number of seconds", where) from None
        if isinstance(value, bool) or f < 0:
            raise _bad(key, value, "a number of seconds, not negative", where)
        return f
    if key in ("workers", "processes"):
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise _bad(key, value, "a whole number", where) from None
        lo, hi = (1, 1024) if key == "workers" else (0, 64)
        if isinstance(value, bool) or not lo <= n <= hi:
            raise _bad(key, value, f"between {lo} and {hi}", where)
        return n
    if not isinstance(value, str):
        raise _bad(key, value, "a string", where)
    if key in ("root", "socket") and not os.path.isabs(value):
        raise _bad(key, value, "an absolute path", where)
    if key == "backend" and value not in ("auto", *BACKENDS):
        raise _bad(key, value, f"one of auto, {', '.join(BACKENDS)}", where)
    if key == "log_format" and value not in LOG_FORMATS:
        raise _bad(key, value, f"one of {', '.join(LOG_FORMATS)}", where)
    if key == "log_level" and value.lower() not in LOG_LEVELS:
        raise _bad(key, value, f"one of {', '.join(LOG_LEVELS)}", where)
    return value.lower() if key == "log_level" else value


def load(path: str | None = None, *, env: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> Config:
    """The settings from the file at ``path`` (default: ``COWDISK_CONFIG`` or
    /etc/cowdisk/cowdisk.toml), then ``env`` (default: os.environ), then ``overrides``
    (the flags; None values are left out)."""
    env = os.environ if env is None else env
    explicit = path is not None or bool(env.get("COWDISK_CONFIG"))
    path = path or env.get("COWDISK_CONFIG") or DEFAULT_CONFIG
    values: dict[str, Any] = {}
    sources = []
    data = limits_mod.read_toml(path, KEYS, must_exist=explicit)
    if data is None:
        data = {}
    else:
        sources.append(path)
    for k, v in data.items():
        values[k] = _coerce(k, v, path)
    from_env = [k for k in KEYS if env.get(f"COWDISK_{k.upper()}")]
    for k in from_env:
        values[k] = _coerce(k, env[f"COWDISK_{k.upper()}"], f"environment COWDISK_{k.upper()}")
    if from_env:
        sources.append("environment")
    from_flags = [k for k, v in (overrides or {}).items() if v is not None]
    for k in from_flags:
        if k not in KEYS:
            raise InvalidArgument(f"unknown setting {k}", op="load config", obj=k)
        values[k] = _coerce(k, overrides[k], f"flag --{k.replace('_', '-')}")  # type: ignore[index]
    if from_flags:
        sources.append("flags")
    cfg = Config(**values, source=", ".join(sources) or "defaults")
    cfg.root = os.path.normpath(os.path.abspath(cfg.root))
    if not cfg.import_roots:
        cfg.import_roots = [os.path.join(cfg.root, "incoming")]
    return cfg
