"""The API's documents as pydantic models: what ``/openapi.json`` describes.

Responses are the same documents the command line prints with ``--json`` (a volume is
``Volume.as_dict()``, a template ``Template.as_dict()`` plus ``disk_bytes``). Requests
refuse unknown keys: a typo is a 400, not a silently ignored option.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, create_model

from .. import model
from ..errors import InvalidArgument
from ..registry import VolumeState
from ..units import parse_size


def _bytes(v: Any) -> Any:
    """A size as the command line takes it (``128M``, ``4G``, ``4096``) -> bytes."""
    if isinstance(v, (str, int)) and not isinstance(v, bool):
        try:
            return parse_size(v)
        except InvalidArgument as e:
            raise ValueError(e.message) from None
    return v


Size = Annotated[int, BeforeValidator(_bytes), WithJsonSchema({
    "anyOf": [{"type": "integer", "exclusiveMinimum": 0},
              {"type": "string", "pattern": "^\\s*[0-9]+\\s*([KMGTkmgt]([iI]?[bB])?|[bB])?\\s*$"}],
    "description": "Bytes, or a number with a unit K, M, G or T (powers of 1024), as the command line takes it"})]
"""A positive size in bytes; given as an integer or a string with a unit (``128M``)."""


def _field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of class ``cls`` (the string literal under a field), by field."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    assert isinstance(body, ast.ClassDef)
    return {a.target.id: " ".join(b.value.value.replace("``", "").split())
            for a, b in zip(body.body, body.body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
            and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)}


def out_model(cls: type, name: str, **extra: Any) -> type[BaseModel]:
    """The response model of the model type ``cls`` (a named tuple of cowdisk.model: what the library
    returns and ``as_dict`` makes the document of): its fields with their types, defaults
    and docstrings as descriptions, plus ``extra`` fields the document adds. One list of
    fields for the library, the client and the API."""
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    fields: dict[str, Any] = {}
    defaults = cls._field_defaults  # type: ignore[attr-defined]  # a NamedTuple
    for f in cls._fields:  # type: ignore[attr-defined]
        fields[f] = (hints[f], Field(defaults.get(f, ...), description=docs.get(f)))
    return create_model(name, **fields, **extra)


class In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    type: str = Field(description="The error class: InvalidArgument, NotFound, AlreadyExists, InUse, StateError, "
                                  "TemplateChanged, Unsupported, LockTimeout, SnapshotInvalid, CowFormatError, "
                                  "KernelError, Forbidden, Cancelled, Unavailable, CowdiskError")
    exit_code: int = Field(description="What the command line exits with for this error")
    message: str
    hint: str = ""
    op: str = ""
    object: str = ""
    errno: int | None = None
    notes: list[str] = []


class ErrorDoc(BaseModel):
    error: ErrorBody


TemplateOut = out_model(model.Template, "TemplateOut", disk_bytes=(int | None, Field(
    None, description="Bytes the template's file really takes (st_blocks); a lazy template's: the bytes its cache "
                      "holds")), lazy=(dict[str, Any] | None, Field(
    None, description="A lazy template (served from this host's chunk cache): manifest, source, cached_bytes, "
                      "cached_chunks, data_chunks, whole, loops, served; null for a template with its image file "
                      "here")))


TemplateList = create_model("TemplateList", templates=(list[TemplateOut], ...))  # type: ignore[valid-type]


VolumeOut = out_model(model.Volume, "VolumeOut")


VolumeList = create_model("VolumeList", volumes=(list[VolumeOut], ...))  # type: ignore[valid-type]


SharedVolumeOut = out_model(model.SharedVolume, "SharedVolumeOut")


SharedVolumeList = create_model("SharedVolumeList", volumes=(list[SharedVolumeOut], ...))  # type: ignore[valid-type]


UsageOut = out_model(model.Usage, "UsageOut", own_bytes=(int, Field(
    description=" ".join((model.Usage.own_bytes.__doc__ or "").split()))))


class RecoveryReportOut(BaseModel):
    """What recovery did, by action (``cowdisk recover --json``); newer stores may add actions."""

    model_config = ConfigDict(extra="allow")

    rolled_back: list[str] = []
    finished: list[str] = []
    reactivated: list[str] = []
    orphans_removed: list[str] = []
    kept: list[str] = []
    errors: list[str] = []


class SpaceOut(BaseModel):
    area: str
    used_bytes: int
    total_bytes: int
    pct: float
    state: str = Field(description="ok, or what the kernel says instead (out_of_data_space, read_only, "
                                   "needs_check, unreadable)")
    detail: str


class SpaceList(BaseModel):
    space: list[SpaceOut]


class StoreInfoOut(BaseModel):
    """``cowdisk store info --json``."""

    model_config = ConfigDict(extra="allow")

    root: str
    id: str
    backend: str
    backend_options: dict[str, str]
    data_root: str
    read_only: bool
    registry_schema: int
    templates: int
    volumes: dict[str, int] = Field(description="Volumes by state")
    intents: int
    quarantine: list[str]
    reserve: bool
    free_bytes: int
    data_free_bytes: int
    space: list[SpaceOut]


class Removed(BaseModel):
    removed: list[str]


class JobProgress(BaseModel):
    stage: str = Field(description="The phase the operation is in (\"copy\", \"mkfs\"...)")
    done: int = Field(description="Bytes done in this phase")
    total: int = Field(description="Bytes in this phase, 0 while unknown")


class PeerOut(BaseModel):
    pid: int
    uid: int
    gid: int


class JobOut(BaseModel):
    id: str
    seq: int = Field(description="Grows with every change of state or progress: pass it as since= to wait for "
                                 "the next one")
    op: str
    object: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: JobProgress
    stages: list[JobProgress] = Field([], description="Every stage so far with its last byte counts (the last is "
                                                      "progress)")
    result: Any = Field(None, description="When succeeded: a template (import, build, verify, flatten, pull), "
                                          "{\"volumes\": [...]} (fork), the push's report (push) or the lazy "
                                          "template (lazy serve)")
    error: ErrorBody | None = None
    created: float
    started: float | None = None
    finished: float | None = None
    cancel_requested: bool = False
    peer: PeerOut


class JobList(BaseModel):
    jobs: list[JobOut]


class HealthOut(BaseModel):
    status: Literal["ok", "stopping"]
    pid: int
    version: str
    root: str
    store_id: str = Field(description="The store's id: its dm devices are named cowdisk-<store_id>-<volume>")
    backend: str
    block_device: bool = Field(description="Whether a volume's device is a block device (dm) or a file")
    larger_volumes: bool = Field(False, description="Whether a volume may be larger than its template (create's "
                                                    "size)")
    uptime_s: float
    recovery: RecoveryReportOut = Field(description="What the recovery at start did")


class ImportIn(In):
    source: str = Field(description="Absolute path of a raw disk image under one of the daemon's import_roots")
    name: str | None = None
    adopt: bool = Field(False, description="Use the image in place (no copy); it must never change")
    shared: bool = Field(False, description="Every caller may use the template, not only its owner")


class BuildIn(In):
    source: str | None = Field(None, description="Absolute path of a directory tree or tarball under one of "
                                                 "the daemon's import_roots (this or image)")
    image: str | None = Field(None, description="A container image (`template build --from-image`): an OCI "
                                                "layout directory, OCI archive or docker save archive under one "
                                                "of the daemon's import_roots, PATH[:TAG] with an optional "
                                                "oci:, oci-archive: or docker-archive: in front (this or source)")
    name: str | None = None
    size: Size | None = Field(None, description="Image size; default: twice the tree plus 32 MiB (an image: 1.5 "
                                                "times its unpacked size plus 64 MiB)")
    fs_type: Literal["ext4"] = "ext4"
    shared: bool = Field(False, description="Every caller may use the template, not only its owner")


class ChownIn(In):
    owner: int = Field(ge=0, le=(1 << 32) - 2, description="The uid the volume is handed to")


class TemplateChownIn(In):
    owner: int | None = Field(None, ge=0, le=(1 << 32) - 2,
                              description="The uid the template is handed to (None: unchanged)")
    shared: bool | None = Field(None, description="Usable by every caller (None: unchanged)")


class CreateIn(In):
    id: str
    template: str = Field(description="Template id, digest prefix or name")
    size: Size | None = Field(None, description="A multiple of 512 bytes, at least the template's size: a "
                                                "volume larger than its template (dm-thin and the file "
                                                "backends)")
    grow_fs: bool = Field(True, description="With size: grow the volume's ext2/3/4 filesystem to fill it")


class RestoreIn(In):
    new_id: str | None = Field(None, description="Restore as this new volume (the checkpoint is kept)")
    retarget_source_link: bool = Field(True, description="With new_id: point the source's stable link at "
                                                         "the new volume too (the path a VM snapshot recorded)")
    adopt: bool = Field(False, description="rbd: when this store does not know the volume, adopt it first from "
                                           "the shared pool (see POST .../adopt)")
    steal: bool = Field(False, description="rbd: fence the store that still holds the volume (its host died: its "
                                           "clients are cut off for good), instead of a 409 naming it")


class AdoptIn(In):
    steal: bool = Field(False, description="Fence the store that still holds the volume instead of a 409 naming it")


class ForkIn(In):
    new_ids: list[str] = Field(default_factory=list, max_length=1000)
    count: int | None = Field(None, ge=1, le=1000)
    prefix: str | None = None
    reset_identity: bool = False
    hostname_prefix: str | None = None


class FlattenIn(In):
    name: str | None = None


class JailIn(In):
    dir: str = Field(description="The jail directory, under one of the daemon's jail_roots")
    name: str = "rootfs"
    uid: int | None = None
    gid: int | None = None


class JailOut(BaseModel):
    volume: str
    path: str


class DriveOut(BaseModel):
    volume: str
    format: str
    path: str
    state: VolumeState
    config: Any = Field(description="firecracker, cloud-hypervisor-api: the drive object; cloud-hypervisor, "
                                    "qemu, qemu-blockdev: the argument list")
    text: str = Field(description="What `cowdisk volume drive` prints")


# -- templates in an object store (docs/remote.md) ---------------------------------------------

Location = Annotated[str, Field(max_length=600, pattern=r"^s3://[A-Za-z0-9][A-Za-z0-9.-]{0,62}(/[A-Za-z0-9._/-]*)?$",
                                description="s3://BUCKET[/PREFIX] (default: the remote config's location)")]
Source = Annotated[str, Field(max_length=700, description="A manifest URL as push prints it "
                                                          "(s3://BUCKET[/PREFIX]/manifests/<digest>), or a manifest "
                                                          "or template digest (8 to 64 hex digits)")]


class PushIn(In):
    to: Location | None = None


class PullIn(In):
    source: Source
    name: str | None = Field(None, description="A name for the pulled template")
    at: Location | None = Field(None, description="Where a digest is looked up: s3://BUCKET[/PREFIX] (default: "
                                                  "the remote config's location)")


class LazyIn(In):
    source: Source
    name: str | None = Field(None, description="A name for the lazy template")
    at: Location | None = Field(None, description="Where a digest is looked up (default: the remote config's)")
    prefetch: bool = Field(False, description="Fill the cache now, the chunks of the recorded read order first")
    bound: float | None = Field(None, gt=0, le=600, description="Seconds a chunk's fetch may take (default: three "
                                                                "times the remote config's timeout)")


class ManifestSummary(BaseModel):
    manifest: str = Field(description="The manifest's digest (its object's name)")
    template: str = Field(description="The template's content digest")
    size: int
    chunk_size: int
    chunks: int
    zero_chunks: int = Field(description="Chunks of zeros: not stored")
    distinct_chunks: int = Field(description="Chunks stored (each once)")


class PushOut(ManifestSummary):
    id: str = Field(description="The template pushed")
    digest: str
    url: str = Field(description="The manifest's URL: what `template pull` takes")
    uploaded_chunks: int
    uploaded_bytes: int = Field(description="Compressed bytes sent (chunks and manifest)")
    present_chunks: int = Field(description="Distinct chunks the bucket had already")


class RemoteTemplateOut(ManifestSummary):
    url: str
    local: bool = Field(description="Whether this store has the template (one the caller may use)")


class RemoteTemplateList(BaseModel):
    templates: list[RemoteTemplateOut]


class LazyOut(ManifestSummary):
    cache: str = Field(description="The cache directory on this host")
    cached_chunks: int
    cached_bytes: int
    data_chunks: int
    whole: bool = Field(description="Every data chunk is cached: a volume made now reads the cache file through a "
                                    "loop device, not through the server")
    loops: list[int] = Field(description="The loop devices reading the cache file (/dev/loopN: the origin of "
                                         "volumes over the whole cache); its chunks are not evicted while any is")
    url: str | None = Field(description="nbd+unix:///?socket=... while served (QEMU opens it), else null")
    pid: int | None = Field(description="The serving nbdkit's PID, while served")
    stats: dict[str, Any] = Field(description="The server's counters: fetched chunks and bytes, reads from the "
                                              "cache and from the store, check failures, fetch times")


class LazyList(BaseModel):
    templates: list[LazyOut]


class OrderOut(BaseModel):
    manifest: str
    chunks: int = Field(description="Chunk indexes recorded, in the order this host fetched them")
    url: str = Field(description="The sidecar's URL")


class StopOut(BaseModel):
    manifest: str
    stopped: bool = Field(description="Whether a server ran (and was stopped)")
