"""``orchardist dev``: a local control plane (``dev cluster up|down|env``) and the whole demo
(``dev up|down``, implemented in :mod:`orchardist.dev.demo`)."""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from pathlib import Path

from orchardist import log
from orchardist.dev import cluster as cluster_mod

DEFAULT_STATE = Path(".state") / "dev"


def default_state_dir() -> Path:
    """``.state/dev`` in the checkout when run from one, else in the cwd."""
    root = cluster_mod.repo_root()
    return (
        root if root is not None and Path.cwd().resolve().is_relative_to(root) else Path.cwd()
    ) / DEFAULT_STATE


def register(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(_parser=parser)
    sub = parser.add_subparsers(dest="dev_command", metavar="COMMAND")

    grp = sub.add_parser("cluster", help="a real control plane (etcd, kube-apiserver, controller-manager)")
    grp.set_defaults(_parser=grp)
    csub = grp.add_subparsers(dest="cluster_command", metavar="COMMAND")
    up = csub.add_parser("up", help="start it on loopback and write an admin kubeconfig")
    _state_arg(up)
    up.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for /readyz")
    up.set_defaults(func=run_cluster_up)
    down = csub.add_parser("down", help="stop its processes and remove its state")
    _state_arg(down)
    down.set_defaults(func=run_cluster_down)
    env = csub.add_parser("env", help="print `export KUBECONFIG=...` for eval")
    _state_arg(env)
    env.set_defaults(func=run_cluster_env)

    demo_up = sub.add_parser("up", help="control plane, registry, operator and a simulated Mac agent")
    _state_arg(demo_up)
    demo_up.add_argument("--demo", action="store_true", help="also push a tiny model and deploy it")
    demo_up.add_argument(
        "--simulate", metavar="PROFILE", default="m4-pro-64gb", help="Mac profile the local agent simulates"
    )
    demo_up.add_argument(
        "--in-cluster",
        action="store_true",
        help="run the operator as a Pod from the Helm chart on a real node (kubelet, containerd, "
        "kube-proxy) with the locally built image; needs root",
    )
    demo_up.set_defaults(func=_lazy("run_up"))
    demo_down = sub.add_parser("down", help="stop everything `dev up` started and remove its state")
    _state_arg(demo_down)
    demo_down.set_defaults(func=_lazy("run_down"))


def _state_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where pids, logs and kubeconfig live (default .state/dev)",
    )


def _state(args: argparse.Namespace) -> Path:
    state: Path | None = args.state_dir
    return (state if state is not None else default_state_dir()).resolve()


def _lazy(name: str) -> object:
    def run(args: argparse.Namespace) -> int:
        if args.state_dir is None:
            args.state_dir = default_state_dir()
        demo = importlib.import_module("orchardist.dev.demo")
        code: int = getattr(demo, name)(args)
        return code

    return run


def run_cluster_up(args: argparse.Namespace) -> int:
    log.configure("WARNING")  # the command prints what matters; details go to the logs dir
    where = _state(args)
    existing = cluster_mod.Cluster.load(where)
    if existing is not None and existing.healthy():
        print(f"already running at {existing.server}", file=sys.stderr)
        _usage(existing)
        return 0
    if existing is not None:
        existing.stop()
    try:
        cl = cluster_mod.Cluster.start(where, timeout=args.timeout)
    except (cluster_mod.KubebinsMissingError, OSError, RuntimeError) as exc:
        print(f"orchardist dev cluster up: {exc}", file=sys.stderr)
        return 1
    print(f"control plane ready at {cl.server} in {cl.ready_seconds:.1f} s (logs: {where / 'logs'})")
    _usage(cl)
    return 0


def _usage(cl: cluster_mod.Cluster) -> None:
    kc = shlex.quote(str(cl.kubeconfig))
    flag = (
        ""
        if cl.state_dir == default_state_dir().resolve()
        else f" --state-dir {shlex.quote(str(cl.state_dir))}"
    )
    print(
        "\nUse it:\n"
        f"  export KUBECONFIG={kc}\n"
        f"  export PATH={shlex.quote(str(cl.bin_dir))}:$PATH   # kubectl, helm built for it\n"
        "  kubectl apply -f crds/ && kubectl get crd\n"
        "Stop it:\n"
        f"  orchardist dev cluster down{flag}"
    )


def run_cluster_down(args: argparse.Namespace) -> int:
    where = _state(args)
    stopped = cluster_mod.down(where)
    print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}; removed {where}")
    return 0


def run_cluster_env(args: argparse.Namespace) -> int:
    where = _state(args)
    cl = cluster_mod.Cluster.load(where)
    if cl is None:
        print(f"no dev cluster recorded in {where}; run `orchardist dev cluster up`", file=sys.stderr)
        return 1
    print(f"export KUBECONFIG={shlex.quote(str(cl.kubeconfig))}")
    print(f"export PATH={shlex.quote(str(cl.bin_dir))}:$PATH")
    return 0
