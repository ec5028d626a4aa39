"""The CLI imports only the chosen subcommand: `orchardist agent run` loads no kopf, controller or dev.

In-process, from a clean module state: every module of ours and kopf is taken out of
``sys.modules`` first (other tests import them), the CLI is imported afresh, and the module table is
put back afterwards so later tests keep the classes they imported.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HEAVY = ("kopf", "orchardist.controller", "orchardist.dev", "orchardist.oci", "orchardist.plancmd")
OURS = ("orchardist", "orchardist_agent", "kopf")


def _loaded(prefix: str) -> bool:
    return any(m == prefix or m.startswith(prefix + ".") for m in sys.modules)


@pytest.fixture
def fresh() -> Iterator[None]:
    """sys.modules without anything of ours or kopf; restored exactly afterwards."""
    saved = dict(sys.modules)
    for name in list(sys.modules):
        if name.split(".")[0] in OURS:
            del sys.modules[name]
    try:
        yield
    finally:
        sys.modules.clear()
        sys.modules.update(saved)


def test_agent_run_help_loads_only_the_agent(fresh: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert not any(_loaded(m) for m in (*HEAVY, "orchardist_agent"))
    from orchardist import cli

    with pytest.raises(SystemExit) as done:
        cli.main(["agent", "run", "--help"])
    assert done.value.code == 0
    assert "--simulate PROFILE" in capsys.readouterr().out
    assert "orchardist_agent.cli" in sys.modules
    assert [m for m in HEAVY if _loaded(m)] == []


def test_agent_run_options_parse_without_heavy_imports(fresh: None) -> None:
    from orchardist import cli

    words = ["agent", "run", "--simulate", "m4-pro-64gb", "--store-budget", "100Gi"]
    args = cli.build_parser(cli.chosen_command(words)).parse_args(words)
    assert (args.simulate, args.store_budget) == ("m4-pro-64gb", 100 * 2**30)
    assert args.func is sys.modules["orchardist_agent.cli"].run
    assert [m for m in HEAVY if _loaded(m)] == []


def test_top_level_help_lists_every_command_and_imports_none(
    fresh: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchardist import cli

    monkeypatch.setenv("COLUMNS", "200")  # one line per command

    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    for name, command in cli.COMMANDS.items():
        assert f"    {name} " in out and f" {command.help}\n" in out
    assert f" {cli.PLUGIN_HELP['agent']}\n" in out
    assert [m for m in (*HEAVY, "orchardist_agent", "orchardist.api.cli") if _loaded(m)] == []


def test_only_the_chosen_command_is_registered(fresh: None) -> None:
    from orchardist import cli

    parser = cli.build_parser("crds")
    assert "orchardist.api.cli" in sys.modules
    assert [m for m in (*HEAVY, "orchardist_agent") if _loaded(m)] == []
    assert parser.parse_args(["crds"]).func is sys.modules["orchardist.api.cli"].run


@pytest.mark.parametrize(
    ("words", "chosen"),
    [
        ([], None),
        (["--help"], None),
        (["--version"], None),
        (["plan", "--chip", "m1-8gb"], "plan"),
        (["-h", "dev", "cluster", "up"], "dev"),
        (["agent", "run", "--node-name", "x"], "agent"),
    ],
)
def test_the_chosen_command_is_the_first_word_that_is_not_an_option(
    words: list[str], chosen: str | None
) -> None:
    from orchardist.cli import chosen_command

    assert chosen_command(words) == chosen


def test_every_entry_point_is_listed_with_its_help() -> None:
    from orchardist.cli import PLUGIN_HELP, plugins

    found = plugins()
    assert found["agent"].help == PLUGIN_HELP["agent"]
    assert (found["agent"].target, found["agent"].package) == (
        "orchardist_agent.cli:register",
        "orchardist_agent",
    )


def test_a_plugin_whose_package_is_missing_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    from orchardist.cli import Command, build_parser

    table = {
        "gone": Command(
            "not here", "no_such_package_for_orchardist.cli:register", "no_such_package_for_orchardist"
        )
    }
    args = build_parser("gone", table).parse_args(["gone"])
    assert args.func(args) == 2
    assert capsys.readouterr().err == (
        "orchardist gone: not available in this install (no 'no_such_package_for_orchardist' package)\n"
    )


def test_an_import_error_inside_a_command_surfaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken import in our own code is a bug: it is raised, not shown as 'not available'."""
    from orchardist.cli import Command, build_parser

    (tmp_path / "orchardist_broken_command.py").write_text("import orchardist.no_such_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    table = {"broken": Command("broken", "orchardist_broken_command:register")}
    with pytest.raises(ModuleNotFoundError, match=r"orchardist\.no_such_module"):
        build_parser("broken", table)
    monkeypatch.delitem(sys.modules, "orchardist_broken_command", raising=False)
