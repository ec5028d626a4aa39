"""What a ModelDeployment may not put on an engine's command line or in its environment.

One source for the CRD's CEL rules (refused at ``kubectl apply``) and the agent's launch policy
(which also holds the per-engine allowlists and refuses everything not on them). The engines' own
argument parsers decide what counts: vLLM and mlx-lm use Python's argparse, which takes any
unambiguous prefix of a long option (``--max-model`` is ``--max-model-len``) and vLLM also reads
``--max_model_len``; llama.cpp matches exactly but reads ``LLAMA_ARG_*`` variables for its flags.
"""

from __future__ import annotations

from typing import Final

FlagGroups = tuple[tuple[tuple[str, ...], str], ...]

#: Engine flags the operator sets itself, grouped by what the user sets instead. Each group becomes
#: one CEL rule (its message names the spec field) and one entry of the agent's check.
FLAG_OWNERS: Final[FlagGroups] = (
    (
        ("--model", "-m", "--model-url", "-mu", "--hf-repo", "-hf", "-hfr", "--hf-file", "-hff"),
        "set spec.model instead",
    ),
    (("--config",), "engine options come from the spec (its fields and engineArgs), not from a file"),
    (
        ("--host", "--port", "--uds", "--grpc-port"),
        "the agent binds every engine to an address and port it chooses; set spec.service.port "
        "for the Service port",
    ),
    (("--max-model-len", "-c", "--ctx-size"), "set spec.contextLength instead"),
    (("--gpu-memory-utilization",), "set spec.kvCache.gpuMemoryUtilization instead"),
    (("--block-size",), "set spec.kvCache.blockSize instead"),
    (
        ("--max-num-seqs", "-np", "--parallel", "--decode-concurrency", "--prompt-concurrency"),
        "set spec.maxConcurrentSequences instead",
    ),
    (
        (
            "--max-num-batched-tokens",
            "--max-num-scheduled-tokens",
            "-b",
            "--batch-size",
            "-ub",
            "--ubatch-size",
        ),
        "the memory planner sets it from the Mac's memory; lower "
        "spec.maxConcurrentSequences or spec.contextLength instead",
    ),
    (
        (
            "--kv-cache-memory-bytes",
            "--num-gpu-blocks-override",
            "--swap-space",
            "--cpu-offload-gb",
            "--kv-offloading-size",
            "--kv-offloading-backend",
            "--mm-processor-cache-gb",
            "--prompt-cache-bytes",
            "--prompt-cache-size",
            "-cram",
            "--cache-ram",
            "-kvu",
            "--kv-unified",
            "--kv-unified-per-slot",
            "-fit",
            "--fit",
        ),
        "the memory plan sizes every cache and offload from the Mac's memory; set "
        "spec.kvCache.gpuMemoryUtilization instead",
    ),
    (
        (
            "--kv-cache-dtype",
            "-ctk",
            "--cache-type-k",
            "-ctv",
            "--cache-type-v",
            "--kv-bits",
            "--kv-group-size",
            "--quantized-kv-start",
            "--dtype",
            "--quantization",
            "-q",
        ),
        "the memory plan counts the model's own weight and KV cache types; publish a model "
        "quantized as you want it served instead",
    ),
    (("--served-model-name", "--alias", "-a"), "the model is served under the ModelDeployment's name"),
    (("--api-key", "--api-key-file"), "set spec.apiKeySecretRef instead"),
    (("-ngl", "--gpu-layers", "--n-gpu-layers"), "the operator always offloads every layer to the GPU"),
)

#: Flags that make the engine run code or read files the deployment's author chose (remote code in
#: the model directory, parser and processor plugins, templates and adapters from paths, logging
#: configs that name classes). Refused unless the cluster admin and the Mac's admin both allow them.
CODE_LOADING_FLAGS: Final = (
    "--trust-remote-code",
    "--tool-parser-plugin",
    "--reasoning-parser-plugin",
    "--io-processor-plugin",
    "--logits-processors",
    "--middleware",
    "--chat-template",
    "--chat-template-file",
    "--adapter-path",
    "--lora-modules",
    "--lora",
    "--lora-scaled",
    "--enable-lora",
    "--model-class-overrides",
    "--log-config-file",
    "--logging-config",
    "--speculative-config",
    "--draft-model",
    "-md",
    "--model-draft",
    "--tokenizer",
    "--generation-config",
    "--hf-config-path",
    "--model-loader-extra-config",
    "--download-dir",
    "--allowed-local-media-path",
    "--log-file",
)

#: Whole flags of some engine that are also prefixes of a listed flag (`--reasoning-parser` of
#: `--reasoning-parser-plugin`): argparse takes an exact match before any abbreviation.
WHOLE_FLAGS: Final = ("--reasoning-parser",)

