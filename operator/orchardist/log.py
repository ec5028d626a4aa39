"""Structured logging for every Orchardist process.

structlog renders; the standard library's ``logging`` (kopf, aiohttp, the kubernetes client) is
routed through the same processors, so one process writes one format: JSON lines for machines
(``--log-format json``, the default when stderr is not a terminal) or aligned console lines.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

LogFormat = Literal["auto", "json", "console"]

_SHARED: list[structlog.types.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.StackInfoRenderer(),
]


def _kopf_extras(
    _logger: object, _method: str, event: structlog.types.EventDict
) -> structlog.types.EventDict:
    """kopf attaches its whole settings object and an object reference to every record: keep the
    reference as one readable field and drop the rest, so a line stays a line."""
    event.pop("settings", None)
    event.pop("k8s_skip", None)
    ref = event.pop("k8s_ref", None)
    if isinstance(ref, dict):
        where = "/".join(str(ref[k]) for k in ("namespace", "name") if ref.get(k))
        event.setdefault("object", f"{ref.get('kind', '?')} {where}")
    return event


def configure(level: str = "INFO", fmt: LogFormat = "auto") -> None:
    """Configure structlog and route stdlib logging (kopf included) through it. Idempotent."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            *_SHARED,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*_SHARED, structlog.stdlib.ExtraAdder(), _kopf_extras],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiohttp.access", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def get(name: str) -> structlog.stdlib.BoundLogger:
    """A named structured logger."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger
