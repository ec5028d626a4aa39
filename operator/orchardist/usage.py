"""Token usage in OpenAI-shaped answers, read the same way by the agent's proxy and the gateway.

Engines put ``usage`` in a JSON answer, or (when the client asked for it) in the last chunk of a
stream; vLLM and mlx-lm also send ``"usage": null`` on every token chunk, so a stream reader asks
:func:`may_carry_usage` before parsing a chunk at all.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage_of(body: object) -> Usage | None:
    """The ``usage`` of an answer or stream chunk; None when it has none or it is not numbers.

    A missing or null count is 0; a count that is not an integer discards the whole usage (an
    engine's garbage is not metered, and never raises in the middle of a stream).
    """
    if not isinstance(body, dict) or not isinstance(usage := body.get("usage"), dict):
        return None
    counts = [usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0]
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in counts):
        return None
    return Usage(counts[0], counts[1])


def may_carry_usage(payload: bytes) -> bool:
    """Whether a chunk may hold usage: it names ``usage`` and not as null (the per-token form)."""
    return b'"usage"' in payload and b'"usage": null' not in payload and b'"usage":null' not in payload
