"""`orchardist agent run`: the node agent's main loop on one Mac.

Joins the `orchardist` CLI through the `orchardist.commands` entry point. The loop: probe the
host, register the MacNode, then run the heartbeat (node.py) and the replica loop (replicas.py)
until SIGTERM/SIGINT. On exit the engines keep running unless `--stop-engines-on-exit`: the
supervisor recorded them and the next agent adopts them, so an agent upgrade does not interrupt
serving.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchardist import log

from .config import (
    AgentConfig,
    default_node_name,
    default_state_dir,
    default_store,
    parse_bytes,
    parse_runtime,
)

if TYPE_CHECKING:
    from .node import NodeAgent

LOG = log.get(__name__)


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="agent_command", metavar="COMMAND")
    run_p = sub.add_parser("run", help="run the node agent on this Mac", description=__doc__)
    run_p.add_argument(
        "--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)"
    )
    run_p.add_argument("--node-name", default=None, help="this Mac's MacNode name (default: the hostname)")
    run_p.add_argument(
        "--simulate",
        metavar="PROFILE",
        type=mac_profile,
        help="pretend to be a Mac profile, e.g. m4-pro-64gb",
    )
    run_p.add_argument(
        "--store", type=Path, default=None, help=f"model store directory (default: {default_store()})"
    )
    run_p.add_argument(
        "--store-budget", type=parse_bytes, default=None, help="disk the store may use, e.g. 500Gi"
    )
    run_p.add_argument(
        "--state-dir", type=Path, default=None, help=f"engine records and logs ({default_state_dir()})"
    )
    run_p.add_argument(
        "--address", default=None, help="address replicas are reached at (default: discovered)"
    )
    run_p.add_argument(
        "--bind-address",
        default=None,
        help="address the replicas' proxies listen on (default: --address); engines use 127.0.0.1",
    )
    run_p.add_argument(
        "--engine-user",
        default=None,
        metavar="NAME",
        help="unprivileged account engines run as, so they cannot read the agent's credentials "
        "(default: the agent's own; development only)",
    )
    run_p.add_argument(
        "--allow-code-loading",
        action="store_true",
        help="let engines load code or files a deployment names (--trust-remote-code, parser "
        "plugins, PYTHONPATH, ...); the Mac's admin's consent, needed besides the cluster's",
    )
    run_p.add_argument(
        "--proxy-max-body",
        type=parse_bytes,
        default=4 << 20,
        metavar="BYTES",
        help="largest request body a replica's proxy accepts, e.g. 4Mi (default)",
    )
    run_p.add_argument(
        "--metrics-port",
        type=int,
        default=9464,
        metavar="PORT",
        help="serve Prometheus metrics at http://<bind address>:PORT/metrics (9464; 0: off; "
        "a taken port falls back to a free one, reported in MacNode status.metricsPort)",
    )
    run_p.add_argument(
        "--peer-port",
        type=int,
        default=8479,
        metavar="PORT",
        help="port every Mac of the fleet serves its verified blobs on (default 8479; 0: off); peers "
        "authenticate with their agent ServiceAccount, so other credentials leave peer transfer off",
    )
    run_p.add_argument("--heartbeat-interval", type=float, default=10.0, help="Lease renewal period, s (10)")
    run_p.add_argument(
        "--runtime",
        action="append",
        default=[],
        type=parse_runtime,
        metavar="ENGINE=PATH",
        help="where an engine runs from (a venv or binary); repeatable, e.g. mlx-lm=~/venvs/mlx",
    )
    run_p.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    run_p.add_argument("--log-level", default="INFO")
    run_p.add_argument(
        "--stop-engines-on-exit",
        action="store_true",
        help="stop the engines when the agent exits (default: leave them serving, to be adopted)",
    )
    run_p.set_defaults(func=run)
    parser.set_defaults(_parser=parser)


def mac_profile(name: str) -> str:
    """A known simulated Mac (orchardist.planning.macs), checked while parsing the command line."""
    from orchardist.planning import macs

    if name not in macs.PROFILES:
        raise argparse.ArgumentTypeError(f"unknown Mac profile {name!r}; known: {', '.join(macs.PROFILES)}")
    return name


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    return AgentConfig(
        node_name=args.node_name or default_node_name(),
        store=(args.store or default_store()).expanduser(),
        state_dir=(args.state_dir or default_state_dir()).expanduser(),
        kubeconfig=args.kubeconfig,
        simulate=args.simulate,
        store_budget=args.store_budget,
        address=args.address,
        bind_address=args.bind_address,
        engine_user=args.engine_user,
        allow_code_loading=args.allow_code_loading,
        proxy_max_body_bytes=args.proxy_max_body,
        peer_port=args.peer_port,
        metrics_port=args.metrics_port,
        heartbeat_interval=args.heartbeat_interval,
        runtimes=dict(args.runtime),
        log_format=args.log_format,
        log_level=args.log_level,
        stop_engines_on_exit=args.stop_engines_on_exit,
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    log.configure(cfg.log_level, cfg.log_format)  # type: ignore[arg-type]
    if cfg.engine_user:
        from .supervisor.users import lookup

        try:
            lookup(cfg.engine_user)
        except ValueError as exc:
            print(f"orchardist agent run: {exc}", file=sys.stderr)
            return 2
    from kubernetes.config.config_exception import ConfigException

    try:
        return asyncio.run(main(cfg))
    except ConfigException as exc:
        print(f"orchardist agent run: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def check_credentials(cfg: AgentConfig) -> None:
    """Say when engines could read the agent's credentials (same uid, or a shared kubeconfig)."""
    import os
    import stat

    if not cfg.engine_user:
        LOG.warning("engines run as the agent's user and can read its credentials; set --engine-user")
    path = Path(cfg.kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or "/nonexistent")
    if path.is_file() and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        LOG.warning("the kubeconfig is readable by other users; chmod 600 it", path=str(path))


