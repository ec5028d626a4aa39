"""Pure memory planning shared by the controller and the agent: model profiles, memory plans, Mac profiles.

``profile``: a model's KV and weight facts from ``config.json`` or a GGUF header; ``memory``: the
vllm-metal KV rule and the chosen engine flags; ``macs``: the chip table and named Mac profiles;
``capacity``: a Mac as the planner sees it, from a profile or a MacNode. No I/O here (the ``plan``
command's reading and printing is ``orchardist.plancmd``); imports nothing of ours but ``api``
(checked by ``.importlinter``).
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
