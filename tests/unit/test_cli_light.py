"""The light path's tables say what click's commands say (cli/light.py runs `volume ls` and
`template ls` through a daemon without click): the same options, the same kinds, the same
destinations, the listing functions the same parameters as the click commands; and the
argument vectors it takes and the ones it leaves to click. What both paths print is
compared through a real daemon in tests/host/test_faces.py."""

from __future__ import annotations

import inspect

import click
import pytest

from cowdisk.cli import cli, lists
from cowdisk.cli.light import COMMANDS, FLAG, GLOBAL, MULTI, VALUE, parse

LEFT_TO_CLICK = {"-v", "--verbose", "-h", "--help", "--version"}
"""Options the light path never takes (logging and the messages of -v; help texts)."""


def _kind(p: click.Option) -> str:
    return FLAG if p.is_flag else MULTI if p.multiple else VALUE


def _options(params: list[click.Parameter]) -> dict[str, tuple[str | None, str]]:
    return {o: (p.name, _kind(p)) for p in params if isinstance(p, click.Option)
            for o in (*p.opts, *p.secondary_opts) if o not in LEFT_TO_CLICK}


def test_the_global_options_are_clicks() -> None:
    click_globals = _options(cli.params)
    assert {o: k for o, (_, k) in click_globals.items()} == {o: opt.kind for o, opt in GLOBAL.items()}


@pytest.mark.parametrize("words", list(COMMANDS))
def test_each_light_command_has_clicks_options_and_parameters(words: tuple[str, str]) -> None:
    ctx = click.Context(cli)
    group = cli.get_command(ctx, words[0])
    assert isinstance(group, click.Group)
    command = group.get_command(ctx, words[1])
    assert command is not None and command.callback is not None
    light = COMMANDS[words]
    # after the command: its own options, and the global ones it does not shadow
    want = _options(command.params)
    have = {o: (opt.dest, opt.kind) for o, opt in light.options.items()}
    have |= {o: (None, opt.kind) for o, opt in GLOBAL.items() if o not in light.options}
    want = {o: (None, k) if o in GLOBAL and o not in light.options else (d, k) for o, (d, k) in want.items()}
    assert have == want
    # the listing function takes what the click command's function takes (but the App first)
    fn = getattr(lists, light.run)
    click_args = [n for n in inspect.signature(inspect.unwrap(command.callback)).parameters][1:]
    assert list(inspect.signature(fn).parameters)[1:] == click_args
    assert set(click_args) == {o.dest for o in light.options.values()}


@pytest.mark.parametrize("argv, params, before, after", [
    (["volume", "ls"], {}, {}, {}),
    (["--json", "volume", "ls", "-q"], {"ids_only": True}, {"json": True}, {}),
    (["--root", "/r", "-q", "volume", "ls", "--quiet", "--root=/s", "--timeout", "3"],
     {"ids_only": True}, {"root": "/r", "quiet": True}, {"root": "/s", "timeout": "3"}),
    (["volume", "ls", "-t", "base", "--template=other", "--filter", "a=1", "--filter=b=2", "-o", "id", "--no-headings"],
     {"tref": "other", "filters": ("a=1", "b=2"), "columns": "id", "no_headings": True}, {}, {}),
    (["template", "ls", "--remote", "--from", "s3://b/p", "--json"], {"remote": True, "at": "s3://b/p"}, {},
     {"json": True}),
    (["volume", "ls", "--template="], {"tref": ""}, {}, {}),
])
def test_what_it_takes(argv: list[str], params: dict, before: dict, after: dict) -> None:
    got = parse(argv)
    assert got is not None
    assert got[1:] == (params, before, after)


@pytest.mark.parametrize("argv", [
    [], ["volume"], ["volume", "inspect", "x"], ["volume", "rm", "x"], ["template", "build", "."],
    ["volume", "ls", "extra"],                       # an argument the listing does not take
    ["volume", "--json", "ls"],                      # the group takes no options
    ["-v", "volume", "ls"], ["volume", "ls", "-vv"], ["volume", "ls", "--help"], ["--version"], ["-h"],
    ["volume", "ls", "--temp", "base"],              # an abbreviation (click refuses it)
    ["volume", "ls", "-tbase"], ["volume", "ls", "-qq"],  # attached value, cluster: left to click
    ["volume", "ls", "-t"], ["volume", "ls", "-t", "-q"],  # no value; a value that looks like an option
    ["volume", "ls", "--json=1"], ["volume", "ls", "--no-headings=yes"],  # a flag given a value
    ["volume", "ls", "--"], ["--", "volume", "ls"],
    ["volume", "ls", "--remote"],                    # template ls's option on volume ls
    ["--template", "base", "volume", "ls"],          # a command's option before the command
])
def test_what_it_leaves_to_click(argv: list[str]) -> None:
    assert parse(argv) is None
