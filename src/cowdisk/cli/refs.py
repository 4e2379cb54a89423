"""What the ``template`` and ``volume`` commands share: a template reference as the store
finds it, owners given and shown, a template shown. Its own module so that a ``volume``
command does not build every ``template`` command (the command line imports a command's
module when it runs it: bench/startup.py)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgument
from ..model import validate_id
from .base import App, human_bytes, when

if TYPE_CHECKING:
    from ..contract import StoreAPI
    from ..model import Template

DIGEST_PREFIX = 6
"""The shortest digest prefix a template is found by (hex digits)."""

_DIGEST = re.compile(rf"[0-9a-f]{{{DIGEST_PREFIX},64}}")


def template_ref(ref: str) -> str:
    """A template reference as the store finds it: its id, a name, or a prefix of its digest
    of at least 6 hex digits, bare or as ``sha256:<hex>`` (the form ``inspect`` prints);
    InvalidArgument (exit 2) for anything else."""
    if ref.startswith("sha256:"):
        digest = ref.removeprefix("sha256:")
        if not _DIGEST.fullmatch(digest):
            raise InvalidArgument(f"invalid template digest {ref!r}: sha256: and {DIGEST_PREFIX} to 64 lower-case "
                                  "hex digits", op="validate id", obj=repr(ref))
        return digest
    return validate_id(ref, "template name or id")


def parse_owner(text: str) -> int:
    """An owner given on the command line: a uid, or a user name of this host."""
    if text.isdigit():
        return int(text)
    import pwd

    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise InvalidArgument(f"owner {text!r}: not a uid, and no user of that name", op="parse owner",
                              obj=text) from None


def owners_as_uids(wanted: dict[str, set[str]]) -> dict[str, set[str]]:
    """``--filter owner=NAME`` as the uid the rows hold (a uid stays as it is)."""
    if "owner" in wanted:
        wanted["owner"] = {str(parse_owner(o)) for o in wanted["owner"]}
    return wanted


def owner_name(uid: int) -> str:
    """``uid`` with its user name when this host has one (``1000 (alice)``)."""
    import pwd

    try:
        return f"{uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return str(uid)


def lazy_cell(d: Any) -> str:
    """A lazy template's cache in a cell (``-`` for a template with its file here)."""
    if not d:
        return "-"
    loops = ", ".join(f"/dev/loop{n}" for n in d["loops"])
    return (f"{human_bytes(d['cached_bytes'])} cached ({d['cached_chunks']}/{d['data_chunks']} chunks"
            + (", whole" if d["whole"] else "") + (f", read by {loops}" if loops else "") + ")")


def show_template(app: App, store: StoreAPI, t: Template, title: str) -> None:
    app.show(store.template_doc(t), title, lambda d: {
        "id": d["id"], "names": d["names"], "size": f"{human_bytes(d['size'])} ({d['size']} bytes)",
        "on disk": human_bytes(d["disk_bytes"]), "digest": f"sha256:{d['digest']}", "state": d["state"],
        "source": d["source"], "path": d["path"], "volumes": d["users"],
        "owner": owner_name(d["owner"]) + (", shared" if d["shared"] else ""), "created": when(d["created"])}
        | ({"lazy": f"manifest {d['lazy']['manifest']}, " + lazy_cell(d["lazy"])
                    + (", served" if d["lazy"]["served"] else ", not served")} if d.get("lazy") else {}))
