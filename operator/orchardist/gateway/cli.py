"""``orchardist gateway``: the OpenAI-compatible front door, configured from the command line."""

from __future__ import annotations

import argparse
import os
import socket

from orchardist import log


def _positive(text: str) -> int:
    n = int(text)
    if not 1 <= n <= 1024:
        raise argparse.ArgumentTypeError("must be 1 to 1024")
    return n


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)"
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (0.0.0.0)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (8080)")
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument(
        "--key-namespace",
        default=os.environ.get("POD_NAMESPACE", "orchardist-system"),
        metavar="NS",
        help="namespace of the key Secrets (label orchardist.io/gateway-key=true); default: this pod's, "
        "else orchardist-system",
    )
    keys.add_argument("--keys-in-all-namespaces", action="store_true", help="watch key Secrets everywhere")
    parser.add_argument(
        "--instance",
        default=os.environ.get("POD_NAME") or socket.gethostname(),
        help="this gateway's name in the demand Leases (default: the pod's or host's name)",
    )
    parser.add_argument(
        "--instances",
        type=_positive,
        default=1,
        help="gateway instances behind one Service (the chart's gateway.replicas): each enforces "
        "ceil(limit / N) of a key's rate limits, assuming the Service spreads requests evenly",
    )
    parser.add_argument(
        "--max-held", type=int, default=1024, help="requests held per model while none is ready"
    )
    parser.add_argument(
        "--prefix-chars", type=int, default=256, help="characters of a prompt's start that pick its replica"
    )
    parser.add_argument(
        "--no-prefix-routing",
        action="store_true",
        help="route by least outstanding requests only (a baseline)",
    )
    parser.add_argument("--log-level", default="INFO")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from orchardist.gateway import server
    from orchardist.gateway.routes import Settings

    log.configure(args.log_level)
    options = server.Options(
        host=args.host,
        port=args.port,
        kubeconfig=args.kubeconfig,
        key_namespace=None if args.keys_in_all_namespaces else args.key_namespace,
        instance=args.instance,
        settings=Settings(
            max_held=args.max_held,
            prefix_chars=args.prefix_chars,
            prefix_routing=not args.no_prefix_routing,
            instances=args.instances,
        ),
    )
    return server.run(options)
