"""Docs that cannot go stale (issue 22, item 6): the parts of README.md and docs/ that are
facts of the code are generated from it (`python3 -m cowdisk.cli.reference` rewrites them)
or checked against it here, and every command example parses with the CLI's own parser
(tests/host/test_doc_examples.py runs the ones the host can run)."""

from __future__ import annotations

import json
import os
import re

import click
import pytest
from click.testing import CliRunner

from cowdisk.backends import BACKENDS, NOT_AUTO
from cowdisk.cli import cli
from cowdisk.cli import reference
from cowdisk.daemon.config import KEYS
from cowdisk.errors import ERROR_TYPES
from docexamples import REPO, SUBSTITUTIONS, Block, Places, blocks, cowdisk_commands, doc_files, parse, render


def _read(rel: str) -> str:
    with open(os.path.join(REPO, rel)) as f:
        return f.read()


def test_generated_blocks_are_fresh() -> None:
    """Every `<!-- generated: NAME -->` block is what the code makes today (regenerate:
    `python3 -m cowdisk.cli.reference`)."""
    seen = set()
    for path in doc_files():
        with open(path) as f:
            text = f.read()
        seen |= set(re.findall(r"<!-- generated: ([a-z-]+) -->", text))
        assert reference.render(text) == text, f"{path} is stale: run python3 -m cowdisk.cli.reference"
    assert seen == set(reference.BLOCKS), seen
    assert reference.main(["--check", REPO]) == 0


