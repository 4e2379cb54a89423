"""What the store hands its callers (templates, volumes, recovery reports) and the rules for
the ids callers choose: :mod:`cowdisk.model`, which the daemon's client imports too;
named here for the store's own modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..model import (DEFAULT_ROOT, HOSTNAME_RE, ID_RE, MAX_FORK, MAX_ID, RecoveryReport, Template, Volume,
                     VolumeState, default_root, fork_ids, hostname_of, validate_id)

if TYPE_CHECKING:
    from ..registry import TemplateRow


def template_of(row: TemplateRow, users: list[str]) -> Template:
    """The caller's view of a template's registry row and the volumes that use it."""
    return Template(row.id, row.names, row.path, row.size, row.digest, row.source, row.created, row.state,
                    tuple(users), row.owner, row.shared)


__all__ = ["DEFAULT_ROOT", "HOSTNAME_RE", "ID_RE", "MAX_FORK", "MAX_ID", "RecoveryReport", "Template", "Volume",
           "VolumeState", "default_root", "fork_ids", "hostname_of", "validate_id", "template_of"]
