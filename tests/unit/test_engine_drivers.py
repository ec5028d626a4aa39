"""Each engine driver's exact argv and env, as tables (drivers are pure).

Engines bind loopback whatever the spec's address (the agent's proxy serves the Mac's address), the
user's flags come before the operator's, and API keys travel in env, never argv.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchardist_agent.engines import (
    EMPTY_HF_CACHE,
    EngineArgsError,
    EngineSpec,
    Plan,
    Runtime,
    launch,
    llama_cpp,
    mlx_lm,
    vllm,
    vllm_metal,
)

PLAN = Plan(
    kv_budget_bytes=3 * (1 << 30) + 1,
    max_model_len=8192,
    max_num_seqs=4,
    max_num_batched_tokens=2048,
    gpu_memory_utilization=0.9,
    block_size=16,
)
MODEL = Path("/store/models/sha256-abc")


def spec(engine: str, version: str = "1.0.0", **kw: object) -> EngineSpec:
    prefix = Path(f"/rt/{engine}")
    base: dict[str, object] = dict(
        engine=engine,
        runtime=Runtime(name=engine, version=version, prefix=prefix),
        model_dir=MODEL,
        plan=PLAN,
        served_model_name="chat",
        host="10.0.0.5",
    )
    base.update(kw)
    return EngineSpec(**base)  # type: ignore[arg-type]


VLLM_FLAGS = [
    "--host", "127.0.0.1", "--port", "8123", "--max-model-len", "8192", "--max-num-seqs", "4",
    "--max-num-batched-tokens", "2048", "--gpu-memory-utilization", "0.9", "--block-size", "16",
    "--served-model-name", "chat",
]  # fmt: skip


@pytest.mark.parametrize(
    ("s", "argv", "env"),
    [
        pytest.param(
            spec("vllm-metal", "0.3.0.dev20260822101010"),
            ["/rt/vllm-metal/bin/vllm", "serve", str(MODEL), *VLLM_FLAGS],
            {
                "HF_HUB_OFFLINE": "1",
                "VLLM_HOST_IP": "127.0.0.1",
                "VLLM_NO_USAGE_STATS": "1",
                "VLLM_METAL_MEMORY_FRACTION": "0.9",
            },
            id="vllm-metal snapshot sets the fraction knob too",
        ),
        pytest.param(
            spec("vllm-metal", "0.4.1", api_key="k3y", engine_args=("--enable-prefix-caching",)),
            ["/rt/vllm-metal/bin/vllm", "serve", str(MODEL), "--enable-prefix-caching", *VLLM_FLAGS],
            {
                "HF_HUB_OFFLINE": "1",
                "VLLM_HOST_IP": "127.0.0.1",
                "VLLM_NO_USAGE_STATS": "1",
                "VLLM_API_KEY": "k3y",
            },
            id="vllm-metal later: no fraction knob, key in env, user flags before the operator's",
        ),
        pytest.param(
            spec("vllm", device="cpu", dtype="float32", env={"OMP_NUM_THREADS": "2"}),
            [
                "/rt/vllm/bin/python",
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                str(MODEL),
                "--dtype",
                "float32",
                *[("32" if f == "16" else f) for f in VLLM_FLAGS],
            ],
            {
                "OMP_NUM_THREADS": "2",
                "HF_HUB_OFFLINE": "1",
                "VLLM_HOST_IP": "127.0.0.1",
                "VLLM_NO_USAGE_STATS": "1",
                "VLLM_CPU_KVCACHE_SPACE": "4",
            },
            id="vllm cpu: KV space in whole GiB rounded up, block size a multiple of 32",
        ),
        pytest.param(
            spec("vllm", device="cuda"),
            [
                "/rt/vllm/bin/python",
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                str(MODEL),
                *VLLM_FLAGS,
            ],
            {"HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_NO_USAGE_STATS": "1"},
            id="vllm cuda: no CPU KV variable",
        ),
        pytest.param(
            spec("mlx-lm", engine_args=("--temp", "0.7")),
            [
                "/rt/mlx-lm/bin/python",
                "-m",
                "mlx_lm",
                "server",
                "--temp",
                "0.7",
                "--model",
                str(MODEL),
                "--host",
                "127.0.0.1",
                "--port",
                "8123",
                "--decode-concurrency",
                "4",
                "--prompt-cache-bytes",
                str(PLAN.kv_budget_bytes),
            ],
            {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(EMPTY_HF_CACHE)},
            id="mlx-lm",
        ),
    ],
)
def test_argv_and_env(s: EngineSpec, argv: list[str], env: dict[str, str]) -> None:
    got = launch(s, 8123)
    assert list(got.argv) == argv
    assert dict(got.env) == env
    assert got.endpoint == "127.0.0.1:8123"


def test_llama_cpp_argv_finds_the_gguf(tmp_path: Path) -> None:
    (tmp_path / "model-Q4_K_M.gguf").write_bytes(b"GGUF")
    (tmp_path / "mmproj-model-f16.gguf").write_bytes(b"GGUF")
    got = launch(spec("llama.cpp", model_dir=tmp_path, api_key="s3cret"), 9000)
    assert list(got.argv) == [
        "/rt/llama.cpp/bin/llama-server", "-m", str(tmp_path / "model-Q4_K_M.gguf"), "-c", str(8192 * 4),
        "-np", "4", "-ngl", "999", "--host", "127.0.0.1", "--port", "9000", "--alias", "chat",
    ]  # fmt: skip
    assert got.env == {"LLAMA_API_KEY": "s3cret"}
    assert got.redacted_env() == {"LLAMA_API_KEY": "***"}
    assert got.probe.body["model"] == "chat"


@pytest.mark.parametrize("engine", ["vllm-metal", "vllm", "mlx-lm", "llama.cpp"])
def test_the_key_is_never_on_argv(engine: str, tmp_path: Path) -> None:
    """`ps` shows argv to every local user; the key travels in env (readable by the engine's user only)."""
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    got = launch(spec(engine, model_dir=tmp_path, api_key="s3cret-value"), 1)
    assert not any("s3cret-value" in a for a in got.argv)
    assert "s3cret-value" not in str(got.redacted_env())


@pytest.mark.parametrize(
    ("files", "picked"),
    [
        (["a.gguf"], "a.gguf"),
        (
            ["m-00002-of-00003.gguf", "m-00001-of-00003.gguf", "m-00003-of-00003.gguf"],
            "m-00001-of-00003.gguf",
        ),
        (["config.json", "mmproj-x.gguf", "x-Q8_0.gguf"], "x-Q8_0.gguf"),
    ],
)
def test_pick_gguf(files: list[str], picked: str) -> None:
    assert llama_cpp.pick_gguf(files) == picked


@pytest.mark.parametrize("files", [[], ["config.json"], ["a.gguf", "b.gguf"]])
def test_pick_gguf_refuses(files: list[str]) -> None:
    with pytest.raises(EngineArgsError):
        llama_cpp.pick_gguf(files)


@pytest.mark.parametrize(
    ("engine", "args"),
    [
        ("vllm-metal", ("--max-model-len", "4")),
        ("vllm-metal", ("--max_model_len=4",)),
        ("vllm-metal", ("--port=1",)),
        ("vllm", ("--dtype", "half")),
        ("vllm", ("--served-model-name", "x")),
        ("mlx-lm", ("--decode-concurrency", "9")),
        ("mlx-lm", ("--model", "other")),
        ("llama.cpp", ("-ngl", "10")),
        ("llama.cpp", ("-c", "100")),
        ("llama.cpp", ("--api-key-file", "/k")),
    ],
)
def test_operator_owned_flags_are_refused(engine: str, args: tuple[str, ...], tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(EngineArgsError, match="which the operator owns"):
        launch(spec(engine, model_dir=tmp_path, engine_args=args), 1)


@pytest.mark.parametrize(
    "name", ["HF_HUB_OFFLINE", "VLLM_HOST_IP", "VLLM_API_KEY", "VLLM_METAL_MEMORY_FRACTION"]
)
def test_agent_owned_env_is_refused(name: str) -> None:
    with pytest.raises(EngineArgsError, match="set by the agent"):
        launch(spec("vllm", env={name: "1"}), 1)


def test_values_that_look_like_flags_are_not_flags() -> None:
    got = launch(spec("vllm", engine_args=("--seed", "-1", "--long-prefill-token-threshold", "-.5")), 1)
    assert got.argv[3:7] == ("--seed", "-1", "--long-prefill-token-threshold", "-.5")


@pytest.mark.parametrize(
    ("version", "key"),
    [
        ("0.1.0", (0, 1, 0, vllm_metal._FINAL)),
        ("0.3.0.dev20260822101010", (0, 3, 0, 20260822101010)),
        ("v0.2.0-20260420-142150", (0, 2, 0, vllm_metal._FINAL)),
        ("0.4", (0, 4, 0, vllm_metal._FINAL)),
    ],
)
def test_version_key(version: str, key: tuple[int, int, int, int]) -> None:
    assert vllm_metal.version_key(version) == key


@pytest.mark.parametrize(
    ("version", "fraction_knob", "paged_knob"),
    [
        ("0.1.0", True, False),  # exists, but with 0.1.0's RAM meaning: the driver does not set it
        ("0.2.0", True, True),
        ("0.3.0.dev20260822101010", True, True),
        ("0.3.0.dev20260915000000", False, False),
        ("0.4.0", False, False),
    ],
)
def test_knob_sets_by_version(version: str, fraction_knob: bool, paged_knob: bool) -> None:
    knobs = vllm_metal.knob_set(version).knobs
    assert ("VLLM_METAL_MEMORY_FRACTION" in knobs) is fraction_knob
    assert ("VLLM_METAL_USE_PAGED_ATTENTION" in knobs) is paged_knob


def test_driver_sets_fraction_only_where_it_means_the_plan() -> None:
    assert "VLLM_METAL_MEMORY_FRACTION" not in launch(spec("vllm-metal", "0.1.0"), 1).env
    assert launch(spec("vllm-metal", "0.2.0"), 1).env["VLLM_METAL_MEMORY_FRACTION"] == "0.9"
    assert "VLLM_METAL_MEMORY_FRACTION" not in launch(spec("vllm-metal", "0.4.0"), 1).env
    legacy = spec("vllm-metal", "0.2.0", env={"VLLM_METAL_USE_PAGED_ATTENTION": "0"})
    assert "VLLM_METAL_MEMORY_FRACTION" not in launch(legacy, 1).env  # the plugin refuses that pair


def test_unknown_knob_for_the_version_is_refused() -> None:
    launch(spec("vllm-metal", "0.4.0", env={"VLLM_METAL_NATIVE_SAMPLING": "1"}), 1)
    with pytest.raises(EngineArgsError, match="does not read VLLM_METAL_NATIVE_SAMPLING"):
        launch(spec("vllm-metal", "0.3.0.dev20260822101010", env={"VLLM_METAL_NATIVE_SAMPLING": "1"}), 1)
    with pytest.raises(EngineArgsError, match="VLLM_METAL_USE_PAGED_ATTENTION"):
        launch(spec("vllm-metal", "0.4.0", env={"VLLM_METAL_USE_PAGED_ATTENTION": "0"}), 1)


@pytest.mark.parametrize(("budget", "gib"), [(1, 1), (1 << 30, 1), ((1 << 30) + 1, 2), (10 * (1 << 30), 10)])
def test_cpu_kvcache_gib(budget: int, gib: int) -> None:
    assert vllm.cpu_kvcache_gib(budget) == gib


def test_mlx_lm_leaves_the_key_to_the_proxy() -> None:
    got = launch(spec("mlx-lm", api_key="k"), 1)
    assert "--api-key" not in got.argv and "k" not in got.env.values()
    assert got.host == "127.0.0.1"  # reachable only through the agent's authenticating proxy
    assert got.prepare_dirs == (str(EMPTY_HF_CACHE),)
    assert "model" not in got.probe.body  # naming a model makes mlx_lm.server fetch it


def test_fingerprint_tracks_argv_and_env() -> None:
    a = launch(spec("vllm"), 1)
    assert a.fingerprint() == launch(spec("vllm"), 1).fingerprint()
    assert a.fingerprint() != launch(spec("vllm"), 2).fingerprint()
    assert a.fingerprint() != launch(spec("vllm", env={"OMP_NUM_THREADS": "1"}), 1).fingerprint()


def test_unknown_engine() -> None:
    with pytest.raises(EngineArgsError, match="unknown engine"):
        launch(spec("ollama"), 1)


def test_mlx_owned_flags_exist_in_mlx_lm_help() -> None:
    help_text = (Path(__file__).parents[1] / "data/engines/mlx_lm-0.32.2-server-help.txt").read_text()
    emitted = [a for a in launch(spec("mlx-lm"), 1).argv[4:] if a.startswith("--")]
    assert emitted and all(f" {flag} " in help_text for flag in emitted)
    assert all(f" {flag} " in help_text for flag in mlx_lm.OWNED_FLAGS)


@pytest.mark.parametrize(("plan_block", "cpu_block"), [(8, 32), (16, 32), (32, 32)])
def test_vllm_cpu_block_size(plan_block: int, cpu_block: int) -> None:
    from dataclasses import replace

    got = launch(spec("vllm", device="cpu", plan=replace(PLAN, block_size=plan_block)), 1)
    assert got.argv[got.argv.index("--block-size") + 1] == str(cpu_block)
    assert bool(got.warnings) is (plan_block != cpu_block)
    assert got.parse_log is not None
    m = got.parse_log(
        "CPU KV cache size: 6,400 tokens, Maximum concurrency for 512 tokens per request: 12.5x"
    )
    assert m is not None and m.num_blocks == 6400 // cpu_block


def test_code_loading_flags_pass_only_with_the_macs_consent() -> None:
    """The agent's --allow-code-loading (EngineSpec.allow_code_loading) lets them through, still
    before the operator's flags; without it the driver refuses."""
    args = ("--trust-remote-code", "--chat-template", "/m/t.jinja")
    with pytest.raises(EngineArgsError, match="--trust-remote-code"):
        launch(spec("vllm-metal", "0.4.0", engine_args=args), 1)
    got = launch(spec("vllm-metal", "0.4.0", engine_args=args, allow_code_loading=True), 1)
    assert got.argv[3:6] == args
    assert got.argv[6] == "--host"
