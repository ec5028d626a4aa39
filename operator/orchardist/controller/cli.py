"""``orchardist operator run``: the controller process (kopf), configured from the command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import kopf

from orchardist import kube as kube_setup
from orchardist import log
from orchardist.controller import authz, handlers
from orchardist.controller.kube import Adapter, Kube
from orchardist.controller.metrics import ControllerMetrics, agent_targets
from orchardist.controller.metrics import serve as serve_metrics
from orchardist.controller.reconciler import Config, Controller

LOG = log.get(__name__)


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="operator_command", metavar="COMMAND")
    run_p = sub.add_parser("run", help="run the controller until stopped (SIGINT/SIGTERM)")
    run_p.add_argument(
        "--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)"
    )
    scope = run_p.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace", "-n", action="append", metavar="NS", help="serve ModelDeployments in NS (repeatable)"
    )
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="serve every namespace (default)")
    peer = run_p.add_mutually_exclusive_group()
    peer.add_argument(
        "--peering",
        default="orchardist",
        metavar="NAME",
        help="leader election among operators sharing this peering object (default orchardist)",
    )
    peer.add_argument("--standalone", action="store_true", help="no leader election (one operator only)")
    run_p.add_argument(
        "--priority",
        type=int,
        default=None,
        help="peering priority; the highest live one acts (default: start time in ms, so the newest wins)",
    )
    run_p.add_argument(
        "--peering-lifetime",
        type=int,
        default=30,
        help="seconds before a silent leader is presumed dead (30)",
    )
    run_p.add_argument(
        "--lease-grace",
        type=float,
        default=40.0,
        help="seconds after a Mac's last Lease renewal before it counts as NotReady (40)",
    )
    run_p.add_argument(
        "--resync",
        type=float,
        default=None,
        help="seconds between level-based resyncs (default: grace / 4, <= 10)",
    )
    health = run_p.add_mutually_exclusive_group()
    health.add_argument(
        "--health-port",
        type=int,
        default=8080,
        metavar="PORT",
        help="liveness at http://0.0.0.0:PORT/healthz, readiness at /readyz (8080; 0: off)",
    )
    health.add_argument(
        "--liveness",
        metavar="URL",
        default=None,
        help="kopf's health endpoint instead, at this URL, e.g. http://0.0.0.0:8080/healthz",
    )
    run_p.add_argument(
        "--metrics-port",
        type=int,
        default=8081,
        metavar="PORT",
        help="serve Prometheus metrics at http://0.0.0.0:PORT/metrics (8081; 0: off)",
    )
    run_p.add_argument("--log-level", default="INFO")
    run_p.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    run_p.set_defaults(func=run)
    authz.register(
        sub.add_parser(
            "authz-webhook", help="the API server's authorizer that keeps each agent to its own node"
        )
    )
    parser.set_defaults(_parser=parser)


def run(args: argparse.Namespace) -> int:
    log.configure(args.log_level, args.log_format)  # also folds kopf's per-object extras
    if logging.getLogger().level > logging.DEBUG:  # "Timer 'resync' succeeded." every few seconds
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    namespaces = None if args.all_namespaces or not args.namespace else list(args.namespace)
    priority = args.priority if args.priority is not None else int(time.time() * 1000)
    resync = args.resync if args.resync is not None else max(1.0, min(10.0, args.lease_grace / 4))
    opts = handlers.Options(
        namespaces=namespaces,
        kubeconfig=args.kubeconfig,
        peering=None if args.standalone else args.peering,
        priority=priority,
        peering_lifetime=args.peering_lifetime,
        resync_seconds=resync,
        health_port=0 if args.liveness else args.health_port,
    )
    api = kube_setup.api_client(args.kubeconfig, manager=kube_setup.CONTROLLER)
    metrics = ControllerMetrics()
    ctl = Controller(Adapter(Kube(api)), Config(lease_grace=args.lease_grace), metrics=metrics)
    metrics.watch_fleet(lambda: (ctl.deployments, ctl.replicas))
    registry = kopf.OperatorRegistry()
    handlers.register(registry, ctl, opts)
    identity = os.environ.get("POD_ID") or f"{socket.gethostname()}/{os.getpid()}/{priority}"
    settings = handlers.settings(opts, identity)
    kopf_namespaces = [] if namespaces is None else sorted({*namespaces, kube_setup.SYSTEM_NAMESPACE})
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            with_metrics(
                metrics,
                args.metrics_port,
                lambda: agent_targets(ctl.macnodes, sliceable=False),
                kopf.operator(
                    registry=registry,
                    settings=settings,
                    clusterwide=namespaces is None,
                    namespaces=kopf_namespaces,
                    standalone=opts.peering is None,
                    peering_name=opts.peering,
                    priority=priority if opts.peering else None,
                    liveness_endpoint=args.liveness,
                    identity=identity,  # type: ignore[arg-type]  # kopf's Identity is a NewType of str
                ),
            )
        )
    return 0


async def with_metrics(
    metrics: ControllerMetrics,
    port: int,
    agents: Callable[[], list[tuple[str, str, int]]],
    operator: Coroutine[Any, Any, None],
) -> None:
    """Run the operator with ``/metrics`` (and the agents' ``/sd/agents``) served on the same loop;
    a taken port is reported."""
    runner = None
    if port:
        try:
            runner = await serve_metrics(metrics.registry, port, agents=agents)
        except OSError as exc:
            LOG.warning("metrics port in use: metrics not served", port=port, error=str(exc))
    try:
        await operator
    finally:
        if runner is not None:
            await runner.cleanup()
