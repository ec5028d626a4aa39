"""The engine launch policy as tables: hostile engineArgs and env refused with their reasons, the
allowlists in step with the engines' recorded --help, and the CRD's lists never refusing an allowed
flag."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchardist.api import launch as launch_lists
from orchardist.api.launch import CODE_LOADING_FLAGS, OPERATOR_OWNED_FLAGS, owned_flag
from orchardist_agent.engines import EngineSpec, Plan, Runtime, launch, llama_cpp, mlx_lm, vllm, vllm_metal
from orchardist_agent.engines.policy import LaunchPolicy, LaunchPolicyError, check_args, check_env

DATA = Path(__file__).parents[1] / "data" / "engines"
POLICIES: dict[str, LaunchPolicy] = {
    "vllm-metal": vllm_metal.POLICY,
    "vllm": vllm.POLICY,
    "mlx-lm": mlx_lm.POLICY,
    "llama.cpp": llama_cpp.POLICY,
}

HOSTILE_ARGS = [
    # (engine, engineArgs, the refusal's words)
    ("vllm", ("--max-model", "99999"), "(--max-model is read as --max-model-len)"),
    ("vllm", ("--max_model_len=99999",), "sets --max-model-len, which the operator owns"),
    ("vllm-metal", ("--gpu-mem=0.99",), "sets --gpu-memory-utilization"),
    ("vllm-metal", ("--kv-cache-memory-bytes", "1"), "memory plan sizes every cache"),
    ("vllm", ("--cpu-offload-gb", "8"), "sets --cpu-offload-gb"),
    ("vllm", ("--kv-offloading-size", "8"), "sets --kv-offloading-size"),
    ("vllm", ("--num-gpu-blocks-override", "99999"), "sets --num-gpu-blocks-override"),
    ("vllm", ("--kv-cache-dtype", "fp8"), "weight and KV cache types"),
    ("vllm", ("--ho", "0.0.0.0"), "(--ho is read as --host)"),
    ("vllm", ("--uds", "/tmp/engine.sock"), "sets --uds"),
    ("vllm", ("--api-k", "mine"), "set spec.apiKeySecretRef instead"),
    ("vllm-metal", ("--served-model-name", "other"), "served under the ModelDeployment's name"),
    ("vllm-metal", ("--config", "/models/m/evil.yaml"), "not from a file"),
    ("vllm", ("--trust-remote-code",), "sets --trust-remote-code: it makes the engine run code"),
    ("vllm", ("--trust-rem",), "sets --trust-remote-code"),
    ("vllm", ("--tool-parser-plugin", "/models/m/p.py"), "sets --tool-parser-plugin"),
    ("vllm", ("--reasoning-parser-plugin=/m/r.py",), "sets --reasoning-parser-plugin"),
    ("vllm", ("--chat-template", "/etc/passwd"), "sets --chat-template"),
    ("vllm", ("--logits-processors", "m.evil:Proc"), "sets --logits-processors"),
    ("vllm", ("--logging-config", "/m/log.json"), "sets --logging-config"),
    ("vllm", ("--lora-modules", "a=/m/a"), "sets --lora-modules"),
    ("vllm", ("--enable-prefix-caching", "other-model"), "bare value 'other-model' does not follow"),
    ("vllm", ("other-model",), "bare value 'other-model'"),
    ("vllm", ("--seed",), "--seed needs a value, but it is the last item"),
    ("vllm", ("--seed", "--port=1"), "--seed needs a value, but '--port=1' follows it"),
    ("vllm", ("--seed", "1", "--", "x"), "'--' ends the options"),
    ("vllm", ("-O3",), "-O3 is not an allowed vllm flag"),
    ("vllm", ("-qawq",), "-qawq is not an allowed vllm flag"),
    ("vllm", ("-q", "awq"), "sets -q, which the operator owns"),
    ("vllm", ("--compilation-config.level", "3"), "is not an allowed vllm flag"),
    ("vllm", ("--enable-prefix-caching=1",), "takes no value"),
    ("vllm", ("--seed=",), "has an empty value"),
    (
        "vllm",
        ("--enable-prefix",),
        "--enable-prefix is not an allowed vllm flag (write allowed flags in full)",
    ),
    ("mlx-lm", ("--mod", "/elsewhere"), "(--mod is read as --model)"),
    ("mlx-lm", ("--decode-c", "512"), "(--decode-c is read as --decode-concurrency)"),
    ("mlx-lm", ("--prompt-cache-size", "99"), "sets --prompt-cache-size"),
    ("mlx-lm", ("--kv-bits", "4"), "sets --kv-bits"),
    ("mlx-lm", ("--adapter-path", "/m/adapters"), "sets --adapter-path: it makes the engine run code"),
    ("mlx-lm", ("--trust",), "sets --trust-remote-code"),
    ("mlx-lm", ("--draft-model", "/m/draft"), "sets --draft-model"),
    ("mlx-lm", ("--temp", "0.1", "0.2"), "bare value '0.2'"),
    ("llama.cpp", ("-ngl", "10"), "always offloads every layer"),
    ("llama.cpp", ("--api-key-file", "/k"), "set spec.apiKeySecretRef instead"),
    ("llama.cpp", ("-hf", "user/model"), "set spec.model instead"),
    ("llama.cpp", ("-cram", "99999"), "sets -cram"),
    ("llama.cpp", ("-ctk", "q4_0"), "sets -ctk"),
    ("llama.cpp", ("-ub", "4096"), "sets -ub"),
    ("llama.cpp", ("--log-file", "/home/agent/.kube/config"), "sets --log-file"),
    ("llama.cpp", ("--lora", "/m/evil.gguf"), "sets --lora"),
    ("llama.cpp", ("--chat-template-file", "/m/t.jinja"), "sets --chat-template-file"),
    ("llama.cpp", ("-t",), "-t needs a value"),
]


@pytest.mark.parametrize(
    ("engine", "args", "words"), HOSTILE_ARGS, ids=[" ".join(a) for _, a, _ in HOSTILE_ARGS]
)
def test_hostile_engine_args_are_refused(engine: str, args: tuple[str, ...], words: str) -> None:
    with pytest.raises(LaunchPolicyError) as caught:
        check_args(POLICIES[engine], args)
    assert words in str(caught.value)
    assert caught.value.reason == "EngineArgsRefused"


HOSTILE_ENV = [
    ("vllm", "PYTHONPATH", "PYTHONPATH: it makes the engine run code"),
    ("vllm", "PYTHONSTARTUP", "PYTHONSTARTUP: it makes the engine run code"),
    ("mlx-lm", "PYTHONHOME", "PYTHONHOME: it makes"),
    ("mlx-lm", "PYTHONWARNINGS", "PYTHONWARNINGS: it makes"),
    ("llama.cpp", "LD_PRELOAD", "LD_PRELOAD: it makes"),
    ("llama.cpp", "LD_LIBRARY_PATH", "LD_LIBRARY_PATH: it makes"),
    ("vllm-metal", "DYLD_INSERT_LIBRARIES", "DYLD_INSERT_LIBRARIES: it makes"),
    ("vllm", "VLLM_PLUGINS", "VLLM_PLUGINS: it makes"),
    ("vllm", "VLLM_SERVER_DEV_MODE", "VLLM_SERVER_DEV_MODE: it makes"),
    ("vllm", "VLLM_LOGGING_CONFIG_PATH", "VLLM_LOGGING_CONFIG_PATH: it makes"),
    ("vllm-metal", "VLLM_METAL_BUILD_FROM_SOURCE", "VLLM_METAL_BUILD_FROM_SOURCE: it makes"),
    ("llama.cpp", "LLAMA_ARG_PORT", "LLAMA_ARG_PORT is set by the agent"),
    ("llama.cpp", "LLAMA_ARG_CTX_SIZE", "LLAMA_ARG_CTX_SIZE is set by the agent"),
    ("llama.cpp", "LLAMA_API_KEY", "LLAMA_API_KEY is set by the agent"),
    ("vllm", "VLLM_API_KEY", "VLLM_API_KEY is set by the agent"),
    ("vllm", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_KVCACHE_SPACE is set by the agent"),
    ("mlx-lm", "HF_HUB_CACHE", "HF_HUB_CACHE is set by the agent"),
    ("vllm", "HTTP_PROXY", "HTTP_PROXY is not an allowed vllm variable"),
    ("mlx-lm", "VLLM_LOGGING_LEVEL", "VLLM_LOGGING_LEVEL is not an allowed mlx-lm variable"),
]


@pytest.mark.parametrize(("engine", "name", "words"), HOSTILE_ENV, ids=[n for _, n, _ in HOSTILE_ENV])
def test_hostile_env_is_refused(engine: str, name: str, words: str) -> None:
    with pytest.raises(LaunchPolicyError) as caught:
        check_env(POLICIES[engine], {name: "/models/m"})
    assert words in str(caught.value)


ACCEPTED = [
    ("vllm", ("--seed", "7", "--enable-prefix-caching", "--max-logprobs=5", "--seed", "-1")),
    (
        "vllm-metal",
        ("--tool-call-parser", "hermes", "--enable-auto-tool-choice", "--reasoning-parser", "qwen3"),
    ),
    ("vllm", ("--override-generation-config", '{"temperature": 0.5}', "--uvicorn-log-level", "warning")),
    ("mlx-lm", ("--temp", "0.7", "--top-p=0.9", "--use-default-chat-template", "--min-p", "-0.0")),
    ("llama.cpp", ("-t", "8", "--flash-attn", "on", "-cb", "--metrics", "--seed", "-1")),
]


@pytest.mark.parametrize(("engine", "args"), ACCEPTED)
def test_allowed_args_pass_unchanged(engine: str, args: tuple[str, ...]) -> None:
    assert check_args(POLICIES[engine], args) == args


def test_allowed_env_passes() -> None:
    env = {"OMP_NUM_THREADS": "4", "VLLM_METAL_DECODE_PIPELINE": "1", "VLLM_LOGGING_LEVEL": "DEBUG"}
    assert check_env(vllm_metal.POLICY, env) == env
    assert check_env(llama_cpp.POLICY, {"LLAMA_LOG_COLORS": "1"}) == {"LLAMA_LOG_COLORS": "1"}


def test_every_problem_is_named_at_once() -> None:
    with pytest.raises(LaunchPolicyError) as caught:
        check_args(vllm.POLICY, ("--port=1", "stray", "--trust-remote-code"))
    assert len(caught.value.problems) == 3


def test_code_loading_needs_the_admins_consent_and_never_frees_owned_flags() -> None:
    args = ("--trust-remote-code", "--tool-parser-plugin", "/m/p.py", "--chat-template", "/m/t.jinja")
    with pytest.raises(LaunchPolicyError):
        check_args(vllm.POLICY, args)
    assert check_args(vllm.POLICY, args, allow_code_loading=True) == args
    assert check_env(vllm.POLICY, {"PYTHONPATH": "/m"}, allow_code_loading=True) == {"PYTHONPATH": "/m"}
    with pytest.raises(LaunchPolicyError, match="which the operator owns"):
        check_args(vllm.POLICY, ("--trust-remote-code", "--max-model", "9"), allow_code_loading=True)
    with pytest.raises(LaunchPolicyError, match="is set by the agent"):
        check_env(vllm.POLICY, {"VLLM_API_KEY": "x"}, allow_code_loading=True)
    with pytest.raises(LaunchPolicyError, match="sets --tool-parser-plugin"):  # not one of mlx-lm's flags
        check_args(mlx_lm.POLICY, ("--tool-parser-plugin", "/m/p.py"), allow_code_loading=True)


def test_drivers_refuse_through_the_policy(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    for engine in POLICIES:
        spec = EngineSpec(
            engine=engine,
            runtime=Runtime(engine, "0.4.0", Path("/rt")),
            model_dir=tmp_path,
            plan=Plan(kv_budget_bytes=1 << 30, max_model_len=512, max_num_seqs=2, max_num_batched_tokens=512),
            served_model_name="m",
            engine_args=("--trust-remote-code",),
        )
        with pytest.raises(LaunchPolicyError, match="--trust-remote-code"):
            launch(spec, 1)


# ---- the allowlists against the engines' recorded --help ----

_ARGPARSE_OPTION = re.compile(r"(?:^  |, )(-{1,2}[A-Za-z][\w.-]*)( [^-\s])?")


def argparse_help_flags(text: str) -> dict[str, bool]:
    """flag -> takes a value, from argparse's `--help` (the option column of each entry)."""
    found: dict[str, bool] = {}
    for line in text.splitlines():
        if not line.startswith("  -"):
            continue
        head = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        for m in _ARGPARSE_OPTION.finditer("  " + head):
            found.setdefault(m.group(1), m.group(2) is not None)
    return found


