"""The parts of the documentation that are facts of the code, generated from it: the exit
codes (``cowdisk --help``, docs/cli.md), the backends and the order ``auto`` tries them in
(README.md, docs/cli.md).

In a Markdown file a generated block stands between ``<!-- generated: NAME -->`` and
``<!-- end: NAME -->``. ``python3 -m cowdisk.cli.reference`` rewrites every block of
README.md and docs/ in place (run it from the repository); ``--check`` only says which
differ (exit 1). tests/unit/test_docs.py fails when a block is stale.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Iterator

import click

EXIT_CODES: dict[int, tuple[str, str]] = {
    0: ("ok", "success"),
    1: ("other", "other error (also an OS error not wrapped by cowdisk, e.g. permissions on `--root`; "
                 "`recover`/`gc` when a repair failed; an internal error)"),
    2: ("invalid argument or usage", "invalid argument (bad id, name, size, column, filter, backend mismatch) "
                                     "or a usage error of the parser (unknown option, bad value, missing argument)"),
    3: ("not found", "not found (volume, template, store, file)"),
    4: ("kernel or object store error", "kernel error (an ioctl or syscall failed; the errno is in the message), "
                                        "or the object store failed, refused, timed out or sent what fails its check"),
    5: ("already exists", "already exists"),
    6: ("in use", "in use (a VM holds the device, volumes use the template)"),
    7: ("wrong state", "wrong state for the operation (e.g. restore an attached volume)"),
    8: ("template changed", "template changed on disk since import"),
    9: ("unsupported", "unsupported on this host (e.g. reflink on ext4, jail across filesystems)"),
    10: ("lock timeout", "lock timeout (another process holds the volume or template)"),
    11: ("snapshot invalid", "dm-snapshot invalid (COW overflow or I/O error)"),
    12: ("COW format error", "a dm-snapshot COW file is unreadable or corrupt (offline flatten of a detached volume)"),
    13: ("registry damaged", "the store's registry is damaged or lost (`cowdisk recover --rebuild-registry` "
                             "rebuilds it from the manifests beside each volume and template)"),
    20: ("forbidden", "not allowed: only root may do this (`chown`, `recover`, `gc`, destroy the store; a shared "
                      "template of another owner is its owner's to remove and to name), or the daemon refused the "
                      "caller (not in its allowlist) or a path outside its roots"),
    21: ("cancelled (daemon)", "a daemon job was cancelled; what it had made is undone"),
    22: ("unavailable (daemon)", "no daemon answers on the socket, or it is shutting down"),
    23: ("worker died (daemon)", "the daemon's store worker died during the call; the daemon ran recovery, "
                                 "the message says what it did"),
    141: ("stdout closed", "stdout's reader went away (`cowdisk volume ls | head -1`): the command ends "
                           "quietly of SIGPIPE, as coreutils do (128 + 13)"),
}
"""Every exit status, with a few words (``cowdisk --help``) and a sentence (docs/cli.md).
tests/unit/test_docs.py checks that every error type's ``exit_code`` is here."""


