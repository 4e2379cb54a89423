"""What the cluster records of each image and how this store reads and changes it: the
image names, the owner and holder records (read and written as the header's omap keys,
compare and swap on its version), the hold taken on attach and let go on detach, fencing
(``take_over``: blocklist and lock break), and the volumes other stores made (adopt)."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import struct
import time
from typing import Any, Callable

from ...errors import InUse, KernelError, NotFound
from .. import SharedVolume, VolumeCtx
from .lib import librbd, named

log = logging.getLogger("cowdisk.backends.rbd")

HOLDER = "cowdisk.holder"
OWNER = "cowdisk.owner"
TEMPLATE_KEY = "cowdisk.template"
DIGEST = "cowdisk.digest"
PARENT_KEY = "cowdisk.parent"
"""``<image>@<snapshot>`` a volume was cloned from (destroy drops that snapshot without
opening the image)."""
META_PREFIX = "metadata_"
"""cls_rbd keeps image metadata key K as omap key ``metadata_K`` of the image's header."""


def volume_image(vid: str) -> str:
    return f"cowdisk-v-{vid}"


def template_image(tid: str) -> str:
    return f"cowdisk-t-{tid}"


def template_snap(tid: str) -> str:
    return f"cowdisk-{tid}"


def copy_snap(dst: str) -> str:
    return f"cowdisk-for-{dst}"