def llama_help_flags(text: str) -> dict[str, bool]:
    """flag -> takes a value, from the recorded llama-server table (one spelling group a line)."""
    found: dict[str, bool] = {}
    for line in text.splitlines():
        if not line.startswith("-"):
            continue
        pieces = line.split(", ")
        takes = " " in pieces[-1]
        for piece in pieces:
            found[piece.split(" ")[0]] = takes
    return found


HELP = {
    "vllm": argparse_help_flags((DATA / "vllm-0.32.0-serve-help.txt").read_text()),
    "mlx-lm": argparse_help_flags((DATA / "mlx_lm-0.32.2-server-help.txt").read_text()),
    "llama.cpp": llama_help_flags((DATA / "llama-server-flags.txt").read_text()),
}
HELP["vllm-metal"] = HELP["vllm"]


@pytest.mark.parametrize("engine", sorted(POLICIES))
def test_allowlists_match_the_recorded_help(engine: str) -> None:
    """Every allowed flag exists in the engine's help and takes a value exactly when the help says so."""
    policy, help_flags = POLICIES[engine], HELP[engine]
    for flag, takes in {**policy.flags, **policy.code_flags}.items():
        assert flag in help_flags, f"{flag} is not in {engine}'s recorded help"
        assert help_flags[flag] is takes, f"{flag}: help says takes a value = {help_flags[flag]}"


