"""The command examples of README.md and docs/: every fenced shell block (``sh``, ``console``)
is marked by the line above it, which says what the tests do with it:

* ``<!-- example: run -->``: tests/host/test_doc_examples.py runs it with bash
  (``set -e -o pipefail``) against a scratch store (``cowdisk`` on PATH is this checkout,
  ``COWDISK_ROOT`` the store, holding template ``base`` and volumes vm1 and vm2);
* ``<!-- example: transcript -->``: the same, for a block of ``$ command`` lines each
  followed by its output, and the output must be what the block shows (the store's root
  written as ``/var/lib/cowdisk``);
* ``<!-- example: ceph -->``: tests/ceph/test_doc_examples_ceph.py runs it with bash like a
  ``run`` block, in the Ceph tier, against the tier's one session cluster (and its RADOS
  Gateway);
* ``<!-- example: parse: WHY -->``: it needs what no test host has (Firecracker, a whole
  machine's setup...), WHY says what; tests/unit/test_docs.py parses each ``cowdisk``
  command in it with the command line's own parser (as it does for every block);
* ``<!-- example: not run: WHY -->``: no ``cowdisk`` command in it, and why it is not run.

A ``run`` or ``ceph`` block may name, after a colon, the substitutions its runner makes
(``<!-- example: ceph: cluster, roots -->``), each one of :data:`SUBSTITUTIONS`: they put
the test's scratch stores, socket and cluster where the doc names the real ones, so the
doc's own text is what runs. Only the named ones are made, each must change the block
(tests/unit/test_docs.py), and no runnable block may still name a real store, socket or
cluster once they are made (:func:`render` refuses it).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import stat
import subprocess
import sys

import click

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_FENCE = re.compile(r"^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```\s*$", re.S | re.M)
_MARK = re.compile(r"<!-- example: (?P<kind>run|transcript|ceph|parse|not run)(?:: (?P<why>.+?))? -->\s*$")
RUNNABLE = ("run", "transcript", "ceph")
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

    @property
    def substitutions(self) -> list[str]:
        """The substitutions a runnable block's marker names (none for the others)."""
        if self.kind not in RUNNABLE or not self.why:
            return []
        return [w.strip() for w in self.why.split(",")]


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


# --------------------------------------------------------------------------- running blocks


@dataclasses.dataclass
class Places:
    """Where a runner's scratch things are: what the substitutions put in the doc's text."""

    root: str  # store A, the block's COWDISK_ROOT
    root_b: str = ""  # store B
    root_rbd: str = ""  # where the rbd store of docs/rbd.md is made
    socket: str = ""  # the daemon's socket (COWDISK_SOCKET)
    ceph_dir: str = ""  # the session cluster's directory


SUBSTITUTIONS = {
    "installed": "`./install.sh` is taken as done (the test machines ran it): it becomes `true`",
    "daemon": "`/run/cowdisk/cowdisk.sock` is the scratch socket ($COWDISK_SOCKET); a line that starts "
              "`cowdisk serve` in the background (`&`) is followed by a wait until the daemon answers on it "
              "(a poll with a 60 s deadline, failing if the daemon exits), and the block's background "
              "jobs are ended (SIGTERM to each job's process group, then waited for) when it ends",
    "roots": "`/var/lib/cowdisk` is scratch store A (the block's COWDISK_ROOT), `/var/lib/cowdisk-b` scratch "
             "store B, `/var/lib/cowdisk-rbd` a scratch path where no store is yet",
    "hosts": "a line commented `# on A` / `# on B` runs with COWDISK_ROOT set to store A / store B",
    "cluster": "`/var/tmp/cowdisk-ceph` is the Ceph tier's session cluster's directory and `lab/` this "
               "checkout's: `lab/ceph_cluster.py up` there finds that cluster running and prints what `up` "
               "prints (starting the gateway if asked and not running); a `lab/ceph_cluster.py down` line "
               "becomes `true` (the session's fixture ends the cluster when the tier is done)",
    "zshrc": "a line commented `# in ~/.zshrc` runs in zsh as a ~/.zshrc would, after `autoload -U compinit; "
             "compinit`, and must leave cowdisk's completion function registered for `cowdisk` (`$_comps`)",
    "fish": "a line that writes `~/.config/fish/completions/cowdisk.fish` is followed by fish completing "
            "`cowdisk vol` from it: the first candidate must be `volume`",
}

_REAL = re.compile(r"/var/lib/cowdisk|/run/cowdisk/|/var/tmp/cowdisk-ceph|lab/ceph_cluster\.py down|\./install\.sh")
"""What a runnable block may not name once its substitutions are made: a real store,
socket or cluster, or the machine's setup."""

_SERVE = re.compile(r"^(?P<cmd>[^#\n]*\bcowdisk\b[^#\n]*\bserve\b[^#\n]*&)[ \t]*(?P<rest>#.*)?$", re.M)

PRELUDE = "set -e -o pipefail\n"
_DAEMON_PRELUDE = r"""
set -m  # job control: each background job its own process group, ended as one (as `kill %1` would)
trap 'for __p in $(jobs -p); do kill -TERM -- "-$__p" 2>/dev/null || true; done; wait' EXIT
__wait_daemon() {  # PID SOCKET: poll until the daemon answers on SOCKET (60 s), fail if it exits
  local end=$((SECONDS + 60))
  while ((SECONDS < end)); do
    kill -0 "$1" 2>/dev/null || { echo "the daemon (PID $1) exited before answering on $2" >&2; return 1; }
    curl -sf --unix-socket "$2" http://cowdisk/v1/health >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "the daemon (PID $1) did not answer on $2 within 60 s" >&2
  return 1
}
"""


