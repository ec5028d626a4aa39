"""What every engine driver takes and returns: the replica's spec in, a launch (argv + env) out.

Drivers are pure so the exact command line of each engine is a table test, and the supervisor
(the only module that starts processes) never needs to know which engine it runs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

Device = Literal["metal", "cpu", "cuda"]

#: Where every engine listens: loopback only. The agent's authenticating proxy serves the replica on
#: the Mac's address and forwards here, so no engine is reachable without the deployment's key.
ENGINE_HOST = "127.0.0.1"


class MemoryPlanLike(Protocol):
    """The fields of ModelReplica.spec.memoryPlan the drivers read (orchardist.api's MemoryPlan fits)."""

    @property
    def kv_budget_bytes(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def max_model_len(self) -> int: ...
    @property
    def max_num_seqs(self) -> int: ...
    @property
    def max_num_batched_tokens(self) -> int: ...
    @property
    def gpu_memory_utilization(self) -> float: ...


@dataclass(frozen=True)
class Plan:
    """A concrete memory plan for callers (tests, demos) that do not hold an API object."""

    kv_budget_bytes: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    gpu_memory_utilization: float = 0.92
    block_size: int = 16


@dataclass(frozen=True)
class Runtime:
    """One installed engine runtime: a venv (or a prefix with bin/) of a known version."""

    name: str
    version: str
    prefix: Path

    def bin(self, program: str) -> Path:
        return self.prefix / "bin" / program


@dataclass(frozen=True)
class Measured:
    """Numbers the engine printed about its own memory, so plans can be checked against reality."""

    overhead_bytes: int | None = None
    num_blocks: int | None = None
    details: Mapping[str, float] = field(default_factory=dict)


LogParser = Callable[[str], Measured | None]


@dataclass(frozen=True)
class Probe:
    """One tiny real request that proves the engine can generate (readiness beyond /health)."""

    path: str
    body: Mapping[str, Any]


@dataclass(frozen=True)
class Launch:
    """Everything needed to start and check one engine process."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    host: str
    port: int
    probe: Probe
    health_path: str = "/health"
    api_key: str | None = None
    parse_log: LogParser | None = None
    warnings: tuple[str, ...] = ()
    prepare_dirs: tuple[str, ...] = ()  # directories the engine needs to exist before it starts

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def probe_host(self) -> str:
        """Where the agent itself reaches the engine (a wildcard bind is reachable on loopback)."""
        return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)

    def fingerprint(self) -> str:
        """Identity of what would run: equal fingerprints mean an adopted process needs no restart."""
        doc = json.dumps({"argv": list(self.argv), "env": sorted(self.env.items())})
        return hashlib.sha256(doc.encode()).hexdigest()

    def redacted_argv(self) -> list[str]:
        """argv safe to write to disk and logs (the API key value hidden, should it ever appear)."""
        return ["***" if self.api_key and a == self.api_key else a for a in self.argv]

    def redacted_env(self) -> dict[str, str]:
        """env safe to write to disk and logs: the API key reaches engines here, never on argv."""
        return {k: "***" if self.api_key and v == self.api_key else v for k, v in self.env.items()}


class EngineArgsError(ValueError):
    """The replica asks for something the engine driver refuses (operator-owned flag, unknown knob)."""

    reason = "EngineArgsRefused"


@dataclass(frozen=True)
class EngineSpec:
    """A replica's engine as the agent resolved it: what to run, on which model dir, with which plan."""

    engine: str
    runtime: Runtime
    model_dir: Path
    plan: MemoryPlanLike
    served_model_name: str
    host: str = ENGINE_HOST  # the Mac's address the proxy serves; engines always bind ENGINE_HOST
    engine_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    api_key: str | None = None
    device: Device = "metal"
    dtype: str | None = None
    allow_code_loading: bool = False  # the Mac's admin consented (agent --allow-code-loading)

    def launch(self, port: int) -> Launch:
        from orchardist_agent.engines import launch

        return launch(self, port)


def format_fraction(value: float) -> str:
    """0.92 -> '0.92' (no float noise such as 0.9200000000000001 on a command line)."""
    return f"{value:.4f}".rstrip("0").rstrip(".")


def completion_probe(model: str | None) -> Probe:
    body: dict[str, Any] = {"prompt": "Hi", "max_tokens": 1, "temperature": 0}
    if model is not None:
        body["model"] = model
    return Probe(path="/v1/completions", body=body)
