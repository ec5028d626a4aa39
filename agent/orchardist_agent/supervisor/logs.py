"""Per-replica engine log files: the engine writes straight to the file (so it survives the agent),
rotated at each start and copy-truncated when it grows too big while running."""

from __future__ import annotations

import shutil
from collections import deque
from pathlib import Path


def rotate(path: Path, backups: int) -> None:
    """engine.log -> engine.log.1 -> ... -> engine.log.<backups> (the oldest is dropped)."""
    if not path.exists():
        return
    for i in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{i + 1}"))
    if backups > 0:
        path.replace(path.with_name(f"{path.name}.1"))
    else:
        path.unlink()


def copy_truncate(path: Path, backups: int) -> None:
    """Rotate a file another process holds open in append mode: copy it away, then truncate it."""
    if backups > 0:
        for i in range(backups - 1, 0, -1):
            older = path.with_name(f"{path.name}.{i}")
            if older.exists():
                older.replace(path.with_name(f"{path.name}.{i + 1}"))
        shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    with path.open("r+b") as f:
        f.truncate(0)


def tail(path: Path, lines: int, *, max_bytes: int = 256 * 1024) -> list[str]:
    """The last `lines` lines of the file (reading at most `max_bytes` from its end)."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    return list(deque(data.decode(errors="replace").splitlines(), maxlen=lines))


class Follower:
    """Reads lines appended since the last call (restarting from 0 after a truncation)."""

    def __init__(self, path: Path, *, from_end: bool = False) -> None:
        self.path = path
        self._offset = path.stat().st_size if from_end and path.exists() else 0
        self._partial = b""

    def reset(self) -> None:
        """Read from the start again (after the supervisor truncated the file itself)."""
        self._offset, self._partial = 0, b""

    def read(self, max_bytes: int = 1 << 20) -> list[str]:
        try:
            with self.path.open("rb") as f:
                f.seek(0, 2)
                size = f.tell()
                if size < self._offset:
                    self._offset, self._partial = 0, b""
                f.seek(self._offset)
                data = f.read(max_bytes)
        except OSError:
            return []
        self._offset += len(data)
        chunks = (self._partial + data).split(b"\n")
        self._partial = chunks.pop()
        return [c.decode(errors="replace").rstrip("\r") for c in chunks]
