"""The one contract every face of a store keeps: :class:`StoreAPI`.

The library's :class:`~cowdisk.store.Store` and the daemon's client
:class:`~cowdisk.client.Client` both implement it, with the same method names, arguments
(names, kinds, defaults), return types (:mod:`cowdisk.model`) and error types
(:mod:`cowdisk.errors`); the command line talks to nothing else (``App.store()``
returns a ``StoreAPI``: the store directly, or the daemon that serves it). mypy checks
both classes against it (``cowdisk.store.core`` and ``cowdisk.client`` each assign their
class to ``type[StoreAPI]``), and tests/unit/test_contract.py fails when either lacks a
method or a keyword of it, or gives one another default.

A view of a store scoped to one caller (an owner's uid, its own lock timeout) implements
the same protocol: such a view is what a face hands on, and code written against
``StoreAPI`` cannot tell it from the whole store.

This module imports only the model and the progress type: the client imports it in
milliseconds.
"""

from __future__ import annotations

from typing import Any, Protocol, Self

from .model import RecoveryReport, SharedVolume, Space, Template, Usage, Volume
from .progress import Progress

API = "/v1"
"""The daemon's prefix of every operation (``/metrics`` and ``/openapi.json`` stand outside it)."""

DEFAULT_SOCKET = "/run/cowdisk/cowdisk.sock"
DEFAULT_CONFIG = "/etc/cowdisk/cowdisk.toml"

LOCK_TIMEOUT_HEADER = "X-Cowdisk-Lock-Timeout"
"""A request's bound on its lock waits in the daemon (seconds; the daemon's ``lock_timeout``
without it): the command line's ``--timeout`` through the daemon."""

IMAGE_TRANSPORTS = ("oci", "oci-archive", "docker-archive")
"""The prefixes a container image reference may start with (``oci:DIR[:TAG]``...)."""


def check_backend(root: str, recorded: str, asked: str) -> None:
    """Refuse ``asked`` (a ``--backend``) for the store at ``root`` that uses ``recorded``
    (``auto`` takes any): what every face says when the two differ."""
    if asked not in ("auto", recorded):
        from .errors import InvalidArgument

        raise InvalidArgument(f"store {root} uses backend {recorded}, not {asked}", op="open store", obj=root,
                              hint="use another --root for another backend")


class BackendInfo(Protocol):
    """What a caller may ask of a store's backend: its name, whether a volume's device is a
    block device (dm, rbd) or a file, and whether a volume may be larger than its template."""

    @property
    def name(self) -> str: ...

    @property
    def block_device(self) -> bool: ...

    @property
    def larger_volumes(self) -> bool: ...


class StoreAPI(Protocol):
    """Every operation a store offers its callers (see :class:`cowdisk.store.Store` for what
    each does; the keyword defaults here are the contract's)."""

    @property
    def root(self) -> str: ...

    @property
    def id(self) -> str: ...

    @property
    def backend_name(self) -> str: ...

    @property
    def backend(self) -> BackendInfo: ...

    def link_path(self, vid: str) -> str: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...

    # -- the store ---------------------------------------------------------------------

    def info(self) -> dict[str, Any]: ...

    def space(self) -> list[Space]: ...

    def recover(self) -> RecoveryReport: ...

    def gc(self, *, purge: bool = False, older_than_s: float = 86400.0) -> RecoveryReport: ...

    def destroy_store(self, *, force: bool = False) -> list[str]: ...

    # -- templates ---------------------------------------------------------------------

    def templates(self) -> list[Template]: ...

    def template(self, ref: str) -> Template: ...

    def template_doc(self, t: Template) -> dict[str, Any]: ...

    def template_usage(self, ref: str) -> int: ...

    def import_template(self, src: str, name: str | None = None, *, adopt: bool = False,
                        progress: Progress | None = None, shared: bool = False) -> Template: ...

    def build_template(self, source: str, name: str | None = None, *, size: int | None = None,
                       fs_type: str = "ext4", progress: Progress | None = None, shared: bool = False) -> Template: ...

    def build_template_from_image(self, ref: str, name: str | None = None, *, size: int | None = None,
                                  fs_type: str = "ext4", progress: Progress | None = None,
                                  shared: bool = False) -> Template: ...

    def chown_template(self, ref: str, owner: int | None = None, *, shared: bool | None = None) -> Template: ...

    def verify_template(self, ref: str, progress: Progress | None = None) -> Template: ...

    def remove_template(self, ref: str) -> None: ...

    # -- templates in an object store (docs/remote.md) ------------------------------------

    def push_template(self, ref: str, to: str | None = None, *, progress: Progress | None = None) -> dict[str, Any]: ...

    def pull_template(self, source: str, name: str | None = None, *, at: str | None = None,
                      progress: Progress | None = None) -> Template: ...

    def remote_templates(self, url: str | None = None) -> list[dict[str, Any]]: ...

    def lazy_template(self, source: str, name: str | None = None, *, at: str | None = None,
                      bound: float | None = None, prefetch: bool = False,
                      progress: Progress | None = None) -> dict[str, Any]: ...

    def lazy_templates(self) -> list[dict[str, Any]]: ...

    def record_read_order(self, manifest_digest: str) -> dict[str, Any]: ...

    def stop_lazy_template(self, manifest_digest: str) -> bool: ...

    # -- volumes -----------------------------------------------------------------------

    def volumes(self) -> list[Volume]: ...

    def volume(self, vid: str) -> Volume: ...

    def usage(self, vid: str) -> Usage: ...

    def chown_volume(self, vid: str, owner: int) -> Volume: ...

    def create_volume(self, vid: str, template: str, *, size: int | None = None, grow_fs: bool = True,
                      progress: Progress | None = None) -> Volume: ...

    def remove_volume(self, vid: str, *, deadline_s: float = 5.0) -> None: ...

    def checkpoint(self, vid: str, *, deadline_s: float = 5.0) -> Volume: ...

    def restore(self, vid: str, new_id: str | None = None, *, retarget_source_link: bool = True,
                steal: bool = False, adopt: bool = False, progress: Progress | None = None) -> Volume: ...

    def adopt_volume(self, vid: str, *, steal: bool = False) -> Volume: ...

    def shared_volumes(self) -> list[SharedVolume]: ...

    def fork(self, vid: str, new_ids: list[str] | tuple[str, ...] = (), *, count: int | None = None,
             prefix: str | None = None, reset_identity: bool = False, hostname_prefix: str | None = None,
             progress: Progress | None = None) -> list[Volume]: ...

    def flatten(self, vid: str, name: str | None = None, *, progress: Progress | None = None) -> Template: ...

    def jail(self, vid: str, jail_dir: str, name: str = "rootfs", *, uid: int | None = None,
             gid: int | None = None) -> str: ...


__all__ = ["check_backend", "LOCK_TIMEOUT_HEADER", "API", "DEFAULT_SOCKET", "DEFAULT_CONFIG", "IMAGE_TRANSPORTS", "BackendInfo", "StoreAPI"]
