"""``orchardist plan``: register the options, gather the inputs, plan, print.

    orchardist plan --model-config PATH --weights-bytes N --working-set BYTES [--json] ...
    orchardist plan --model-config PATH --weights-bytes N --chip m4-pro-64gb
    orchardist plan --model-config PATH --weights-bytes N --node mac-1   # a MacNode in the cluster
    orchardist plan --model-dir DIR                     # a table over the standard Mac profiles

The same ``planning.memory.plan`` the controller places with; exit code 0 when it fits (or for the
table), 1 when the one planned Mac cannot serve the model, 2 for unusable input.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from orchardist.plancmd import InputError, render, sources
from orchardist.plancmd.args import add_arguments
from orchardist.planning import capacity, macs
from orchardist.planning.memory import NodeCapacity, PlanRequest, plan


def register(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser)
    parser.set_defaults(func=run)


def request_from(args: argparse.Namespace) -> PlanRequest:
    return PlanRequest(
        context_length=args.context,
        max_num_seqs=args.max_num_seqs,
        gpu_memory_utilization=args.gpu_memory_utilization,
        block_size=args.block_size,
        overhead_bytes=args.overhead,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )


def node_from(args: argparse.Namespace) -> NodeCapacity | None:
    """The one Mac asked for (--node, --chip or --working-set); None for the table over all profiles."""
    if args.node:
        from orchardist.plancmd.cluster import read_node  # only this option needs a cluster

        node, replicas = read_node(args.node, args.kubeconfig)
        try:
            return capacity.from_macnode(node, replicas, args.reserved)
        except capacity.CapacityError as exc:
            raise InputError(str(exc)) from None
    if args.chip is not None:
        return capacity.from_profile(macs.get(args.chip), args.reserved)
    if args.working_set is not None:
        bandwidth = int(args.bandwidth * 1e9) if args.bandwidth else None
        return NodeCapacity(args.working_set, bandwidth, reserved_bytes=args.reserved)
    return None


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        model = sources.load_profile(
            model=args.model,
            model_config=args.model_config,
            model_dir=args.model_dir,
            weights_bytes=args.weights_bytes,
            insecure=args.insecure_registry,
        )
        node = node_from(args)
    except InputError as exc:
        print(f"orchardist plan: {exc}", file=sys.stderr)
        return 2
    request = request_from(args)
    if node is not None:
        result = plan(model, node, request)
        if args.json:
            render.print_json(result.to_json(), out)
        else:
            render.print_plan(model, node, result, out)
        return 0 if result.fits else 1
    rows = [
        (mac, plan(model, capacity.from_profile(mac, args.reserved), request))
        for mac in macs.PROFILES.values()
    ]
    if args.json:
        render.print_json([{"profile": mac.name, **result.to_json()} for mac, result in rows], out)
    else:
        render.print_table(model, rows, out)
    return 0