def host_facts(cfg: AgentConfig) -> Callable[[], dict[str, Any]]:
    """The MacNode status fields the host probe observes, as JSON (camelCase)."""
    from .engines.runtimes import RuntimeRegistry
    from .host import probe

    registry = RuntimeRegistry(configured=cfg.runtimes)

    def facts() -> dict[str, Any]:
        found: Any = probe(cfg.store, cfg.simulate, address=cfg.address)
        status: dict[str, Any] = (
            found.model_dump(mode="json", by_alias=True, exclude_none=True)
            if hasattr(found, "model_dump")
            else dict(found)
        )
        store = dict(status.get("modelStore") or {})
        store.setdefault("path", str(cfg.store))
        if cfg.store_budget is not None:
            store["budgetBytes"] = cfg.store_budget
        status["modelStore"] = store
        status["engines"] = [{"name": n, "version": v} for n, v in registry.installed()]
        return status

    return facts


def with_metrics_port(facts: Callable[[], dict[str, Any]], port: int) -> Callable[[], dict[str, Any]]:
    """The host facts plus the port the agent's metrics listen on (MacNode status.metricsPort)."""

    def more() -> dict[str, Any]:
        return {**facts(), "metricsPort": port}

    return more


async def register_node(node: NodeAgent, host: dict[str, Any], stop: asyncio.Event) -> bool:
    """Register the MacNode, retrying by :data:`orchardist.retry.NETWORK` until it works or ``stop``.

    The API server may come up after the agent (launchd starts it at boot). False when stopped first.
    """
    import tenacity

    from orchardist import retry

    def log_retry(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = round(state.next_action.sleep, 2) if state.next_action else None
        LOG.warning("registration failed; retrying", node=node.name, error=str(exc), retry_in=wait)

    async def keep_trying() -> None:
        async for attempt in retry.retrying(attempts=sys.maxsize, retry_on=Exception, before_sleep=log_retry):
            with attempt:
                await node.register(host)

    registering = asyncio.create_task(keep_trying())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({registering, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not registering.done():
        registering.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await registering
        return False
    registering.result()
    return True


async def main(cfg: AgentConfig) -> int:
    from orchardist.kube import AGENT, Kube, RawApi, api_client

    from .metrics import AgentMetrics
    from .node import NodeAgent, discover_address

    cfg.store.mkdir(parents=True, exist_ok=True)
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    cfg.state_dir.chmod(0o700)  # engine records hold the launch's environment (API keys)
    check_credentials(cfg)
    facts = host_facts(cfg)
    first = await asyncio.to_thread(facts)  # on macOS system_profiler takes a second or two: once
    address = cfg.address or str(first.get("address") or "") or discover_address()
    metrics = AgentMetrics()
    if cfg.metrics_port:
        port = await metrics.start(cfg.bind_address or address, cfg.metrics_port)
        facts = with_metrics_port(facts, port)
        first["metricsPort"] = port
    kube = Kube(RawApi(api_client(cfg.kubeconfig, manager=AGENT)))
    node = NodeAgent(kube, cfg.node_name, facts, address=address, heartbeat_interval=cfg.heartbeat_interval)
    metrics.collector.attach(node)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    if not await register_node(node, first, stop):
        await metrics.close()
        return 0
    LOG.info(
        "agent running",
        node=cfg.node_name,
        address=address,
        simulate=cfg.simulate,
        store=str(cfg.store),
        runtimes={k: str(v) for k, v in cfg.runtimes.items()},
    )
    from .replicas import ReplicaLoop

    replicas = ReplicaLoop.create(kube, node, cfg, address)
    metrics.collector.attach(node, replicas)
    tasks = [
        asyncio.create_task(node.run(stop), name="heartbeat"),
        asyncio.create_task(replicas.run(stop), name="replicas"),
    ]
    done, _ = await asyncio.wait(
        [*tasks, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED
    )
    code = 0
    for task in done:
        if task in tasks and not task.cancelled() and task.exception() is not None:
            LOG.error("agent loop failed", task=task.get_name(), error=repr(task.exception()))
            code = 1
    stop.set()
    for task in tasks:
        with contextlib.suppress(Exception, asyncio.CancelledError):  # a failure was logged above
            await asyncio.wait_for(task, 10)
    await replicas.shutdown(stop_engines=cfg.stop_engines_on_exit)
    await metrics.close()
    try:
        await asyncio.wait_for(node.mark_stopped(), 5)
    except Exception as exc:
        LOG.warning("could not mark the node stopped", error=str(exc))
    LOG.info("agent stopped", node=cfg.node_name, engines_left_running=not cfg.stop_engines_on_exit)
    sys.stderr.flush()
    return code
