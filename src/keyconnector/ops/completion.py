"""``keyconnector completion {bash,zsh,fish}``: print the shell's completion script, as
``kubectl completion bash`` does.

Why argcomplete's scripts and not hand-written ones: the script only asks ``keyconnector`` itself
(with argcomplete's environment variables) what may come next, and ``keyconnector`` answers from the
one parser every command is declared in (``keyconnector.cli.completion``), so a new command or option
completes without anyone editing a script.
"""

from __future__ import annotations

import argparse
import sys

from keyconnector.ops import Subcommands

SHELLS = ("bash", "zsh", "fish")

INSTALL = """\
install it (then open a new shell):
  bash  in ~/.bashrc:  source <(keyconnector completion bash)
        or, for every user (needs the bash-completion package):
          keyconnector completion bash \\
            > /usr/share/bash-completion/completions/keyconnector
  zsh   in ~/.zshrc, after compinit:  eval "$(keyconnector completion zsh)"
        or:  keyconnector completion zsh > "${fpath[1]}/_keyconnector"
  fish  keyconnector completion fish \\
          > ~/.config/fish/completions/keyconnector.fish

Tab offers the commands and an option's values; type - first to be offered the options.
The script asks `keyconnector` on the PATH what may come next, so it stays right after an
upgrade; the first Tab after an upgrade takes a second or two (it describes the commands
once, into ~/.cache/keyconnector/), the next ones a fraction of it."""


def add_commands(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "completion",
        help="print the shell completion script for bash, zsh or fish",
        description=(
            "Prints the script that makes the shell complete keyconnector's commands, options and\n"
            "their values on Tab (argcomplete's, answered by the command line itself).\n\n" + INSTALL
        ),
    )
    parser.add_argument("shell", choices=SHELLS, help="the shell to print the script for")
    parser.set_defaults(func=cmd_completion)


def cmd_completion(args: argparse.Namespace) -> int:
    from argcomplete.shell_integration import shellcode

    sys.stdout.write(shellcode(["keyconnector"], shell=args.shell))
    return 0