def test_help_parsers_read_the_files() -> None:
    assert HELP["vllm"]["--max-model-len"] is True and HELP["vllm"]["--enable-prefix-caching"] is False
    assert HELP["vllm"]["-asc"] is True and HELP["mlx-lm"]["--trust-remote-code"] is False
    assert HELP["llama.cpp"]["-ngl"] is True and HELP["llama.cpp"]["-nocb"] is False


@pytest.mark.parametrize("engine", sorted(POLICIES))
def test_no_allowed_flag_is_refused_by_the_crds_lists(engine: str) -> None:
    """The CEL rules are engine-blind (one list for all engines): none may catch an allowed flag."""
    for flag, takes in POLICIES[engine].flags.items():
        assert owned_flag(flag) is None, flag
        assert check_args(POLICIES[engine], (flag, "1") if takes else (flag,))


MEMORY = re.compile(
    r"memory|kv-cache|offload|swap|gpu-blocks|cache-bytes|cache-size|cache-ram|ctx-size|batch-size"
)


@pytest.mark.parametrize("engine", sorted(POLICIES))
def test_no_memory_flag_is_allowed(engine: str) -> None:
    assert [f for f in POLICIES[engine].flags if MEMORY.search(f)] == []


def test_every_help_flag_that_sizes_memory_is_owned() -> None:
    """The flags of the recorded help that size memory are refused as owned (the planner sets them)."""
    sizing = {
        "vllm": [
            "--kv-cache-memory-bytes", "--cpu-offload-gb", "--kv-offloading-size",
            "--num-gpu-blocks-override",
            "--gpu-memory-utilization", "--max-num-batched-tokens", "--max-model-len", "--max-num-seqs",
            "--block-size", "--kv-cache-dtype", "--mm-processor-cache-gb", "--max-num-scheduled-tokens",
        ],
        "mlx-lm": [
            "--prompt-cache-bytes", "--prompt-cache-size", "--decode-concurrency", "--prompt-concurrency",
            "--kv-bits", "--kv-group-size", "--quantized-kv-start",
        ],
        "llama.cpp": [
            "-c", "-np", "-ngl", "-b", "-ub", "-ctk", "-ctv", "-cram", "-kvu",
            "--kv-unified-per-slot", "-fit",
        ],
    }  # fmt: skip
    for engine, flags in sizing.items():
        for flag in flags:
            assert flag in HELP[engine], f"{flag} is not in {engine}'s help"
            assert flag in OPERATOR_OWNED_FLAGS, flag


