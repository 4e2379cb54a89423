"""The command examples of README.md and docs/: every fenced shell block (``sh``, ``console``)
is marked by the line above it, which says what the tests do with it:

* ``<!-- example: run -->``: tests/host/test_doc_examples.py runs it with bash against a
  scratch store (``cowdisk`` on PATH is this checkout, ``COWDISK_ROOT`` the store);
* ``<!-- example: transcript -->``: the same, for a block of ``$ command`` lines each
  followed by its output, and the output must be what the block shows (the store's root
  written as ``/var/lib/cowdisk``);
* ``<!-- example: parse: WHY -->``: it needs what the host tier lacks (the kernel lab, Ceph,
  a VMM, systemd); tests/unit/test_docs.py parses each ``cowdisk`` command in it with the
  command line's own parser (as it does for every block);
* ``<!-- example: not run: WHY -->``: no ``cowdisk`` command in it, and why it is not run.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex

import click

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_FENCE = re.compile(r"^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```\s*$", re.S | re.M)
_MARK = re.compile(r"<!-- example: (?P<kind>run|transcript|parse|not run)(?:: (?P<why>.+?))? -->\s*$")
SHELL = ("sh", "bash", "shell", "console")


@dataclasses.dataclass
class Block:
    path: str
    line: int
    lang: str
    kind: str | None
    why: str
    body: str

    @property
    def where(self) -> str:
        return f"{os.path.relpath(self.path, REPO)}:{self.line}"


def doc_files() -> list[str]:
    from cowdisk.cli.reference import doc_files as files

    return files(REPO)


def blocks() -> list[Block]:
    """Every fenced block of README.md and docs/ in a shell language, or without one whose
    first line is a ``$ `` prompt (a transcript)."""
    out = []
    for path in doc_files():
        with open(path) as f:
            text = f.read()
        for m in _FENCE.finditer(text):
            lang, body = m["lang"], m["body"]
            if lang not in SHELL and not (lang == "" and body.startswith("$ ")):
                continue
            line = text.count("\n", 0, m.start()) + 1
            before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            mark = _MARK.search(before)
            out.append(Block(path, line, lang, mark["kind"] if mark else None, (mark["why"] or "") if mark else "",
                             body))
    return out


def _balanced(text: str) -> bool:
    try:
        shlex.split(text, comments=True)
    except ValueError:
        return False
    return True


_PLACEHOLDER = re.compile(r"<[^<>\n]*\s[^<>\n]*>")
"""A placeholder in prose (``<vm1's arguments, ...>``), not shell."""


def _logical_lines(body: str, transcript: bool) -> list[str]:
    """The block's command lines: continuations joined, a quote left open on one line
    closed on a later one, transcripts' output dropped."""
    text = _PLACEHOLDER.sub("PLACEHOLDER", body.replace("\\\n", " "))
    lines: list[str] = []
    part = ""
    for line in text.splitlines():
        if not part and transcript:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        part = f"{part}\n{line}" if part else line
        if _balanced(part):
            lines.append(part)
            part = ""
    if part:
        lines.append(part)
    return lines


_SUBST = re.compile(r"\$\(([^()]*)\)")
_CONTROL = {"|", "||", "&&", ";", "&", "(", ")"}


def cowdisk_commands(block: Block) -> list[list[str]]:
    """The argument lists of every ``cowdisk`` call in the block: plain, after ``sudo``,
    environment assignments or ``xargs`` (which adds an id), and inside ``$(...)``."""
    out: list[list[str]] = []
    pending = _logical_lines(block.body, block.kind == "transcript" or block.lang == "console")
    while pending:
        line = pending.pop(0)
        for inner in _SUBST.findall(line):
            pending.append(inner)
        line = _SUBST.sub("X", line)
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        lex.commenters = "#"
        try:
            tokens = list(lex)
        except ValueError as e:
            raise AssertionError(f"{block.where}: cannot split {line!r}: {e}") from None
        seg: list[str] = []
        for tok in [*tokens, ";"]:
            if tok not in _CONTROL:
                seg.append(tok)
                continue
            words = [w for w in seg]
            seg = []
            while words and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]) or words[0] == "sudo"):
                words.pop(0)
            extra: list[str] = []
            if words and words[0] == "xargs":
                words.pop(0)
                while words and words[0].startswith("-"):
                    words.pop(0)
                extra = ["vm1"]
            if not words or words[0] != "cowdisk":
                continue
            argv = []
            for w in words[1:]:
                if w in (">", ">>", "<", "2>", "2>&1", ">&"):
                    break
                argv.append(w)
            if argv:
                out.append(argv + extra)
    return out


def parse(argv: list[str]) -> None:
    """Parse ``cowdisk ARGV`` with the command line's own parser, down to its command, and
    run nothing; a usage error raises click's exception."""
    from cowdisk.cli import cli

    cmd: click.Command = cli
    name = "cowdisk"
    parent: click.Context | None = None
    args = list(argv)
    while True:
        try:
            ctx = cmd.make_context(name, args, parent=parent)
        except click.exceptions.Exit:  # --help, --version
            return
        if not isinstance(cmd, click.Group):
            return
        rest = [*ctx._protected_args, *ctx.args]
        if not rest:
            return
        name, sub, args = cmd.resolve_command(ctx, rest)
        if sub is None or name is None:
            raise click.UsageError(f"no command {rest[0]!r}")
        cmd, parent = sub, ctx
