"""The one `orchardist` command line.

Each subcommand lives in the module that owns its job and exposes ``register(parser)``, which adds
its arguments and sets ``func`` (a callable taking the parsed namespace and returning an exit code).
The agent's commands join through the ``orchardist.commands`` entry point, so nothing in
``operator/`` imports ``agent/`` (the arrows stay one way).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Final

from orchardist import __version__

Register = Callable[[argparse.ArgumentParser], None]

#: name -> (one-line help, "module:function" that registers the subcommand)
COMMANDS: Final[dict[str, tuple[str, str]]] = {
    "operator": ("run the controller (kopf) against a cluster", "orchardist.controller.cli:register"),
    "plan": ("plan a model's memory on a Mac, offline", "orchardist.planning.cli:register"),
    "push": ("push a model directory to an OCI registry", "orchardist.oci.cli:register_push"),
    "pull": ("pull an OCI model into a directory", "orchardist.oci.cli:register_pull"),
    "inspect": (
        "describe an OCI model without downloading its weights",
        "orchardist.oci.cli:register_inspect",
    ),
    "crds": ("print, write or check the CRDs generated from the API types", "orchardist.api.cli:register"),
    "dev": (
        "a local control plane, registry, operator and agent for trying Orchardist",
        "orchardist.dev.cli:register",
    ),
}


def _load(target: str) -> Register:
    module_name, _, attr = target.partition(":")
    register: Register = getattr(importlib.import_module(module_name), attr)
    return register


def _not_built(name: str, why: str) -> Register:
    def register(parser: argparse.ArgumentParser) -> None:
        def run(_: argparse.Namespace) -> int:
            print(f"orchardist {name}: not available in this install ({why})", file=sys.stderr)
            return 2

        parser.set_defaults(func=run)

    return register


def _plugins() -> dict[str, tuple[str, Register]]:
    found: dict[str, tuple[str, Register]] = {}
    for ep in entry_points(group="orchardist.commands"):
        try:
            found[ep.name] = ("the node agent that runs on each Mac", ep.load())
        except ImportError as exc:
            found[ep.name] = ("the node agent (not installed)", _not_built(ep.name, str(exc)))
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchardist",
        description="Serve LLMs on a fleet of Apple Silicon Macs from Kubernetes.",
    )
    parser.add_argument("--version", action="version", version=f"orchardist {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    table: dict[str, tuple[str, Register]] = {}
    for name, (help_text, target) in COMMANDS.items():
        try:
            table[name] = (help_text, _load(target))
        except ImportError as exc:
            table[name] = (help_text, _not_built(name, str(exc)))
    table.update(_plugins())
    for name in sorted(table):
        help_text, register = table[name]
        register(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
