"""The agent's settings: parsed once from the command line, then read-only.

Defaults follow where each OS keeps caches (macOS `~/Library/Caches`, XDG elsewhere) so a model
store survives agent upgrades and is skipped by backups. Sizes (``--store-budget``) go through the
project's one byte-count parser, ``orchardist.api.quantity.parse_bytes``, re-exported here.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from orchardist.api.quantity import parse_bytes

__all__ = [
    "AgentConfig",
    "default_node_name",
    "default_state_dir",
    "default_store",
    "parse_bytes",
    "parse_runtime",
]


def parse_runtime(text: str) -> tuple[str, Path]:
    """`ENGINE=PATH` -> (engine, path): the venv or binary an engine runs from."""
    engine, sep, path = text.partition("=")
    if not sep or not engine or not path:
        raise ValueError(f"--runtime wants ENGINE=PATH, got {text!r}")
    return engine.strip(), Path(path).expanduser()


def default_store() -> Path:
    if sys.platform == "darwin":
        return Path("~/Library/Caches/orchardist").expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "orchardist" / "store"


def default_state_dir() -> Path:
    if sys.platform == "darwin":
        return Path("~/Library/Application Support/orchardist/agent").expanduser()
    return Path(os.environ.get("XDG_STATE_HOME", "~/.local/state")).expanduser() / "orchardist" / "agent"


def default_node_name() -> str:
    """The hostname, lowercased and cut at the first dot (a valid Kubernetes object name)."""
    name = socket.gethostname().split(".")[0].lower()
    return re.sub(r"[^a-z0-9-]", "-", name).strip("-") or "mac"


@dataclass(frozen=True)
class AgentConfig:
    node_name: str
    store: Path
    state_dir: Path
    kubeconfig: str | None = None
    simulate: str | None = None
    store_budget: int | None = None
    address: str | None = None  # None: discovered
    bind_address: str | None = None  # where replicas' proxies listen; None: the node's address
    engine_user: str | None = None  # the unprivileged account engines run as (None: the agent's)
    allow_code_loading: bool = False  # the Mac's admin lets engines load code the deployment names
    proxy_max_body_bytes: int = 4 << 20
    # Where this Mac serves its blobs to the fleet (the same on every Mac); 0: off. Peer transfer
    # also needs the agent's own ServiceAccount identity (docs/architecture.md "Peer transfer").
    peer_port: int = 8479
    metrics_port: int = 9464  # Prometheus metrics on the bind address (0: not served)
    heartbeat_interval: float = 10.0
    runtimes: dict[str, Path] = field(default_factory=dict)
    log_format: str = "auto"
    log_level: str = "INFO"
    stop_engines_on_exit: bool = False

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"