def test_code_loading_flags_the_help_names_are_listed() -> None:
    for engine, flag in [
        ("vllm", "--trust-remote-code"),
        ("vllm", "--tool-parser-plugin"),
        ("vllm", "--reasoning-parser-plugin"),
        ("vllm", "--middleware"),
        ("mlx-lm", "--trust-remote-code"),
        ("mlx-lm", "--adapter-path"),
        ("llama.cpp", "--chat-template-file"),
    ]:
        assert flag in HELP[engine] and flag in CODE_LOADING_FLAGS


@pytest.mark.parametrize("engine", sorted(POLICIES))
def test_the_drivers_own_flags_come_last(engine: str, tmp_path: Path) -> None:
    """After the user's items only the operator's flags follow, each of them owned."""
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    user = ("--seed", "5") if engine != "mlx-lm" else ("--temp", "0.5")
    spec = EngineSpec(
        engine=engine,
        runtime=Runtime(engine, "0.4.0", Path("/rt")),
        model_dir=tmp_path,
        plan=Plan(kv_budget_bytes=1 << 30, max_model_len=512, max_num_seqs=2, max_num_batched_tokens=512),
        served_model_name="m",
        engine_args=user,
    )
    argv = launch(spec, 1).argv
    end = max(i for i, a in enumerate(argv) if a == user[0]) + 2
    tail = argv[end:]
    assert tail and all(owned_flag(a) is not None for a in tail if a.startswith("-"))