def commands(group: click.Group,
             prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """Every command and group under ``group`` (``cowdisk.cli.cli``, the root) with its path,
    each module imported (the root names them lazily)."""
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None:
            continue
        yield prefix + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from commands(cmd, prefix + (name,))


def error_types() -> dict[int, list[str]]:
    """Each exit code and the error types (class names) raised with it: the store's and the
    daemon's, as the daemon's error document names them."""
    from ..errors import ERROR_TYPES

    out: dict[int, list[str]] = {}
    for name, cls in sorted(ERROR_TYPES.items(), key=lambda kv: (kv[1].exit_code, kv[0] != "CowdiskError")):
        out.setdefault(cls.exit_code, []).append(name)
    return out


def exit_codes_line() -> str:
    """The exit codes as ``cowdisk --help`` lists them."""
    text = ", ".join(f"{code} {short}" for code, (short, _) in EXIT_CODES.items())
    return f"Exit codes: {text} (see docs/cli.md)."


def exit_codes_table() -> str:
    types = error_types()
    rows = ["| code | meaning | raised as |", "| --- | --- | --- |"]
    for code, (_, long) in EXIT_CODES.items():
        raised = ", ".join(t if " " in t else f"`{t}`" for t in types.get(code, []))
        rows.append(f"| {code} | {long} | {raised} |")
    return "\n".join(rows)


BACKEND_DOCS: dict[str, tuple[str, str]] = {
    "dm-thin": ("a thin snapshot of the template's thin device in one dm thin-pool per store (two loops over "
                "sparse files, or block devices you name) ([docs/dm-thin.md](docs/dm-thin.md))",
                "device-mapper with the thin-pool target (thin-provisioning-tools to check it after a crash)"),
    "dm-snapshot": ("a dm `snapshot` of a shared read-only template loop, with a sparse COW file on its own loop",
                    "device-mapper with the snapshot target"),
    "reflink": ("a FICLONE of the template file", "store on btrfs or xfs (reflink=1)"),
    "pool": ("a reflink inside an embedded sparse xfs image, loop-mounted under the store",
             "loop devices and `mkfs.xfs`"),
    "copy": ("a sparse-aware copy of the template", "nothing"),
    "rbd": ("a clone of the template's protected snapshot in a Ceph pool, exported as a file or opened by QEMU "
            "([docs/rbd.md](docs/rbd.md))", "a Ceph cluster (`lab/ceph_cluster.py` starts one)"),
}
"""What a volume is on each backend and what the host needs: the README's table. A backend
the registry has and this table lacks (or the reverse) fails :func:`backends_table`."""


def auto_order() -> str:
    """The sentence saying the order ``auto`` tries the backends in."""
    from ..backends import BACKENDS, NOT_AUTO

    tried = [f"`{b}`" for b in BACKENDS if b not in NOT_AUTO]
    never = [f"`{b}`" for b in BACKENDS if b in NOT_AUTO]
    return (f"`auto` (the default) picks the first backend that works on this host, in this order: "
            f"{', '.join(tried)} (`copy` always works); it never picks {', '.join(never)}, which needs settings "
            f"only you can give. `cowdisk doctor` explains the choice on this host.")


def backends_table() -> str:
    from ..backends import BACKENDS, NOT_AUTO

    if set(BACKEND_DOCS) != set(BACKENDS):
        raise ValueError(f"BACKEND_DOCS names {sorted(BACKEND_DOCS)}, the backend registry {sorted(BACKENDS)}")
    rows = ["| backend | a volume is | needs |", "| --- | --- | --- |"]
    for b in BACKENDS:
        what, needs = BACKEND_DOCS[b]
        rows.append(f"| `{b}` | {what}{'; never picked by `auto`' if b in NOT_AUTO else ''} | {needs} |")
    return "\n".join(rows) + "\n\n" + auto_order()


def backend_names() -> str:
    """The ``--backend`` values, for docs/cli.md's options table."""
    from ..backends import BACKENDS

    return ", ".join(f"`{b}`" for b in ("auto", *BACKENDS))


BLOCKS = {
    "exit-codes": exit_codes_table,
    "backends": backends_table,
    "auto-order": auto_order,
    "backend-names": backend_names,
}
"""Every generated block by name."""

_BLOCK = re.compile(r"(<!-- generated: (?P<name>[a-z-]+) -->)(?P<body>.*?)(<!-- end: (?P=name) -->)", re.S)


def render(text: str) -> str:
    """``text`` with every generated block made again from the code. A block is inline
    when its markers are on one line, else it stands on lines of its own."""
    def one(m: re.Match[str]) -> str:
        body = BLOCKS[m["name"]]()
        if "\n" in m["body"]:
            body = "\n" + body + "\n"
        else:
            body = " " + " ".join(body.split()) + " "
        return m.group(1) + body + m.group(4)

    return _BLOCK.sub(one, text)


def doc_files(top: str) -> list[str]:
    """README.md and every Markdown file under docs/."""
    out = [os.path.join(top, "README.md")]
    for d, _, files in os.walk(os.path.join(top, "docs")):
        out += [os.path.join(d, f) for f in sorted(files) if f.endswith(".md")]
    return out


def main(argv: list[str] | None = None) -> int:
    """``python3 -m cowdisk.cli.reference [--check] [TOP]``: rewrite (or check) the
    generated blocks of the documentation under TOP (default: the current directory)."""
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    args = [a for a in args if a != "--check"]
    top = args[0] if args else "."
    stale = []
    for path in doc_files(top):
        with open(path) as f:
            text = f.read()
        new = render(text)
        if new != text:
            stale.append(path)
            if not check:
                with open(path, "w") as f:
                    f.write(new)
    for p in stale:
        print(f"{'stale' if check else 'rewrote'}: {p}", file=sys.stderr)
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["commands", "EXIT_CODES", "BLOCKS", "exit_codes_line", "exit_codes_table", "backends_table", "render", "main"]
