"""On-disk records of running engines, so a restarted agent can adopt them instead of restarting them.

One JSON file per replica key, written atomically, 0600 in a 0700 directory: it holds the launch's
environment, which carries the deployment's API key (never the command line, which `ps` shows).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from orchardist import log
from orchardist_agent.engines.base import Launch, Measured, Probe

_log = log.get(__name__)


@dataclass
class Record:
    key: str
    pid: int
    start_time: str
    cmdline_sha256: str
    fingerprint: str
    argv: list[str]
    env: dict[str, str]
    host: str
    port: int
    health_path: str
    probe_path: str
    probe_body: dict[str, Any]
    api_key: str | None
    log_path: str
    started_at: str
    restarts: int = 0
    measured: dict[str, Any] = field(default_factory=dict)


def of(
    key: str,
    launch: Launch,
    *,
    pid: int,
    start_time: str,
    cmdline_sha256: str,
    log_path: Path,
    started_at: str,
    restarts: int,
    measured: Measured | None,
) -> Record:
    """The record of a running launch (what `launch_of` and `measured_of` read back)."""
    return Record(
        key=key,
        pid=pid,
        start_time=start_time,
        cmdline_sha256=cmdline_sha256,
        fingerprint=launch.fingerprint(),
        argv=list(launch.argv),
        env=dict(launch.env),
        host=launch.host,
        port=launch.port,
        health_path=launch.health_path,
        probe_path=launch.probe.path,
        probe_body=dict(launch.probe.body),
        api_key=launch.api_key,
        log_path=str(log_path),
        started_at=started_at,
        restarts=restarts,
        measured=(
            {"overhead_bytes": measured.overhead_bytes, "num_blocks": measured.num_blocks}
            | {"details": dict(measured.details)}
            if measured
            else {}
        ),
    )


def launch_of(rec: Record) -> Launch:
    """The launch a record describes (without the log parser, which a record cannot carry)."""
    return Launch(
        argv=tuple(rec.argv),
        env=rec.env,
        host=rec.host,
        port=rec.port,
        probe=Probe(path=rec.probe_path, body=rec.probe_body),
        health_path=rec.health_path,
        api_key=rec.api_key,
    )


def measured_of(rec: Record) -> Measured | None:
    return Measured(**rec.measured) if rec.measured else None


def path_for(state_dir: Path, key: str) -> Path:
    return state_dir / (quote(key, safe="") + ".json")


def write(state_dir: Path, rec: Record) -> None:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    dest = path_for(state_dir, rec.key)
    tmp = dest.with_suffix(".json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(asdict(rec), f, indent=1)
    tmp.replace(dest)


def remove(state_dir: Path, key: str) -> None:
    path_for(state_dir, key).unlink(missing_ok=True)


def load_all(state_dir: Path) -> list[Record]:
    """Every readable record; unreadable files are dropped (they cannot be matched to a process)."""
    out: list[Record] = []
    if not state_dir.is_dir():
        return out
    for path in sorted(state_dir.glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            rec = Record(**doc)
        except (OSError, ValueError, TypeError) as e:
            _log.warning("dropping unreadable engine record", path=str(path), error=str(e))
            path.unlink(missing_ok=True)
            continue
        if rec.key != unquote(path.stem):
            _log.warning("dropping engine record under the wrong name", path=str(path))
            path.unlink(missing_ok=True)
            continue
        out.append(rec)
    return out
