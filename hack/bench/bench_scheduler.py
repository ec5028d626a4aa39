"""The pure scheduler: 10,000 replicas placed on 1,000 simulated Macs (goal: <= 1 s).

Macs cycle through the standard Mac profiles of ``orchardist.planning.macs`` (8 GB minis to 512 GB
Studios); 100 deployments of three small real model shapes (profiled from config.json the way the
controller does) ask for 100 replicas each, with a pinned context (2,048 tokens, 2 sequences) so
several share one Mac. Every replica gets a real memory plan from ``orchardist.planning`` through
the controller's ``fit``. The timed run lets the planner size each engine's share exactly; a second
run applies the ModelReplica API's 0.1 floor on gpuMemoryUtilization, which caps how many fit.
"""

from __future__ import annotations

import time

from orchardist.api.modeldeployment import ModelDeploymentSpec
from orchardist.controller.fitting import fit_for, plan_request
from orchardist.controller.scheduler import Fleet, Mac, Request
from orchardist.planning import macs as mac_profiles
from orchardist.planning.profile import from_config

GOAL_S = 1.0
MACS = 1000
DEPLOYMENTS = 100
REPLICAS = 100

MODELS = [
    # (name, layers, heads, kv heads, head_dim, hidden, weight bytes)
    ("qwen3-0.6b", 28, 16, 8, 128, 1024, 1_200_000_000),
    ("qwen3-1.7b-4bit", 28, 16, 8, 128, 2048, 1_000_000_000),
    ("qwen3-4b-4bit", 36, 32, 8, 128, 2560, 2_300_000_000),
]


def fleet() -> list[Mac]:
    profiles = list(mac_profiles.PROFILES.values())
    out = []
    for i in range(MACS):
        p = profiles[i % len(profiles)]
        out.append(
            Mac(
                name=f"mac-{i:04d}",
                working_set_bytes=p.gpu_working_set_bytes,
                chip=p.family,
                total_bytes=p.memory_bytes,
                bandwidth=p.memory_bandwidth_bytes_per_second,
                labels={"rack": f"r{i % 10}"},
                engines={"vllm-metal": "0.2.0"},
                cached=frozenset({f"sha256:{i % len(MODELS):064x}"}) if i % 3 == 0 else frozenset(),
            )
        )
    return out


def requests() -> list[Request]:
    out = []
    for d in range(DEPLOYMENTS):
        name, layers, heads, kv, hd, hidden, weights = MODELS[d % len(MODELS)]
        config = {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "head_dim": hd,
            "hidden_size": hidden,
            "max_position_embeddings": 40960,
            "torch_dtype": "bfloat16",
        }
        profile = from_config(config, weight_bytes=weights)
        spec = ModelDeploymentSpec.model_validate(
            {
                "model": f"oci://r.example/{name}:v1",
                "replicas": REPLICAS,
                "contextLength": 2048,
                "maxConcurrentSequences": 4,
            }
        )
        out.append(
            Request(
                engine="vllm-metal",
                fit=fit_for(profile, plan_request(spec)),
                digest=f"sha256:{d % len(MODELS):064x}",
                weight_bytes=weights,
            )
        )
    return out


def place() -> tuple[int, int, float, float]:
    macs, reqs = fleet(), requests()
    t0 = time.perf_counter()
    f = Fleet(macs)
    placed = unplaced = 0
    for req in reqs:
        result = f.place(req, REPLICAS)
        placed += len(result.bindings)
        unplaced += result.unschedulable.missing if result.unschedulable else 0
    elapsed = time.perf_counter() - t0
    used = sum(f.reserved.values()) / sum(m.working_set_bytes for m in macs)
    return placed, unplaced, elapsed, used


def run() -> list[str]:
    placed, unplaced, elapsed, used = place()
    return [
        f"placed {placed:,} replicas ({unplaced:,} unschedulable) of {DEPLOYMENTS} deployments "
        f"on {MACS:,} Macs in {elapsed:.3f} s; goal {GOAL_S:.1f} s; ratio {elapsed / GOAL_S:.2f}",
        f"{elapsed / max(placed, 1) * 1e6:.1f} us per replica with its real memory plan; "
        f"{used:.0%} of the fleet's GPU working set booked",
    ]


if __name__ == "__main__":
    for line in run():
        print(line)