def _sub(name: str, text: str, p: Places) -> str:
    if name == "installed":
        return re.sub(r"(?<![\w/])\./install\.sh\b", "true", text)
    if name == "daemon":
        text = text.replace("/run/cowdisk/cowdisk.sock", p.socket)
        return _SERVE.sub(lambda m: f"{m['cmd']} {m['rest'] or ''}\n__wait_daemon $! {shlex.quote(p.socket)}", text)
    if name == "roots":
        text = re.sub(r"/var/lib/cowdisk-b(?![-\w])", p.root_b, text)
        text = re.sub(r"/var/lib/cowdisk-rbd(?![-\w])", p.root_rbd, text)
        return re.sub(r"/var/lib/cowdisk(?![-\w])", p.root, text)
    if name == "hosts":
        return re.sub(r"^(?=[^#\n]*#\s*on (?P<h>[AB])\b)",
                      lambda m: f"COWDISK_ROOT={shlex.quote(p.root if m['h'] == 'A' else p.root_b)} ", text,
                      flags=re.M)
    if name == "cluster":
        text = re.sub(r"^[^#\n]*\blab/ceph_cluster\.py down\b[^#\n]*", "true ", text, flags=re.M)
        text = re.sub(r"/var/tmp/cowdisk-ceph(?![-\w])", p.ceph_dir, text)
        return re.sub(r"(?<![\w/])lab/", f"{REPO}/lab/", text)
    if name == "zshrc":
        def zsh(m: re.Match[str]) -> str:
            check = "(( $+functions[_cowdisk_completion] )) && [[ ${_comps[cowdisk]} == _cowdisk_completion ]]"
            return "zsh -fc " + shlex.quote(f"autoload -U compinit && compinit -u && {m['cmd']}\n{check}")
        return re.sub(r"^(?P<cmd>[^#\n]+?)\s*#\s*in ~/\.zshrc.*$", zsh, text, flags=re.M)
    if name == "fish":
        return re.sub(r"^(?P<line>[^#\n]*~/\.config/fish/completions/cowdisk\.fish.*)$",
                      lambda m: m["line"] + "\n[ \"$(fish -c 'complete -C \"cowdisk vol\"' | cut -f1 | sed -n 1p)\" = "
                                            "volume ]", text, flags=re.M)
    raise AssertionError(f"no substitution {name!r}: the known ones are {sorted(SUBSTITUTIONS)}")


def render(block: Block, places: Places) -> str:
    """The bash script a runner runs for a ``run`` or ``ceph`` block: the block's text with
    the substitutions its marker names made (each must change it), after :data:`PRELUDE`."""
    text = block.body
    for name in block.substitutions:
        if name not in SUBSTITUTIONS:
            raise AssertionError(f"{block.where}: no substitution {name!r}: the known ones are {sorted(SUBSTITUTIONS)}")
        after = _sub(name, text, places)
        if after == text:
            raise AssertionError(f"{block.where}: the substitution {name!r} changes nothing in the block")
        text = after
    real = _REAL.search(text)
    if real:
        raise AssertionError(f"{block.where}: once its substitutions are made the block still names {real[0]!r} "
                             f"(name one that replaces it in its marker: {sorted(SUBSTITUTIONS)})")
    return PRELUDE + (_DAEMON_PRELUDE if "daemon" in block.substitutions else "") + text


class Scratch:
    """A runner's scratch place: ``cowdisk`` on PATH is this checkout (a wrapper running
    ``python3 -m cowdisk`` with ``src/`` on PYTHONPATH), HOME is its own, no daemon answers
    on COWDISK_SOCKET, a daemon reads no config file (COWDISK_CONFIG=/dev/null); ``env`` adds
    to or drops (None) the environment's variables."""

    def __init__(self, tmp: str, **env: str | None) -> None:
        self.tmp = tmp
        self.home = os.path.join(tmp, "home")
        bindir = os.path.join(tmp, "bin")
        os.makedirs(bindir)
        os.makedirs(os.path.join(self.home, ".config", "fish", "completions"))
        wrapper = os.path.join(bindir, "cowdisk")
        with open(wrapper, "w") as f:
            f.write(f'#!/bin/sh\nexec {sys.executable} -m cowdisk "$@"\n')
        os.chmod(wrapper, stat.S_IRWXU)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("COWDISK_")} | {
            "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONPATH": os.path.join(REPO, "src"),
            "HOME": self.home, "NO_COLOR": "1", "COWDISK_SOCKET": os.path.join(tmp, "no-daemon.sock"),
            "COWDISK_CONFIG": os.devnull}
        for k, v in env.items():
            if v is None:
                self.env.pop(k, None)
            else:
                self.env[k] = v

    def bash(self, script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", script], env=self.env, cwd=self.tmp, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def run_block(self, block: Block, places: Places, timeout: float = 120) -> None:
        """Run a ``run`` or ``ceph`` block (:func:`render`); fails naming the block, its exit
        status and output."""
        p = self.bash(render(block, places), timeout)
        assert p.returncode == 0, f"{block.where}: exit {p.returncode}\n{block.body}\nstdout:\n{p.stdout}\n" \
                                  f"stderr:\n{p.stderr}"
