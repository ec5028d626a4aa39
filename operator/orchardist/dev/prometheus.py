"""Debian's Prometheus against the local fleet: the controller, the gateway and every agent.

Debian builds Prometheus without Kubernetes service discovery, so the agents are found through
the controller's HTTP service discovery (``/sd/agents`` on its metrics port): the list it also
writes into the EndpointSlices of ``orchardist-agents-metrics`` for Prometheus on a cluster. The
controller and the gateway are processes on this machine, scraped at fixed addresses.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from orchardist.dev import procs


@dataclass(frozen=True)
class Targets:
    """What Prometheus scrapes: ``host:port`` of the controller (agents through it) and gateway."""

    controller: str | None  # None (the operator in a Pod): no controller or agents job
    gateway: str | None


def config(targets: Targets, interval: float = 5.0) -> dict[str, object]:
    """The Prometheus configuration (pure): one job per part of the fleet."""
    every = f"{interval:g}s"
    jobs: list[dict[str, object]] = []
    for job, address in (
        ("orchardist-controller", targets.controller),
        ("orchardist-gateway", targets.gateway),
    ):
        if address:
            jobs.append({"job_name": job, "static_configs": [{"targets": [address]}]})
    if targets.controller:
        jobs.append(
            {
                "job_name": "orchardist-agents",
                "http_sd_configs": [
                    {"url": f"http://{targets.controller}/sd/agents", "refresh_interval": every}
                ],
            }
        )
    return {"global": {"scrape_interval": every, "evaluation_interval": every}, "scrape_configs": jobs}


def binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        raise FileNotFoundError(
            "prometheus is not installed (Debian package prometheus; hack/install-system-deps.sh)"
        )
    return found


def start(
    directory: Path,
    targets: Targets,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    interval: float = 5.0,
    timeout: float = 60.0,
    die_with_parent: bool = False,
) -> tuple[str, procs.ProcRecord]:
    """Write the configuration, start Prometheus, wait until it is ready: (URL, its record)."""
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "prometheus.yml"
    conf.write_text(yaml.safe_dump(config(targets, interval), sort_keys=False))
    port = port or procs.free_port(host)
    record = procs.start(
        "prometheus",
        [
            binary(),
            f"--config.file={conf}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address={host}:{port}",
            "--storage.tsdb.retention.time=1d",
        ],
        directory / "prometheus.log",
        die_with_parent=die_with_parent,
    )
    url = f"http://{host}:{port}"
    procs.wait_http(f"{url}/-/ready", timeout=timeout, proc=record)
    return url, record


__all__ = ["Targets", "binary", "config", "start"]
