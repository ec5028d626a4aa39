"""Engine drivers: one pure module per engine composing argv + env from a replica's memory plan.

`launch(spec, port)` dispatches on the engine name used in the API (`vllm-metal`, `mlx-lm`,
`llama.cpp`, `vllm`); the only I/O here is listing the model directory for the GGUF file.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from orchardist_agent.engines import llama_cpp, mlx_lm, vllm, vllm_metal
from orchardist_agent.engines.base import (
    ENGINE_HOST,
    EngineArgsError,
    EngineSpec,
    Launch,
    Measured,
    MemoryPlanLike,
    Plan,
    Probe,
    Runtime,
)
from orchardist_agent.engines.policy import LaunchPolicyError

ENGINES = ("vllm-metal", "mlx-lm", "llama.cpp", "vllm")

# mlx_lm.server scans the Hugging Face cache for /v1/models and answers an empty body when that
# directory does not exist; an existing empty one makes it list the served model.
EMPTY_HF_CACHE = Path(tempfile.gettempdir()) / "orchardist-empty-hf-cache"


def launch(spec: EngineSpec, port: int, *, hf_cache: Path = EMPTY_HF_CACHE) -> Launch:
    if spec.engine == "vllm-metal":
        return vllm_metal.launch(spec, port)
    if spec.engine == "vllm":
        return vllm.launch(spec, port)
    if spec.engine == "mlx-lm":
        return mlx_lm.launch(spec, port, hf_cache=str(hf_cache))
    if spec.engine == "llama.cpp":
        files = sorted(p.name for p in spec.model_dir.iterdir()) if spec.model_dir.is_dir() else []
        return llama_cpp.launch(spec, port, model_files=files)
    raise EngineArgsError(f"unknown engine {spec.engine!r} (known: {', '.join(ENGINES)})")


__all__ = [
    "EMPTY_HF_CACHE",
    "ENGINES",
    "ENGINE_HOST",
    "EngineArgsError",
    "EngineSpec",
    "Launch",
    "LaunchPolicyError",
    "Measured",
    "MemoryPlanLike",
    "Plan",
    "Probe",
    "Runtime",
    "launch",
]