CODE_LOADING_HINT: Final = (
    "it makes the engine run code or read files named by the deployment; a cluster admin must allow "
    "code loading (chart value engines.allowCodeLoading) and the Mac's admin must start the agent "
    "with --allow-code-loading"
)

#: Environment variables the agent (or a spec field) owns for every engine process.
ENV_OWNERS: Final[FlagGroups] = (
    (
        (
            "VLLM_HOST_IP",
            "VLLM_PORT",
            "HF_HUB_OFFLINE",
            "HF_HUB_CACHE",
            "TRANSFORMERS_OFFLINE",
            "VLLM_WORKER_MULTIPROC_METHOD",
            "VLLM_NO_USAGE_STATS",
        ),
        "the agent sets these for every engine process",
    ),
    (
        ("VLLM_METAL_MEMORY_FRACTION", "VLLM_CPU_KVCACHE_SPACE"),
        "set spec.kvCache.gpuMemoryUtilization instead",
    ),
    (("VLLM_API_KEY", "LLAMA_API_KEY"), "set spec.apiKeySecretRef instead"),
)
AGENT_OWNED_ENV: Final = tuple(name for names, _ in ENV_OWNERS for name in names)

#: Prefixes of variables an engine reads as its flags (llama.cpp: LLAMA_ARG_<FLAG>): owned as a whole.
OWNED_ENV_PREFIXES: Final = ("LLAMA_ARG_",)

#: Variables that make an interpreter or the dynamic loader load code from a path, or an engine
#: load plugins, configs or dev endpoints. Refused like the code-loading flags.
CODE_LOADING_ENV: Final = (
    "PYTHONPATH",
    "PYTHONSTARTUP",
    "PYTHONHOME",
    "PYTHONUSERBASE",
    "PYTHONSAFEPATH",
    "PYTHONEXECUTABLE",
    "PYTHONPYCACHEPREFIX",
    "PYTHONBREAKPOINT",
    "PYTHONINSPECT",
    "VLLM_PLUGINS",
    "VLLM_LOGGING_CONFIG_PATH",
    "VLLM_CONFIGURE_LOGGING",
    "VLLM_SERVER_DEV_MODE",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING",
    "VLLM_CONFIG_ROOT",
    "VLLM_CACHE_ROOT",
    "HF_HOME",
    "TRANSFORMERS_CACHE",
    "SSL_CERT_FILE",
    "GGML_METAL_PATH_RESOURCES",
    "VLLM_METAL_BUILD_FROM_SOURCE",
    "VLLM_METAL_MM_PREFIX_PATH",
    "VLLM_METAL_MODELSCOPE_CACHE",
    "VLLM_USE_MODELSCOPE",
)
CODE_LOADING_ENV_PREFIXES: Final = ("LD_", "DYLD_", "PYTHON")

#: Every flag the operator owns, in the order of FLAG_OWNERS.
OPERATOR_OWNED_FLAGS: Final = tuple(flag for flags, _ in FLAG_OWNERS for flag in flags)


def flag_forms(flag: str) -> tuple[str, ...]:
    """The exact spellings of one flag an engine accepts: `--flag` and vLLM's `--flag_name`."""
    forms = [flag]
    if flag.startswith("--") and "-" in flag[2:]:
        forms.append("--" + flag[2:].replace("-", "_"))
    return tuple(forms)


def flag_of(arg: str) -> str:
    """The flag part of one item: `--port=1` -> `--port`; underscores read as vLLM reads them."""
    name = arg.split("=", 1)[0]
    return "--" + name[2:].replace("_", "-") if name.startswith("--") else name


def sets_flag(arg: str, flag: str) -> bool:
    """Whether an engine's parser reads `arg` as `flag`: exactly, as flag=value, or (long flags) as
    an abbreviation argparse would expand. Fail closed: an ambiguous prefix counts too."""
    name = flag_of(arg)
    if name == flag:
        return True
    if name in WHOLE_FLAGS:
        return False
    return flag.startswith("--") and name.startswith("--") and len(name) > 2 and flag.startswith(name)


def owned_flag(arg: str) -> str | None:
    """The operator-owned flag that `arg` sets (in any accepted spelling), or None if it is free."""
    for flags, _ in FLAG_OWNERS:
        for flag in flags:
            if sets_flag(arg, flag):
                return flag
    return None


def code_loading_flag(arg: str) -> str | None:
    """The code-loading flag that `arg` sets (in any accepted spelling), or None."""
    return next((flag for flag in CODE_LOADING_FLAGS if sets_flag(arg, flag)), None)


def owned_env(name: str) -> bool:
    return name in AGENT_OWNED_ENV or name.startswith(OWNED_ENV_PREFIXES)


def code_loading_env(name: str) -> bool:
    return name in CODE_LOADING_ENV or name.startswith(CODE_LOADING_ENV_PREFIXES)
