"""The agent's command line: sizes, runtimes, defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from orchardist.api import quantity
from orchardist_agent import cli
from orchardist_agent.config import default_node_name, parse_bytes, parse_runtime


def test_sizes_use_the_one_byte_count_parser() -> None:
    """--store-budget and every other size read the same way as the rest of the project."""
    assert parse_bytes is quantity.parse_bytes
    assert parse_bytes("500Gi") == 500 * 2**30
    assert parse_bytes("2P") == 2 * 10**15


def test_a_bad_store_budget_is_refused_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    cli.register(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--store-budget=-3Gi"])
    assert "argument --store-budget: a byte count cannot be negative: '-3Gi'" in capsys.readouterr().err


def test_parse_runtime() -> None:
    assert parse_runtime("mlx-lm=/opt/mlx") == ("mlx-lm", Path("/opt/mlx"))
    with pytest.raises(ValueError, match="ENGINE=PATH"):
        parse_runtime("mlx-lm")


def test_node_name_is_a_valid_object_name() -> None:
    name = default_node_name()
    assert name == name.lower()
    assert all(ch.isalnum() or ch == "-" for ch in name)


def test_agent_run_options() -> None:
    parser = argparse.ArgumentParser()
    cli.register(parser)
    args = parser.parse_args(
        [
            "run",
            "--simulate",
            "m4-pro-64gb",
            "--node-name",
            "mini-1",
            "--store",
            "/tmp/s",
            "--store-budget",
            "100Gi",
            "--runtime",
            "mlx-lm=/opt/mlx",
            "--runtime",
            "llama.cpp=/opt/llama",
            "--heartbeat-interval",
            "2",
        ]
    )
    cfg = cli.config_from_args(args)
    assert (cfg.node_name, cfg.simulate, cfg.store, cfg.store_budget) == (
        "mini-1",
        "m4-pro-64gb",
        Path("/tmp/s"),
        100 * 2**30,
    )
    assert cfg.runtimes == {"mlx-lm": Path("/opt/mlx"), "llama.cpp": Path("/opt/llama")}
    assert cfg.heartbeat_interval == 2.0
    assert (cfg.bind_address, cfg.engine_user) == (None, None)  # proxies listen on --address
    assert args.func is cli.run


def test_unknown_simulated_profile_is_refused_while_parsing(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    cli.register(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--simulate", "m9-1tb"])
    assert "unknown Mac profile 'm9-1tb'; known: m1-8gb" in capsys.readouterr().err
