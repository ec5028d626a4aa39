"""Per-replica counters the proxy keeps (exported as metrics elsewhere; plain numbers here)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ProxyStats:
    """What one replica's proxy has seen since it opened.

    ``in_flight`` counts admitted requests not yet answered in full; ``waiting`` those of them the
    engine has not started answering (no status line yet: queued in the engine). Tokens are what
    the engine reported in ``usage``: a streamed answer counts only when the engine sent a final
    usage chunk (the client asked for ``stream_options.include_usage``); the proxy never changes a
    request to get one.
    """

    in_flight: int = 0
    waiting: int = 0
    completed: int = 0
    failed: int = 0  # the engine could not be reached or broke off mid-answer
    prompt_tokens: int = 0
    completion_tokens: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # by error code: invalid_api_key, ...

    def refuse(self, code: str) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1

    def add_usage(self, usage: tuple[int, int] | None) -> None:
        if usage is not None:
            self.prompt_tokens += usage[0]
            self.completion_tokens += usage[1]
