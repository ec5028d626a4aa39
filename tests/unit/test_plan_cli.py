"""`orchardist plan` as a table and as --json, run in-process (the installed script: tests/integration)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchardist.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "tests" / "data" / "model-configs"
MLX_70B = str(CONFIGS / "mlx-llama-3.3-70b-instruct-4bit.json")
STABLE_KEYS = [
    "kv_bytes_per_token",
    "kv_budget_bytes",
    "num_blocks",
    "max_tokens",
    "max_model_len",
    "max_num_seqs",
    "fits",
    "reason",
    "predicted_decode_tokens_per_s",
]


def test_json_with_a_working_set(capsys: pytest.CaptureFixture[str]) -> None:
    """48 GiB working set, 39.7 GB of 4-bit weights: the 64 GB Mac case, no bandwidth -> null prediction."""
    code = main(
        [
            "plan",
            "--model-config",
            MLX_70B,
            "--weights-bytes",
            "39700000000",
            "--working-set",
            str(49_152 * 2**20),
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert list(out)[: len(STABLE_KEYS)] == STABLE_KEYS
    budget = int(49_152 * 2**20 * 0.92) - 39_700_000_000 - 2 * 2**30
    assert out["kv_budget_bytes"] == budget
    assert out["num_blocks"] == budget // (16 * 327_680)
    assert out["max_tokens"] == out["max_model_len"] == 16_992
    assert out["max_num_seqs"] == 1
    assert out["fits"] is True
    assert out["predicted_decode_tokens_per_s"] is None


def test_table_with_a_chip(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", "--model-config", MLX_70B, "--weights-bytes", "39.7GB", "--chip", "m4-pro-64gb"])
    out = capsys.readouterr().out
    assert code == 0
    assert "kv bytes/token     327,680 (320 KiB)" in out
    assert "blocks             1,062 x 16 tokens = 16,992 tokens" in out
    assert "decode (1 stream)  <= 6.4 tokens/s" in out


def test_not_fitting_exits_1_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "plan",
            "--model-config",
            MLX_70B,
            "--weights-bytes",
            "39700000000",
            "--chip",
            "m4-pro-48gb",
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 1
    assert out["fits"] is False
    assert out["reason"] == "weights need 37.0 GiB; this Mac's GPU working set is 32.0 GiB"


def test_options_reach_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "plan",
            "--model-config",
            str(CONFIGS / "qwen3-8b.json"),
            "--weights-bytes",
            "16381470720",
            "--chip",
            "m4-pro-64gb",
            "--context",
            "8192",
            "--max-num-seqs",
            "4",
            "--block-size",
            "32",
            "--overhead",
            "1Gi",
            "--gpu-memory-utilization",
            "0.9",
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (out["max_model_len"], out["max_num_seqs"], out["block_size"]) == (8192, 4, 32)
    assert out["overhead_bytes"] == 2**30
    # pinned context x sequences: this replica reserves only what it uses
    assert out["gpu_memory_utilization"] < 0.9
    assert out["num_blocks"] >= 4 * 8192 // 32


def test_table_over_the_standard_profiles(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", "--model-config", MLX_70B, "--weights-bytes", "39700000000"])
    out = capsys.readouterr().out
    assert code == 0
    assert "PROFILE" in out and "MAX CONTEXT" in out
    assert "fits on m3-max-64gb (max context 16,992), m4-pro-64gb (max context 16,992), m4-max-128gb" in out
    assert "  m4-pro-48gb: weights need 37.0 GiB; this Mac's GPU working set is 32.0 GiB" in out


def test_json_table_over_the_profiles(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "plan",
            "--model-config",
            str(CONFIGS / "qwen3-0.6b.json"),
            "--weights-bytes",
            "1503300328",
            "--json",
        ]
    )
    rows = json.loads(capsys.readouterr().out)
    assert code == 0
    assert {row["profile"] for row in rows} >= {"m1-8gb", "m4-pro-64gb", "m3-ultra-512gb"}
    assert all(row["fits"] for row in rows)


def test_model_dir_sums_the_weight_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text((CONFIGS / "qwen3-0.6b.json").read_text())
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"\0" * 234)
    (tmp_path / "tokenizer.json").write_text("{}")
    code = main(["plan", "--model-dir", str(tmp_path), "--chip", "m1-8gb", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["weight_bytes"] == 1234


def test_missing_config_key_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 256})
    )
    code = main(["plan", "--model-config", str(tmp_path), "--weights-bytes", "10", "--chip", "m1-8gb"])
    assert code == 2
    assert "'max_position_embeddings'" in capsys.readouterr().err


def test_weights_are_required_without_a_model_dir(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model-config", MLX_70B, "--chip", "m1-8gb"]) == 2
    assert capsys.readouterr().err == (
        "orchardist plan: --weights-bytes N is required unless --model-dir DIR is given\n"
    )


def test_node_without_a_reachable_cluster_says_why(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = str(tmp_path / "no-such-kubeconfig")
    argv = [
        "plan",
        "--model-config",
        MLX_70B,
        "--weights-bytes",
        "1",
        "--node",
        "mac-1",
        "--kubeconfig",
        missing,
    ]
    assert main(argv) == 2
    assert "--node mac-1: cannot reach the cluster" in capsys.readouterr().err


def test_oci_model_from_an_unreachable_registry_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    """--model goes through orchardist.oci.profile; nothing listens on port 1, so that is the reason."""
    code = main(
        ["plan", "--model", "oci://127.0.0.1:1/m:1", "--insecure-registry", "127.0.0.1:1", "--chip", "m1-8gb"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(
        "orchardist plan: oci://127.0.0.1:1/m:1: manifest 127.0.0.1:1/m:1: cannot reach 127.0.0.1:1"
    )
    assert err.count("\n") == 1  # one line, no traceback


def test_a_malformed_oci_reference_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "oci://", "--chip", "m1-8gb"]) == 2
    assert capsys.readouterr().err.startswith("orchardist plan: oci://: invalid model reference 'oci://'")


def test_a_bad_byte_count_is_refused_while_parsing(capsys: pytest.CaptureFixture[str]) -> None:
    """Sizes go through the one quantity parser; argparse shows its reason."""
    with pytest.raises(SystemExit) as done:
        main(["plan", "--model-config", MLX_70B, "--weights-bytes", "40 parsecs"])
    assert done.value.code == 2
    assert "argument --weights-bytes: not a byte count: '40 parsecs': unknown unit 'parsecs'" in (
        capsys.readouterr().err
    )


def test_gguf_model_dir_is_profiled_from_its_header(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A directory with only a GGUF file (written by the gguf library): the header gives the profile."""
    import gguf
    import numpy as np

    path = tmp_path / "tiny-Q8_0.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(4)
    writer.add_context_length(2048)
    writer.add_embedding_length(256)
    writer.add_head_count(8)
    writer.add_head_count_kv(2)
    writer.add_file_type(7)
    writer.add_tensor("token_embd.weight", np.zeros((16, 256), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    code = main(["plan", "--model-dir", str(tmp_path), "--chip", "m1-8gb", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["weight_bytes"] == path.stat().st_size
    assert out["kv_bytes_per_token"] == 2 * 4 * 2 * (256 // 8) * 2  # f16 cache
    assert out["max_model_len"] == 2048
