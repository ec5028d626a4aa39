"""Usage per key and model, from the engine's own ``usage``, and the gateway's Prometheus metrics.

Non-streamed answers carry ``usage`` in their JSON. A stream carries it in its last chunk when the
request asked for ``stream_options.include_usage``; the gateway always asks, and when the client
did not, it drops that one chunk (a client that did not ask does not expect a chunk without
choices). :class:`StreamMeter` reads the stream line by line as it passes through.
"""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from orchardist.usage import Usage, may_carry_usage, usage_of


class StreamMeter:
    """Reads an SSE stream as it passes: its usage, whether a token has come, which lines to drop."""

    def __init__(
        self, *, drop_usage_chunk: bool, model_from: bytes | None = None, model_to: bytes = b""
    ) -> None:
        self.drop_usage_chunk = drop_usage_chunk
        self.usage: Usage | None = None
        self.first_token = False
        self._rename = (model_from, model_to) if model_from is not None else None

    def line(self, line: bytes) -> bytes | None:
        """The line to pass on (None: drop it). ``line`` includes its newline."""
        if not line.startswith(b"data:"):
            return line
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return line
        if self.first_token and not may_carry_usage(payload):
            # The hot path of a stream: a token chunk after the first needs no parsing.
            return self._renamed(line)
        try:
            chunk = json.loads(payload)
        except ValueError:
            return line
        if isinstance(chunk, dict):
            usage = usage_of(chunk)
            choices = chunk.get("choices")
            if usage is not None:
                self.usage = usage
                if self.drop_usage_chunk and not choices:
                    return None
            if choices:
                self.first_token = True
        return self._renamed(line)

    def passthrough(self, data: bytes) -> bytes | None:
        """``data`` (whole lines) as it goes on, when no line of it needs reading; else None.

        After the first token, a run of token chunks without usage needs only the model renamed:
        one pass over what arrived instead of a split, a call per line and a join (a stream's
        every token comes this way, so this is the gateway's cost per token).
        """
        if not self.first_token:
            return None
        carried = data.count(b'"usage"')
        if carried and carried != data.count(b'"usage": null') + data.count(b'"usage":null'):
            return None
        if self._rename is not None and self._rename[0]:
            return data.replace(self._rename[0], self._rename[1])
        return data

    def _renamed(self, line: bytes) -> bytes:
        if self._rename is not None and self._rename[0]:
            return line.replace(self._rename[0], self._rename[1], 1)
        return line


class Metrics:
    """The gateway's metrics, in their own registry (one per server; tests run several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "orchardist_gateway_requests",
            "Requests answered, by key (its Secret's name), model and HTTP status.",
            ["key", "model", "code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "orchardist_gateway_request_duration_seconds",
            "Time from the request's arrival to the end of its answer.",
            ["model"],
            registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.ttft = Histogram(
            "orchardist_gateway_time_to_first_token_seconds",
            "Time from a streamed request's arrival to its first token.",
            ["model"],
            registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.tokens = Counter(
            "orchardist_gateway_tokens",
            "Tokens the engines reported in their usage, by key, model and kind (prompt or completion).",
            ["key", "model", "kind"],
            registry=self.registry,
        )
        self.held = Gauge(
            "orchardist_gateway_hold_queue_length",
            "Requests waiting for a ready replica of the model.",
            ["model"],
            registry=self.registry,
        )

    def meter(self, key: str, model: str, usage: Usage | None) -> None:
        if usage is None:
            return
        self.tokens.labels(key, model, "prompt").inc(usage.prompt_tokens)
        self.tokens.labels(key, model, "completion").inc(usage.completion_tokens)
