"""The listings a daemon answers, run without click (issue 22, item 4: a command line call
through a daemon within 2x of a bare ``python3 -c pass``; click alone costs about as much to
import as the interpreter to start).

``cowdisk volume ls`` and ``cowdisk template ls`` through a daemon serving the store need
the client, the listing code (:mod:`.lists`) and the output (:mod:`.base`), nothing of click.
:func:`run` takes an argument vector only when every token is plain and its meaning certain:

- global options before the command word pair, the command's options (and the global ones
  it accepts) after it; long options spelled in full (``--template base``,
  ``--template=base``), short ones alone (``-t base``, ``-q``); a value never starting with
  ``-``;
- no ``-v``, ``--help``, ``--version``, ``--``, abbreviation, cluster (``-qv``), attached
  short value (``-tbase``) or positional argument; shell completion is not asked for;
- a store at the root and a daemon serving it that answers.

Anything else, and every error (a bad ``-o`` column, an unknown template, a daemon that
stopped), returns None before a byte is written: :func:`cowdisk.cli.main` then runs the
command through click, which says every error the one way it says them. The tables below
are checked against the click commands by tests/unit/test_cli_light.py, and what both
paths print for the same arguments is compared by tests/host/test_faces.py.
"""

from __future__ import annotations

import os
from typing import Any

from ..defaults import default_root

VALUE, FLAG, MULTI = "value", "flag", "multiple"
"""How an option takes its argument: one value (the last given wins), none, or repeatable."""


class Opt:
    """One option: where its value goes (the click parameter's name) and how it takes it.
    (Plain classes here, not NamedTuples: those cost a quarter of a millisecond each to make.)"""

    __slots__ = ("dest", "kind")

    def __init__(self, dest: str, kind: str) -> None:
        self.dest = dest
        self.kind = kind


GLOBAL = {"--root": Opt("root", VALUE), "--backend": Opt("backend", VALUE), "-q": Opt("quiet", FLAG),
          "--quiet": Opt("quiet", FLAG), "--json": Opt("json", FLAG), "--timeout": Opt("timeout", VALUE)}
"""The global options (cli/app.py global_params) the light path takes; ``-v`` is left to
click (it sets up logging and says which way the command went)."""

LIST = {"-q": Opt("ids_only", FLAG), "--quiet": Opt("ids_only", FLAG), "--no-headings": Opt("no_headings", FLAG),
        "-o": Opt("columns", VALUE), "--output": Opt("columns", VALUE), "--filter": Opt("filters", MULTI)}
"""cli/app.py list_options: every list command's own options."""


class Command:
    """A listing: its function in cli/lists.py (imported once the arguments are taken:
    ``--version`` does not pay it) and its own options."""

    __slots__ = ("run", "options")

    def __init__(self, run: str, options: dict[str, Opt]) -> None:
        self.run = run
        self.options = options


COMMANDS = {
    ("volume", "ls"): Command("list_volumes", LIST | {"--template": Opt("tref", VALUE), "-t": Opt("tref", VALUE)}),
    ("template", "ls"): Command("list_templates", LIST | {"--remote": Opt("remote", FLAG), "--from": Opt("at", VALUE),
                                                           "--lazy": Opt("lazy", FLAG)}),
}
"""The command word pairs the light path runs, and their options beside the global ones."""


def _take(table: dict[str, Opt], argv: list[str], i: int, out: dict[str, Any]) -> int | None:
    """Read the option at ``argv[i]`` into ``out``: the index after it, or None when it is
    not certain (not in ``table``, abbreviated, clustered, a value that looks like an option)."""
    name, eq, value = argv[i].partition("=") if argv[i].startswith("--") else (argv[i], "", "")
    opt = table.get(name)
    if opt is None:
        return None
    if opt.kind == FLAG:
        if eq:
            return None
        out[opt.dest] = True
        return i + 1
    if not eq:
        if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
            return None
        value = argv[i + 1]
        i += 1
    if opt.kind == MULTI:
        out[opt.dest] = (*out.get(opt.dest, ()), value)
    else:
        out[opt.dest] = value
    return i + 1


def parse(argv: list[str]) -> tuple[Command, dict[str, Any], dict[str, Any], dict[str, Any]] | None:
    """(command, its options, the global options before it, the global options after it), or
    None when ``argv`` is not one the light path takes."""
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    params: dict[str, Any] = {}
    words: list[str] = []
    i = 0
    while i < len(argv) and len(words) < 2:
        if argv[i].startswith("-"):
            if words:  # the command groups take no options of their own
                return None
            nxt = _take(GLOBAL, argv, i, before)
            if nxt is None:
                return None
            i = nxt
        else:
            words.append(argv[i])
            i += 1
    command = COMMANDS.get((words[0], words[1])) if len(words) == 2 else None
    if command is None:
        return None
    while i < len(argv):
        if not argv[i].startswith("-"):
            return None  # the listings take no arguments
        name = argv[i].partition("=")[0] if argv[i].startswith("--") else argv[i]
        nxt = _take(command.options, argv, i, params) if name in command.options else _take(GLOBAL, argv, i, after)
        if nxt is None:
            return None
        i = nxt
    return command, params, before, after


def _seconds(text: str | None) -> tuple[bool, float | None]:
    """(certain, value) of a ``--timeout`` as click's FloatRange(min=0) reads it."""
    if text is None:
        return True, None
    try:
        v = float(text)
    except ValueError:
        return False, None
    return v >= 0, v


def run(argv: list[str]) -> int | None:
    """Run ``argv`` through the daemon serving its store without click: its exit status, or
    None (nothing written) when the click path is to run it."""
    if "_COWDISK_COMPLETE" in os.environ:
        return None
    got = parse(argv)
    if got is None:
        return None
    command, params, before, after = got
    from ..errors import CowdiskError
    from . import lists
    from .base import PIPE_CLOSED, App, overrides

    (sure, timeout), (sure_late, late) = _seconds(before.get("timeout")), _seconds(after.get("timeout"))
    if not (sure and sure_late):
        return None
    backend = before["backend"] if "backend" in before else os.environ.get("COWDISK_BACKEND") or "auto"
    if backend != "auto" and overrides(after.get("backend")):
        return None  # click checks the name the later one overrides too; the daemon checks only the last
    app = App(before["root"] if "root" in before else default_root(), backend, 0, bool(before.get("quiet")))
    app.json = bool(before.get("json"))
    app.timeout = timeout
    for attr, value in (("root", after.get("root")), ("backend", after.get("backend")), ("quiet", after.get("quiet")),
                        ("json", after.get("json")), ("timeout", late)):
        if overrides(value):  # as the global options after a subcommand set the App (cli/app.py)
            setattr(app, attr, os.path.abspath(str(value)) if attr == "root" else value)
    unset = {o.dest: False if o.kind == FLAG else () if o.kind == MULTI else None for o in command.options.values()}
    try:
        if not app.has_store():
            return None  # click prints the empty listing (and imports no client either)
        from ..client import for_root

        client = for_root(app.root, backend=app.backend, lock_timeout=app.timeout)
        if client is None:
            return None
        app.use(client)
        getattr(lists, command.run)(app, **(unset | params))
    except BrokenPipeError:
        return PIPE_CLOSED
    except (CowdiskError, OSError):
        return None  # nothing printed yet: the click path runs it again and says the error
    finally:
        app.close()
    return 0


__all__ = ["COMMANDS", "GLOBAL", "LIST", "parse", "run"]
