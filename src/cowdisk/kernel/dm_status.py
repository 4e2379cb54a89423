"""Parsers for the status lines of the device-mapper targets cowdisk uses.

``snapshot``, ``thin-pool`` and ``thin``: each parser takes the text
:meth:`cowdisk.kernel.dm.Control.status` returns for one target and gives a frozen
record.  Pure functions (no kernel); the formats are described in
docs/reference/device-mapper.md.
"""

from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class SnapshotStatus:
    """A ``snapshot`` target's status line.

    ``state`` is ``"valid"`` (with the three numbers), ``"invalid"`` (COW full
    without overflow reporting, or an I/O error: permanent, kept in the COW header),
    ``"overflow"`` (``PO`` and full), ``"merge_failed"`` or ``"unknown"``.
    ``allocated_sectors`` and ``total_sectors`` both include metadata.
    """

    state: str
    allocated_sectors: int | None = None
    total_sectors: int | None = None
    metadata_sectors: int | None = None

    @property
    def valid(self) -> bool:
        return self.state == "valid"

    @property
    def data_sectors(self) -> int | None:
        """Sectors of COW used for data (allocated minus metadata)."""
        if self.allocated_sectors is None or self.metadata_sectors is None:
            return None
        return self.allocated_sectors - self.metadata_sectors


_SNAPSHOT_WORDS = {"Invalid": "invalid", "Overflow": "overflow", "Merge failed": "merge_failed", "Unknown": "unknown"}


def parse_snapshot_status(text: str) -> SnapshotStatus:
    """Parse ``<allocated>/<total> <metadata>`` or one of the state words.

    :raises ValueError: anything else.
    """
    s = text.strip()
    if s in _SNAPSHOT_WORDS:
        return SnapshotStatus(_SNAPSHOT_WORDS[s])
    words = s.split()
    if len(words) == 2 and words[0].count("/") == 1:
        alloc, total = words[0].split("/")
        try:
            return SnapshotStatus("valid", int(alloc), int(total), int(words[1]))
        except ValueError:
            pass
    raise ValueError(f"unrecognised snapshot status {text!r}")


@dataclass(frozen=True)
class ThinPoolStatus:
    """A ``thin-pool`` target's status line.

    ``state`` is ``"ok"`` (all fields set), ``"fail"`` or ``"error"``.  Metadata
    counts are 4 KiB blocks, data counts pool blocks.  ``mode`` is ``"rw"``, ``"ro"``
    or ``"out_of_data_space"``.  ``metadata_low_watermark`` is ``None`` on kernels
    that do not print it.
    """

    state: str
    transaction_id: int | None = None
    used_metadata_blocks: int | None = None
    total_metadata_blocks: int | None = None
    used_data_blocks: int | None = None
    total_data_blocks: int | None = None
    held_metadata_root: int | None = None
    mode: str | None = None
    discards: str | None = None
    no_space: str | None = None
    needs_check: bool = False
    metadata_low_watermark: int | None = None


def _ratio(word: str) -> tuple[int, int]:
    a, b = word.split("/")
    return int(a), int(b)


def parse_thin_pool_status(text: str) -> ThinPoolStatus:
    """Parse ``<tid> <um>/<tm> <ud>/<td> <held|-> <mode> <discards> <no_space> <needs_check|-> [<lw>]``.

    :raises ValueError: an unknown word or a malformed line.
    """
    words = text.split()
    if words == ["Fail"]:
        return ThinPoolStatus("fail")
    if words == ["Error"]:
        return ThinPoolStatus("error")
    if len(words) < 8:
        raise ValueError(f"unrecognised thin-pool status {text!r}")
    try:
        tid = int(words[0])
        um, tm = _ratio(words[1])
        ud, td = _ratio(words[2])
        held = None if words[3] == "-" else int(words[3])
    except ValueError:
        raise ValueError(f"unrecognised thin-pool status {text!r}") from None
    mode, discards, no_space, check = words[4:8]
    if mode not in ("rw", "ro", "out_of_data_space"):
        raise ValueError(f"unknown thin-pool mode {mode!r} in {text!r}")
    if discards not in ("discard_passdown", "no_discard_passdown", "ignore_discard"):
        raise ValueError(f"unknown thin-pool discard word {discards!r} in {text!r}")
    if no_space not in ("queue_if_no_space", "error_if_no_space"):
        raise ValueError(f"unknown thin-pool no-space word {no_space!r} in {text!r}")
    if check not in ("needs_check", "-"):
        raise ValueError(f"unknown thin-pool check word {check!r} in {text!r}")
    lw = None
    if len(words) >= 9:
        try:
            lw = int(words[8])
        except ValueError:
            raise ValueError(f"unrecognised thin-pool low watermark in {text!r}") from None
    return ThinPoolStatus("ok", tid, um, tm, ud, td, held, mode, discards, no_space, check == "needs_check", lw)


@dataclass(frozen=True)
class ThinStatus:
    """A ``thin`` target's status line.

    ``state`` is ``"ok"``, ``"fail"`` (pool failed) or ``"unknown"`` (a lone ``-``).
    ``highest_mapped_sector`` is ``None`` when nothing is mapped yet.
    """

    state: str
    mapped_sectors: int | None = None
    highest_mapped_sector: int | None = None


def parse_thin_status(text: str) -> ThinStatus:
    """Parse ``<mapped_sectors> <highest_mapped_sector|->``, ``Fail`` or ``-``."""
    words = text.split()
    if words == ["Fail"]:
        return ThinStatus("fail")
    if words == ["-"]:
        return ThinStatus("unknown")
    if len(words) == 2:
        try:
            return ThinStatus("ok", int(words[0]), None if words[1] == "-" else int(words[1]))
        except ValueError:
            pass
    raise ValueError(f"unrecognised thin status {text!r}")


__all__ = ["SnapshotStatus", "ThinPoolStatus", "ThinStatus", "parse_snapshot_status",
           "parse_thin_pool_status", "parse_thin_status"]
