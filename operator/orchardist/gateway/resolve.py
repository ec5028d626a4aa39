"""Which ModelDeployment a request's ``model`` names, for a given key: pure.

``model`` is ``namespace/name``, a bare ``name``, or an alias a deployment declares
(``spec.aliases``), bare or as ``namespace/alias``. A bare word is looked up among the deployments
the key may use; when several match, the key's own namespace (if it has exactly one) wins and a
real name beats an alias. The answer tells apart "no such model" (404) from "not yours" (403).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from orchardist.gateway.catalog import Key, Served
from orchardist.gateway.keys import ApiKey


@dataclass(frozen=True)
class Resolution:
    """The deployment, or the HTTP status and message to answer instead."""

    served: Served | None = None
    status: int = 200
    message: str = ""


def _named(served: Served, word: str) -> int:
    """0: by name, 1: by alias, 2: not at all (sort order of a match)."""
    if served.name == word:
        return 0
    return 1 if word in served.aliases else 2


def resolve(model: object, key: ApiKey, deployments: Mapping[Key, Served]) -> Resolution:
    if not isinstance(model, str) or not model.strip():
        return Resolution(status=400, message="the request must name a model")
    namespace, _, word = model.strip().rpartition("/")
    matches = sorted(
        (
            s
            for s in deployments.values()
            if _named(s, word) < 2 and (not namespace or s.namespace == namespace)
        ),
        key=lambda s: (_named(s, word), s.namespace),
    )
    if not matches:
        return Resolution(status=404, message=f"The model {model!r} does not exist")
    allowed = [s for s in matches if key.allows(s.namespace, s.name)]
    if not allowed:
        return Resolution(status=403, message=f"This key may not use the model {model!r}")
    if len(allowed) == 1:
        return Resolution(allowed[0])
    home = [s for s in allowed if s.namespace == key.home]
    if home:
        return Resolution(home[0])
    best = [s for s in allowed if _named(s, word) == _named(allowed[0], word)]
    if len(best) == 1:
        return Resolution(best[0])
    spaces = ", ".join(sorted({s.namespace for s in best}))
    return Resolution(
        status=400,
        message=f"The model {model!r} exists in several namespaces ({spaces}); ask for namespace/name",
    )


def listed(key: ApiKey, deployments: Mapping[Key, Served]) -> list[str]:
    """The model ids ``/v1/models`` shows this key: bare names in its home namespace, else namespace/name."""
    ids = [
        s.name if s.namespace == key.home else f"{s.namespace}/{s.name}"
        for s in deployments.values()
        if key.allows(s.namespace, s.name)
    ]
    return sorted(ids)