class Records:
    """The records and fencing part of :class:`~cowdisk.backends.rbd.RbdBackend` (mixed
    into it: the backend holds the connection and these attributes)."""

    pool: str
    namespace: str
    tag: str
    holder: str
    _cluster: Any
    _ready: set[str]

    def ioctx(self) -> Any:
        """The pool's (and namespace's) I/O context: the backend's connection."""
        raise NotImplementedError

    # -- the holder record ---------------------------------------------------------------

    def holder_of(self, vid: str) -> str | None:
        """The store (tag@host) that holds volume ``vid`` attached, or None."""
        img = volume_image(vid)
        try:
            hdr = self._header(vid, img, "read holder")
        except NotFound:
            raise KernelError("read holder", img, errno.ENOENT) from None
        return self._records(hdr, img)[0].get(HOLDER) or None

    def watchers(self, vid: str) -> list[str]:
        """Addresses of the clients that have the image open (a VMM, a mapping daemon)."""
        _, rbd = librbd()
        with named("list watchers", volume_image(vid)), rbd.Image(self.ioctx(), volume_image(vid), read_only=True) as im:
            return [w["addr"] for w in im.watchers_list()]

    def _mine(self, record: str) -> bool:
        """Whether an owner or holder record (``<tag>@<host>``) names this store."""
        return record.rpartition("@")[0] == self.tag

    def _held_elsewhere(self, op: str, vid: str, img: str, im: Any, holder: str, hint: str) -> InUse:
        """The InUse for an image another store holds: that store, its host, its live clients."""
        me = self._my_addr()
        live = [w["addr"] for w in im.watchers_list() if w["addr"] != me]
        state = (f"it has {len(live)} live client(s): {', '.join(live)}" if live else
                 "no client of it is alive (a dead host?)")
        return InUse(f"{op} {vid}: {self.pool}/{img} is held by {_who(holder)}; {state}", op=op, obj=vid,
                     hint=hint)

    # The records are image metadata (``rbd image-meta`` lists them), read and written as
    # the omap keys librbd keeps them under in the image's header object (cls_rbd's
    # ``metadata_<key>``, raw value): one round trip each, without opening the image. An
    # open (~12 ms on the test cluster: the header, and a clone's parent too, are read;
    # a watch registered for writing) is what a librbd metadata_set would cost first.

    def _header(self, vid: str, img: str, op: str) -> str:
        """The name of the image's header object (``rbd_header.<image id>``); NotFound when
        the image is gone."""
        rados, _ = librbd()
        try:
            with named(op, img):
                raw = self.ioctx().read(f"rbd_id.{img}")
        except KernelError as e:
            if e.errno != errno.ENOENT:
                raise
            raise NotFound(f"{op} {vid}: its image {self.pool}/{img} is gone", op=op, obj=vid) from None
        n = struct.unpack_from("<I", raw)[0]
        return "rbd_header." + bytes(raw[4:4 + n]).decode()

    def _records(self, header: str, img: str) -> tuple[dict[str, str], int]:
        """This image's cowdisk records (owner, holder, template, parent) in one read, and
        the header object's version they were read at."""
        rados, _ = librbd()
        keys = tuple(META_PREFIX + k for k in (OWNER, HOLDER, TEMPLATE_KEY, PARENT_KEY))
        with named("read records", img), rados.ReadOpCtx() as op:
            it, _ = self.ioctx().get_omap_vals_by_keys(op, keys)
            self.ioctx().operate_read_op(op, header)
            version = int(self.ioctx().get_last_version())
            return {k[len(META_PREFIX):]: bytes(v).decode() for k, v in it}, version

    def _update(self, vid: str, img: str, op: str,
                change: Callable[[dict[str, str]], tuple[dict[str, str], tuple[str, ...]]]) -> dict[str, str]:
        """Read the records, let ``change`` decide what to set and remove (or raise), and
        write that in one operation that asserts the header's version it read (a compare
        and swap: two stores attaching at once cannot both win, and a header removed in
        between is never recreated). Retried when the header changed meanwhile (ERANGE,
        EOVERFLOW); NotFound when the image is gone. Returns the records read."""
        rados, _ = librbd()
        for attempt in range(8):
            hdr = self._header(vid, img, op)
            rec, version = self._records(hdr, img)
            put, drop = change(rec)
            if not put and not drop:
                return rec
            try:
                with named(op, img), rados.WriteOpCtx() as w:
                    w.assert_version(version)
                    if put:
                        self.ioctx().set_omap(w, tuple(META_PREFIX + k for k in put),
                                              tuple(v.encode() for v in put.values()))
                    if drop:
                        self.ioctx().remove_omap_keys(w, tuple(META_PREFIX + k for k in drop))
                    self.ioctx().operate_write_op(w, hdr)
                return rec
            except KernelError as e:
                if e.errno not in (errno.ERANGE, errno.EOVERFLOW) or attempt == 7:
                    raise
        raise AssertionError("unreachable")

    def _held_elsewhere_now(self, op: str, vid: str, img: str, holder: str, hint: str) -> InUse:
        """The InUse for an image another store holds (opened read-only to list its clients)."""
        _, rbd = librbd()
        with named(op, img), rbd.Image(self.ioctx(), img, read_only=True) as im:
            return self._held_elsewhere(op, vid, img, im, holder, hint)

    def _hold(self, vid: str, img: str, parent: str | None) -> None:
        """Record this store as the holder (and, for a new clone, the ``parent`` snapshot it
        was cloned from): one read and one write of the image's records.
        No owner is recorded here: until a store adopts the volume, its owner is the store
        that made it, the only one whose registry has it."""
        def change(rec: dict[str, str]) -> tuple[dict[str, str], tuple[str, ...]]:
            owner, cur = rec.get(OWNER, ""), rec.get(HOLDER, "")
            if owner and not self._mine(owner):
                raise InUse(f"attach volume {vid}: {self.pool}/{img} belongs to {_who(owner)} (adopted there)",
                            op="attach volume", obj=vid,
                            hint=f"`cowdisk volume rm {vid}` forgets it here and leaves it to that store; "
                                 f"`cowdisk volume adopt {vid}` after that takes it back")
            if cur and not self._mine(cur):
                raise self._held_elsewhere_now("attach volume", vid, img, cur,
                                               "checkpoint it there first; if that host is dead, `cowdisk volume "
                                               "restore --steal` takes it over (fencing that host's clients)")
            put = {} if cur == self.holder else {HOLDER: self.holder}
            if parent is not None and PARENT_KEY not in rec:
                put[PARENT_KEY] = parent
            return put, ()

        self._update(vid, img, "attach volume", change)

    def _release_hold(self, img: str, *, deadline_s: float | None = None, vid: str = "", keep: bool = False) -> None:
        """Clear our holder record (``keep``: only wait). With ``deadline_s`` (map=none, where
        a VMM opens the image itself) first wait that long for other clients to close it,
        else InUse."""
        _, rbd = librbd()
        try:
            hdr = self._header(vid, img, "release hold")
        except NotFound:
            return
        if not self._mine(self._records(hdr, img)[0].get(HOLDER, "")):
            return
        if deadline_s is not None:
            with named("release hold", img):
                try:
                    with rbd.Image(self.ioctx(), img, read_only=True) as im:
                        me = self._my_addr()
                        end = time.monotonic() + deadline_s
                        while live := [w["addr"] for w in im.watchers_list() if w["addr"] != me]:
                            if time.monotonic() > end:
                                raise InUse(f"detach volume {vid}: its image is still open by {', '.join(live)}",
                                            op="detach volume", obj=vid, hint="stop the VM that uses it first")
                            time.sleep(0.05)
                except rbd.ImageNotFound:
                    return
        if not keep:
            with contextlib.suppress(NotFound):
                self._update(vid, img, "release hold",
                             lambda rec: ({}, (HOLDER,) if self._mine(rec.get(HOLDER, "")) else ()))

    def _my_addr(self) -> str:
        try:
            return str(self._cluster.get_addrs()) if self._cluster is not None else ""
        except Exception:  # noqa: BLE001 - older bindings
            return ""

    def take_over(self, ctx: VolumeCtx) -> str | None:
        """Fence whoever holds volume ``ctx.id`` and clear the hold: every other client
        watching the image is blocklisted (it can no longer write, even if that host comes
        back), its exclusive lock broken. Returns the old holder. Idempotent. For a host
        known dead (or to be cut off): a live VM there loses its disk."""
        _, rbd = librbd()
        img = volume_image(ctx.id)
        io = self.ioctx()
        with named("take over volume", img):
            try:
                im = rbd.Image(io, img)
            except rbd.ImageNotFound:
                raise NotFound(f"take over volume {ctx.id}: its image {self.pool}/{img} is gone",
                               op="take over volume", obj=ctx.id) from None
            with im:
                old = str(dict(im.metadata_list()).get(HOLDER, "")) or None
                mine = self._my_addr()
                for w in im.watchers_list():
                    if w["addr"] != mine:
                        self._blocklist(w["addr"])
                for o in im.lock_get_owners():
                    with contextlib.suppress(rbd.ImageNotFound):
                        im.lock_break(o["mode"], o["owner"])
                if old is not None:
                    im.metadata_remove(HOLDER)
        log.warning("volume %s: took over from %s (its clients are fenced)", ctx.id, old or "no holder")
        return old

    # -- volumes other stores made --------------------------------------------------------

    def shared_volume(self, vid: str) -> SharedVolume:
        """Volume ``vid`` as the cluster records it (NotFound when it has no image)."""
        _, rbd = librbd()
        img = volume_image(vid)
        io = self.ioctx()
        with named("read volume", img):
            try:
                with rbd.Image(io, img, read_only=True) as im:
                    meta = dict(im.metadata_list())
                    size = im.size()
                    clients = tuple(w["addr"] for w in im.watchers_list())
                    tid = str(meta.get(TEMPLATE_KEY, "")) or self._template_of(im)
            except rbd.ImageNotFound:
                raise NotFound(f"volume {vid}: no image {self.pool}/{img} in the cluster", op="read volume",
                               obj=vid, hint="`cowdisk volume list --shared` lists the volumes there") from None
            digest, tsize = "", 0
            if tid:
                with contextlib.suppress(rbd.ImageNotFound), \
                        rbd.Image(io, template_image(tid), read_only=True) as t:
                    digest = str(dict(t.metadata_list()).get(DIGEST, ""))
                    tsize = t.size()
        return SharedVolume(vid, size, tid, digest, tsize, str(meta.get(OWNER, "")), str(meta.get(HOLDER, "")),
                            clients)

    def _template_of(self, im: Any) -> str:
        """The template id at the root of an image's parent chain ("" when there is none):
        for images made before the template was recorded in their metadata."""
        _, rbd = librbd()
        opened: list[Any] = []
        try:
            for _ in range(64):
                try:
                    parent = im.parent_info()[1]
                except rbd.ImageNotFound:
                    return ""
                if parent.startswith("cowdisk-t-"):
                    return str(parent[len("cowdisk-t-"):])
                if not parent.startswith("cowdisk-v-"):
                    return ""
                im = rbd.Image(self.ioctx(), parent, read_only=True)
                opened.append(im)
            return ""
        finally:
            for o in opened:
                o.close()

    def shared_volumes(self) -> list[SharedVolume]:
        """Every volume image in the store's pool and namespace, whichever store made it."""
        _, rbd = librbd()
        with named("list images", f"{self.pool}/{self.namespace}"):
            names = rbd.RBD().list(self.ioctx())
        out = []
        for n in sorted(names):
            if n.startswith("cowdisk-v-"):
                with contextlib.suppress(NotFound):  # removed meanwhile
                    out.append(self.shared_volume(n[len("cowdisk-v-"):]))
        return out

    def has_template(self, tid: str) -> bool:
        """Whether template ``tid``'s image and protected snapshot are in the cluster."""
        _, rbd = librbd()
        if tid in self._ready:
            return True
        with named("read template", template_image(tid)):
            try:
                with rbd.Image(self.ioctx(), template_image(tid), read_only=True) as im:
                    return any(s["name"] == template_snap(tid) for s in im.list_snaps())
            except rbd.ImageNotFound:
                return False

    def claim(self, ctx: VolumeCtx, *, steal: bool = False) -> None:
        """Make this store the owner of volume ``ctx.id`` (adopt). Refused while another
        store holds it attached, naming that store and host, unless ``steal`` (the store
        then fences it with :meth:`take_over` before attaching)."""
        img = volume_image(ctx.id)

        def change(rec: dict[str, str]) -> tuple[dict[str, str], tuple[str, ...]]:
            holder = rec.get(HOLDER, "")
            if holder and not self._mine(holder) and not steal:
                raise self._held_elsewhere_now("adopt volume", ctx.id, img, holder,
                                               "checkpoint it there first; if that host is dead, adopt it with "
                                               "--steal (fences that host's clients)")
            put = {} if rec.get(OWNER) == self.holder else {OWNER: self.holder}
            if TEMPLATE_KEY not in rec:
                put[TEMPLATE_KEY] = ctx.template.id
            return put, ()

        self._update(ctx.id, img, "adopt volume", change)

    def unclaim(self, ctx: VolumeCtx, previous: str) -> None:
        """Give volume ``ctx.id`` back to its ``previous`` owner (an adopt rolled back);
        nothing when another store claimed it meanwhile or the image is gone."""
        img = volume_image(ctx.id)

        def change(rec: dict[str, str]) -> tuple[dict[str, str], tuple[str, ...]]:
            cur = rec.get(OWNER, "")
            if cur and not self._mine(cur):
                return {}, ()
            if previous:
                return {OWNER: previous}, ()
            return {}, ((OWNER,) if cur else ())

        with contextlib.suppress(NotFound):
            self._update(ctx.id, img, "give volume back", change)

    def _blocklist(self, addr: str) -> None:
        cmd = json.dumps({"prefix": "osd blocklist", "blocklistop": "add", "addr": addr})
        with named("blocklist client", addr):
            ret, _, err = self._cluster.mon_command(cmd, b"", timeout=30)
            if ret != 0:
                raise KernelError("blocklist client", addr, abs(ret), detail=err)


def _who(record: str) -> str:
    """``<tag>@<host>`` as words: "store cowdisk:1a2b3c4d on host h1"."""
    tag, _, host = record.rpartition("@")
    return f"store {tag} on host {host}" if tag else f"store {record}"
