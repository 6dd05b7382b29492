"""The `maxprune` command: argparse subcommands from `maxprune.commands`, one error format.

Config overrides (`--config.a.b=VALUE`) are unbounded in number and name, so they
are taken out of argv before argparse sees the rest; argparse then rejects anything
else it does not know. User mistakes (`MaxpruneError`, and argparse's own usage
errors) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Sequence

from maxprune import __version__
from maxprune.commands import all_commands
from maxprune.errors import MaxpruneError

_OVERRIDE = re.compile(r"--config\..*|config\.[\w.]+=.*")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are the CLI's one line (the usage itself is in --help)."""

    def error(self, message: str):
        self.exit(2, f"maxprune: error: {' '.join(message.split())}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="maxprune", description="Prune a pretrained Llama or train a small one from scratch.",
        epilog="Commands that take a config accept --config=FILE.py[:ARG] and any number of "
               "--config.a.b=VALUE overrides.")
    parser.add_argument("--version", action="version", version=f"maxprune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in all_commands():
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        if command.takes_config:
            sub.add_argument("--config", metavar="FILE.py[:ARG]",
                             help="config file; later --config.a.b=VALUE flags override it")
        command.add_arguments(sub)
        sub.set_defaults(command_=command, parser_=sub)
    return parser


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(overrides, rest); `--config.a.b VALUE` is joined into `--config.a.b=VALUE`."""
    overrides, rest, args = [], [], list(argv)
    while args:
        arg = args.pop(0)
        if not _OVERRIDE.fullmatch(arg):
            rest.append(arg)
        elif "=" not in arg and args and not args[0].startswith("-"):
            overrides.append(f"{arg}={args.pop(0)}")
        else:
            overrides.append(arg)
    return overrides, rest


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `maxprune` console script; returns the exit status."""
    overrides, rest = split_overrides(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(rest)
        if overrides and not args.command_.takes_config:
            args.parser_.error(f"unrecognized arguments: {' '.join(overrides)}")
    except SystemExit as e:  # --help, --version and argparse's own usage errors
        return 0 if e.code is None else int(e.code)
    try:
        from maxprune import schema

        cfg = schema.load_config(args.config, overrides) if args.command_.takes_config else None
        if args.command_.multihost:  # before any JAX call; a no-op unless the environment asks
            from maxprune import distributed
            distributed.initialize()
        return args.command_.run(args, cfg)
    except MaxpruneError as e:
        print(f"maxprune: {e.label}: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("maxprune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `maxprune inspect DIR | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
