"""Names of the API (group, version, kinds); the engine launch lists are re-exported from `launch`.

``orchardist.api`` imports nothing of ours, so the engine drivers, the controller and the CRD
generator all read the same names and lists from here.
"""

from __future__ import annotations

from typing import Final

GROUP: Final = "orchardist.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
CATEGORIES: Final = ("orchardist",)

MODEL_DEPLOYMENT: Final = "ModelDeployment"
MAC_NODE: Final = "MacNode"
MODEL_REPLICA: Final = "ModelReplica"
KINDS: Final = (MODEL_DEPLOYMENT, MAC_NODE, MODEL_REPLICA)

PLURALS: Final = {MODEL_DEPLOYMENT: "modeldeployments", MAC_NODE: "macnodes", MODEL_REPLICA: "modelreplicas"}
SINGULARS: Final = {MODEL_DEPLOYMENT: "modeldeployment", MAC_NODE: "macnode", MODEL_REPLICA: "modelreplica"}
SHORT_NAMES: Final = {MODEL_DEPLOYMENT: "md", MAC_NODE: "mn", MODEL_REPLICA: "mr"}

#: Labels the controller puts on every ModelReplica.
LABEL_DEPLOYMENT: Final = f"{GROUP}/deployment"
LABEL_NODE: Final = f"{GROUP}/node"
LABEL_REVISION: Final = f"{GROUP}/revision"

ENGINES: Final = ("vllm-metal", "mlx-lm", "llama.cpp", "vllm")

# The launch policy's lists live in orchardist.api.launch; these names stay importable from here.
from orchardist.api.launch import (  # noqa: E402
    AGENT_OWNED_ENV,
    ENV_OWNERS,
    FLAG_OWNERS,
    OPERATOR_OWNED_FLAGS,
    flag_forms,
    owned_flag,
)

__all__ = [
    "AGENT_OWNED_ENV",
    "API_VERSION",
    "CATEGORIES",
    "ENGINES",
    "ENV_OWNERS",
    "FLAG_OWNERS",
    "GROUP",
    "KINDS",
    "LABEL_DEPLOYMENT",
    "LABEL_NODE",
    "LABEL_REVISION",
    "MAC_NODE",
    "MODEL_DEPLOYMENT",
    "MODEL_REPLICA",
    "OPERATOR_OWNED_FLAGS",
    "PLURALS",
    "SHORT_NAMES",
    "SINGULARS",
    "VERSION",
    "flag_forms",
    "owned_flag",
]
