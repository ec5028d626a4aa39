"""Pure memory planning shared by the controller and the agent: model profiles, memory plans, Mac profiles.

``profile``: a model's KV and weight facts from ``config.json`` or a GGUF header; ``memory``: the
vllm-metal KV rule and the chosen engine flags; ``macs``: the chip table and named Mac profiles;
``cli``: ``orchardist plan``. Imports nothing but the standard library (and, per the contract, ``api``).
"""

from orchardist.planning.memory import MemoryPlan, NodeCapacity, PlanRequest, plan
from orchardist.planning.profile import ModelProfile, ProfileError, from_config, from_gguf_metadata

__all__ = [
    "MemoryPlan",
    "ModelProfile",
    "NodeCapacity",
    "PlanRequest",
    "ProfileError",
    "from_config",
    "from_gguf_metadata",
    "plan",
]
