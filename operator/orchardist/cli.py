"""The one `orchardist` command line.

Each subcommand lives in the module that owns its job and exposes ``register(parser)``, which adds
its arguments and sets ``func`` (a callable taking the parsed namespace and returning an exit code).
The agent's commands join through the ``orchardist.commands`` entry point, so nothing in
``operator/`` imports ``agent/`` (the arrows stay one way).

Lazy on purpose: the top-level parser knows every subcommand's name and one-line help from the
tables below, and only the chosen subcommand's module is imported (``orchardist agent run`` must not
load kopf, the controller or the dev tools). Entry points are listed, never loaded, to build the
help. A subcommand whose package is not installed says so; any other ImportError is a bug and
surfaces with its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Final

from orchardist import __version__

Register = Callable[[argparse.ArgumentParser], None]

PLUGIN_GROUP: Final = "orchardist.commands"


@dataclass(frozen=True)
class Command:
    """A subcommand as the top-level parser knows it before importing anything of it."""

    help: str
    #: ``module:function`` that registers the subcommand's arguments.
    target: str
    #: The top-level package that must be installed for the subcommand to exist ("" for ours).
    package: str = ""


#: The subcommands of this distribution.
COMMANDS: Final[Mapping[str, Command]] = {
    "operator": Command("run the controller (kopf) against a cluster", "orchardist.controller.cli:register"),
    "plan": Command("plan a model's memory on a Mac, offline", "orchardist.plancmd.command:register"),
    "push": Command("push a model directory to an OCI registry", "orchardist.oci.cli:register_push"),
    "pull": Command("pull an OCI model into a directory", "orchardist.oci.cli:register_pull"),
    "inspect": Command(
        "describe an OCI model without downloading its weights", "orchardist.oci.cli:register_inspect"
    ),
    "crds": Command(
        "print, write or check the CRDs generated from the API types", "orchardist.api.cli:register"
    ),
    "gateway": Command("the OpenAI-compatible front door for every model", "orchardist.gateway.cli:register"),
    "dev": Command(
        "a local control plane, registry, operator and agent for trying Orchardist",
        "orchardist.dev.cli:register",
    ),
}

#: One-line help of the commands that join through the entry point (asking the plugin would import it).
PLUGIN_HELP: Final[Mapping[str, str]] = {"agent": "the node agent that runs on each Mac"}


def plugins() -> dict[str, Command]:
    """The ``orchardist.commands`` entry points, read from package metadata without loading them."""
    return {
        ep.name: Command(PLUGIN_HELP.get(ep.name, f"from {ep.value}"), ep.value, ep.module.partition(".")[0])
        for ep in entry_points(group=PLUGIN_GROUP)
    }


def chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv``: its first word that is not an option.

    The top-level parser's own options (``-h``, ``--version``) take no value, so the first
    non-option word is the subcommand.
    """
    return next((word for word in argv if not word.startswith("-")), None)


def load(name: str, command: Command) -> Register:
    """Import the subcommand's module and return its register function."""
    if command.package and importlib.util.find_spec(command.package) is None:
        return _not_installed(name, command.package)
    module_name, _, attr = command.target.partition(":")
    register: Register = getattr(importlib.import_module(module_name), attr)
    return register


def _not_installed(name: str, package: str) -> Register:
    def register(parser: argparse.ArgumentParser) -> None:
        def run(_: argparse.Namespace) -> int:
            print(
                f"orchardist {name}: not available in this install (no {package!r} package)", file=sys.stderr
            )
            return 2

        parser.set_defaults(func=run)

    return register


def build_parser(
    chosen: str | None = None, table: Mapping[str, Command] | None = None
) -> argparse.ArgumentParser:
    """The top-level parser, with only the ``chosen`` subcommand's module imported and registered."""
    if table is None:
        table = {**COMMANDS, **plugins()}
    parser = argparse.ArgumentParser(
        prog="orchardist",
        description="Serve LLMs on a fleet of Apple Silicon Macs from Kubernetes.",
    )
    parser.add_argument("--version", action="version", version=f"orchardist {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in sorted(table):
        command = table[name]
        subparser = sub.add_parser(name, help=command.help, description=command.help)
        if name == chosen:
            load(name, command)(subparser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(chosen_command(words))
    args = parser.parse_args(words)
    func = getattr(args, "func", None)
    if func is None:
        # A command group given without its subcommand, or no command at all: show the way on.
        target = getattr(args, "_parser", parser)
        target.print_help(sys.stderr)
        return 2
    try:
        code: int = func(args)
    except BrokenPipeError:  # `orchardist plan | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