def test_the_charts_code_loading_policy_uses_the_apis_lists() -> None:
    """One source: the chart's admission policy lists what orchardist.api.launch lists."""
    template = (
        Path(__file__).parents[2] / "charts/orchardist/templates/engine-code-loading-policy.yaml"
    ).read_text()

    def listed(var: str) -> tuple[str, ...]:
        m = re.search(rf"\{{\{{- \${var} := list (.*?) \}}\}}", template)
        assert m, var
        return tuple(re.findall(r'"([^"]+)"', m.group(1)))

    assert listed("flags") == CODE_LOADING_FLAGS
    assert listed("env") == launch_lists.CODE_LOADING_ENV
    assert listed("prefixes") == launch_lists.CODE_LOADING_ENV_PREFIXES
    assert listed("whole") == launch_lists.WHOLE_FLAGS


def test_a_refused_launch_is_reported_on_the_replica() -> None:
    """The agent's status says EngineArgsRefused (not CrashLoop) with the policy's words, as a Warning."""
    from orchardist_agent.reconcile import EngineState, EngineView, Observed, ReplicaView, desired_status

    with pytest.raises(LaunchPolicyError) as caught:
        check_args(vllm.POLICY, ("--max-model", "9"))
    message = f"cannot start the engine: {caught.value}"
    view = EngineView(EngineState.FAILED, message=message, reason=caught.value.reason)
    replica = ReplicaView(
        namespace="ns",
        name="r1",
        uid="u1",
        generation=1,
        node_name="mac-1",
        model="oci://127.0.0.1:5000/m@sha256:" + "a" * 64,
        digest="sha256:" + "a" * 64,
        engine="vllm",
        reserved_bytes=1 << 30,
    )
    phase, conds, extra = desired_status(
        replica, Observed(free_bytes=1 << 40, reserved=True, cached=True, engine=view)
    )
    assert phase == "Failed"
    assert extra["lastError"]["reason"] == "EngineArgsRefused"
    assert "(--max-model is read as --max-model-len)" in extra["lastError"]["message"]
    assert {(c.type, c.status, c.reason) for c in conds} >= {("Started", False, "EngineArgsRefused")}