def test_a_stale_block_is_found_and_rewritten(tmp_path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("x\n<!-- generated: auto-order -->\nold words\n<!-- end: auto-order -->\n")
    (tmp_path / "docs" / "a.md").write_text("| <!-- generated: backend-names --> x <!-- end: backend-names --> |\n")
    assert reference.main(["--check", str(tmp_path)]) == 1
    assert reference.main([str(tmp_path)]) == 0
    assert reference.main(["--check", str(tmp_path)]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "old words" not in readme and "in this order: `dm-thin`, `dm-snapshot`" in readme
    assert "`auto`, `dm-thin`, `dm-snapshot`, `reflink`, `pool`, `copy`, `rbd`" in (tmp_path / "docs" / "a.md").read_text()


def test_every_exit_code_is_documented_in_help_and_docs() -> None:
    codes = {cls.exit_code for cls in ERROR_TYPES.values()}
    assert codes | {0, 141} == set(reference.EXIT_CODES), sorted(codes ^ set(reference.EXIT_CODES))
    r = CliRunner().invoke(cli, ["--help"])
    helptext = " ".join(r.stdout.split())
    for code, (short, _) in reference.EXIT_CODES.items():
        assert f"{code} {short}" in helptext, (code, short)
    table = _read("docs/cli.md")
    for name, cls in ERROR_TYPES.items():
        assert re.search(rf"^\| {cls.exit_code} \|.*`{name}`", table, re.M), name


def test_readme_backends_and_auto_order_follow_the_registry() -> None:
    readme = _read("README.md")
    rows = re.findall(r"^\| `([a-z-]+)` \|", readme, re.M)
    assert rows == list(BACKENDS)
    order = ", ".join(f"`{b}`" for b in BACKENDS if b not in NOT_AUTO)
    assert f"in this order: {order}" in readme and f"in this order: {order}" in _read("docs/cli.md")


def test_readme_layout_names_every_module() -> None:
    readme = _read("README.md")
    layout = readme[readme.index("## Layout"):]
    layout = layout[:layout.index("\n```\n", layout.index("```") + 3)]
    src = os.path.join(REPO, "src", "cowdisk")
    missing = []
    for name in sorted(os.listdir(src)):
        if name in ("__init__.py", "__main__.py", "py.typed", "__pycache__"):
            continue
        shown = f"{name}/" if os.path.isdir(os.path.join(src, name)) else name
        if shown not in layout:
            missing.append(shown)
    for name in sorted(os.listdir(os.path.join(src, "backends"))):
        if name.endswith(".py") and name != "__init__.py" and name not in layout:
            missing.append(f"backends/{name}")
    for top in ("lab/", "bench/", "contrib/", "tests/"):
        if top not in layout:
            missing.append(top)
    assert not missing, f"README.md's layout does not name {missing}"


def _commands_table() -> dict[str, str]:
    """docs/cli.md's command table: the command path of each row -> the row."""
    text = _read("docs/cli.md")
    section = text[text.index("## Commands"):text.index("## Scripting")]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"^\| `([a-z][a-z -]*?)(?: [A-Z\[\-].*?)?` \|", line)
        if m:
            rows.setdefault(m[1].strip(), "")
            rows[m[1].strip()] += line
    return rows


def test_cli_reference_lists_every_command_and_option() -> None:
    """docs/cli.md's command table has a row for every command, and each row names every
    option of its command (the global ones excepted: their own table)."""
    rows = _commands_table()
    global_opts = {o for p in cli.params for o in getattr(p, "opts", [])}
    leaves = {" ".join(path): cmd for path, cmd in reference.commands(cli) if not isinstance(cmd, click.Group)}
    leaves = {k: v for k, v in leaves.items() if k != "serve"}  # serve: docs/daemon.md
    assert set(leaves) - set(rows) == set(), f"commands missing from docs/cli.md: {sorted(set(leaves) - set(rows))}"
    assert set(rows) - set(leaves) == set(), f"docs/cli.md documents no such command: {sorted(set(rows) - set(leaves))}"
    missing = []
    for path, cmd in leaves.items():
        for p in cmd.params:
            if not isinstance(p, click.Option) or set(p.opts) & global_opts or p.hidden:
                continue
            longest = max(p.opts, key=len)
            if path == "volume drive" or path == "demo":  # their rows name the options without dashes
                longest = longest.lstrip("-")
            if not any(o in rows[path] for o in (*p.opts, longest)):
                missing.append(f"{path} {longest}")
    assert not missing, f"docs/cli.md's command table does not name {missing}"


def test_daemon_config_table_matches_the_config_and_serve_flags() -> None:
    """Every config key is in docs/daemon.md's table with the flag that sets it (or none):
    the table claimed every key was a `serve` flag; root, backend, lock_timeout and
    job_retention are not."""
    text = _read("docs/daemon.md")
    serve = cli.get_command(click.Context(cli), "serve")
    assert serve is not None
    serve_opts = {o for p in serve.params for o in getattr(p, "opts", [])}
    documented = {}
    for line in text.splitlines():
        m = re.match(r"^\| (`[a-z_]+`(?:, `[a-z_]+`)*) \|.*\| (.+?) \|$", line)
        if m and "default" not in line[:12]:
            for key in re.findall(r"`([a-z_]+)`", m[1]):
                documented[key] = m[2]
    assert set(documented) == set(KEYS), sorted(set(documented) ^ set(KEYS))
    for key, flag in documented.items():
        flags = re.findall(r"`(--[a-z-]+)", flag)
        if key in ("root", "backend"):
            assert flag == f"`cowdisk --{key} {'DIR' if key == 'root' else 'NAME'} serve`", (key, flag)
        elif flag == "none":
            assert f"--{key.replace('_', '-')}" not in serve_opts, key
        else:
            assert flags and set(flags) <= serve_opts, (key, flag)
    # the command line finds the daemon by COWDISK_SOCKET: it has no --socket option
    assert "--socket" not in {o for p in cli.params for o in getattr(p, "opts", [])}
    assert "(`--socket`, `COWDISK_SOCKET`)" not in text


def test_every_shell_block_is_marked() -> None:
    bad = [b.where for b in blocks() if b.kind is None or (b.kind in ("parse", "not run") and not b.why)]
    assert not bad, f"fenced shell blocks without <!-- example: run|transcript|parse: WHY|not run: WHY -->: {bad}"
    assert {b.kind for b in blocks()} == {"run", "transcript", "ceph", "parse", "not run"}


_PLACES = Places(root="/tmp/A", root_b="/tmp/B", root_rbd="/tmp/R", socket="/tmp/s.sock", ceph_dir="/tmp/ceph")


def test_runnable_blocks_name_their_substitutions() -> None:
    """Every run and ceph block renders: each substitution its marker names is a known one
    and changes the block, and none still names the real store, socket or cluster
    (/var/lib/cowdisk, /run/cowdisk, /var/tmp/cowdisk-ceph) or the machine's setup."""
    used = set()
    for b in blocks():
        if b.kind in ("run", "ceph"):
            script = render(b, _PLACES)
            used |= set(b.substitutions)
            assert "/var/lib/cowdisk" not in script and "/run/cowdisk" not in script, b.where
    assert used == set(SUBSTITUTIONS), sorted(used ^ set(SUBSTITUTIONS))


def _block(body: str, why: str, kind: str = "ceph") -> Block:
    return Block(os.path.join(REPO, "x.md"), 1, "sh", kind, why, body)


def test_render_makes_the_substitutions_and_refuses_the_rest() -> None:
    body = ("python3 lab/ceph_cluster.py up /var/tmp/cowdisk-ceph --rgw > /var/lib/cowdisk/remote.toml\n"
            "cp /var/lib/cowdisk/remote.toml /var/lib/cowdisk-b/\n"
            "cowdisk volume shared    # on B: the pool's volumes\n"
            "cowdisk volume rm vm1    # on A, whenever\n"
            "python3 lab/ceph_cluster.py down /var/tmp/cowdisk-ceph\n")
    script = render(_block(body, "cluster, roots, hosts"), _PLACES)
    assert f"python3 {REPO}/lab/ceph_cluster.py up /tmp/ceph --rgw > /tmp/A/remote.toml\n" in script
    assert "cp /tmp/A/remote.toml /tmp/B/\n" in script
    assert "COWDISK_ROOT=/tmp/B cowdisk volume shared" in script and "COWDISK_ROOT=/tmp/A cowdisk volume rm" in script
    assert "\ntrue \n" in script and "down" not in script
    with pytest.raises(AssertionError, match="still names '/var/lib/cowdisk'"):
        render(_block(body, "cluster, hosts"), _PLACES)  # roots not named: the real store stays
    with pytest.raises(AssertionError, match="changes nothing"):
        render(_block(body, "cluster, roots, hosts, daemon"), _PLACES)
    with pytest.raises(AssertionError, match="no substitution 'bogus'"):
        render(_block(body, "bogus"), _PLACES)
    serve = render(_block("./install.sh && cowdisk serve &   # 1.\ncurl -f --unix-socket /run/cowdisk/cowdisk.sock "
                          "http://cowdisk/v1/health\n", "installed, daemon", "run"), _PLACES)
    assert "true && cowdisk serve & # 1.\n__wait_daemon $! /tmp/s.sock\ncurl -f --unix-socket /tmp/s.sock " in serve


def test_every_command_example_parses() -> None:
    """Every `cowdisk ...` in a shell block of README.md and docs/ parses with the CLI's own
    parser (docs/rbd.md said `volume list`; lab/ceph_cluster.py printed `--backend-option`)."""
    found = 0
    bad = []
    for b in blocks():
        cmds = cowdisk_commands(b)
        if b.kind == "not run":
            assert not cmds, f"{b.where}: marked not run, but it has cowdisk commands: {cmds}"
        for argv in cmds:
            found += 1
            try:
                parse(argv)
            except click.ClickException as e:
                bad.append(f"{b.where}: cowdisk {' '.join(argv)}: {e.format_message()}")
    assert not bad, "\n".join(bad)
    assert found >= 30, found


def test_parse_refuses_what_the_cli_refuses() -> None:
    for argv in (["volume", "list"], ["store", "init", "--backend-option", "conf=x"], ["volume", "drive", "vm1"],
                 ["volume", "ls", "--bogus"]):
        with pytest.raises(click.ClickException):
            parse(argv)
    parse(["--root", "/x", "--backend", "rbd", "store", "init", "-o", "conf=/c", "-o", "pool=rbd"])


def test_ceph_cluster_prints_a_command_that_parses() -> None:
    """lab/ceph_cluster.py up ends by printing how to make a store on the cluster; that
    command must parse (it said `store init --backend rbd --backend-option ...`)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ceph_cluster", os.path.join(REPO, "lab", "ceph_cluster.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    line = mod.store_init_command({"conf": "/var/tmp/c/ceph.conf", "pool": "rbd", "client": "admin"})
    argv = line.split()
    assert argv[0] == "cowdisk"
    parse(argv[1:])


def test_api_paths_in_docs_exist() -> None:
    """Every http://cowdisk/v1/... the docs call is a path of the API (docs/openapi.json)."""
    paths = list(json.loads(_read("docs/openapi.json"))["paths"])
    pats = [re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", p) + "$") for p in paths]
    for path in doc_files():
        with open(path) as f:
            text = f.read()
        for url in re.findall(r"http://cowdisk(/v1/[^\s\"'?`)]*)", text):
            assert any(p.match(url) for p in pats), f"{path}: {url} is no API path"


def test_daemon_status_table_names_every_error_type() -> None:
    """docs/daemon.md's status table has each error type on the row of its class's
    http_status (RegistryDamaged and RemoteError were on none)."""
    text = _read("docs/daemon.md")
    section = text[text.index("| status | type |"):]
    section = section[:section.index("\n\n")]
    rows = {int(m[1]): m[2] for m in re.finditer(r"^\| (\d{3}) \| (.*) \|$", section, re.M)}
    missing = [f"{name} ({cls.http_status})" for name, cls in ERROR_TYPES.items()
               if f"`{name}`" not in rows.get(cls.http_status, "")]
    assert not missing, f"docs/daemon.md's status table lacks {missing}"
