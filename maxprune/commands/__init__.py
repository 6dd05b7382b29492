"""The subcommand registry: each module in `MODULES` exposes `COMMANDS`, a list of `Command`.

Why a registry: a later stage (train, prune, eval, data, study) adds its own module
and one name here, without touching the CLI's parsing or error handling. Command
modules import jax and the model inside `run`, so `maxprune --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from typing import Any, Callable

MODULES = ("maxprune.commands.model", "maxprune.commands.convert", "maxprune.commands.data",
           "maxprune.commands.train", "maxprune.commands.prune", "maxprune.commands.scale",
           "maxprune.commands.eval", "maxprune.commands.study",
           "maxprune.commands.demo")


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Any], int]  # (args, frozen ConfigDict or None) -> exit code
    takes_config: bool = True  # accepts --config=FILE.py[:ARG] and --config.a.b=VALUE
    multihost: bool = True  # joins the multi-process JAX job the environment describes (maxprune.distributed)


def all_commands() -> list[Command]:
    return [command for module in MODULES for command in importlib.import_module(module).COMMANDS]
