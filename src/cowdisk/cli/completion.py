"""fish completion that works whatever click's version: click 8.4.0 and 8.4.1 write a
fish script that splits each answer with an unquoted ``\\n`` (a literal newline in the
script: fish reports "string split: missing argument" on every <TAB>, pallets/click#3502),
and print each answer on three lines, which fish's command substitution flattens.

Here each answer is one line, ``TYPE<TAB>VALUE<TAB>HELP`` (tabs and newlines in the value
or help made spaces), and the script splits it in at most three with ``string split -m 2``.
Registered by :func:`cowdisk.cli.main` only when the shell asks (``_COWDISK_COMPLETE`` set),
so no other command imports it. docs/cli.md's completion block runs in
tests/host/test_doc_examples.py with fish completing ``cowdisk vol``.
"""

from __future__ import annotations

from click.shell_completion import CompletionItem, FishComplete, add_completion_class

_SOURCE = """\
function %(complete_func)s;
    set -l response (env %(complete_var)s=fish_complete COMP_WORDS=(commandline -cp) \
COMP_CWORD=(commandline -t) %(prog_name)s);

    for completion in $response;
        set -l metadata (string split -m 2 \\t -- $completion);

        if test "$metadata[1]" = "dir";
            __fish_complete_directories $metadata[2];
        else if test "$metadata[1]" = "file";
            __fish_complete_path $metadata[2];
        else if test "$metadata[1]" = "plain";
            if test "$metadata[3]" != "_";
                echo $metadata[2]\\t$metadata[3];
            else;
                echo $metadata[2];
            end;
        end;
    end;
end;

complete --no-files --command %(prog_name)s --arguments "(%(complete_func)s)";
"""


def _one_line(text: str) -> str:
    return " ".join(text.replace("\t", " ").splitlines())


class Fish(FishComplete):
    source_template = _SOURCE

    def format_completion(self, item: CompletionItem) -> str:
        return f"{item.type}\t{_one_line(item.value)}\t{_one_line(item.help or '') or '_'}"


def register() -> None:
    add_completion_class(Fish, "fish")
