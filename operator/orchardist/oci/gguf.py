"""A GGUF header reader: the metadata key/values, from the first bytes of the file only.

Layout (little-endian): ``GGUF`` magic, uint32 version, tensor count and KV count (uint64 from
v2, uint32 in v1), then KV pairs: string key (uint64 length + UTF-8), uint32 type, value. Arrays
carry an element type and count. Long arrays (the tokenizer's vocabulary and merges) are skipped,
not kept: the planner needs only scalars and short per-layer arrays.
"""

from __future__ import annotations

import struct
from typing import Any, Final

MAGIC: Final = b"GGUF"
#: arrays longer than this are skipped (the vocabulary), shorter ones are kept (per-layer values)
MAX_KEPT_ARRAY: Final = 4096
#: arrays of arrays deeper than this are refused: real files nest at most once, and a crafted
#: header must fail as a GGUFError, not as a RecursionError past every handler
MAX_DEPTH: Final = 4

_SCALARS: Final[dict[int, str]] = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    pass


class NeedMoreError(GGUFError):
    """The header runs past the bytes given: read more of the file and try again."""


class _Reader:
    def __init__(self, data: bytes, wide: bool) -> None:
        self.data = data
        self.pos = 0
        self.wide = wide

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise NeedMoreError(f"GGUF header needs more than {len(self.data)} bytes")
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size))[0]

    def length(self) -> int:
        n: int = self.unpack("Q" if self.wide else "I")
        return n

    def string(self) -> str:
        return self.take(self.length()).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.length()
        self.pos += n
        if self.pos > len(self.data):
            raise NeedMoreError("GGUF header needs more bytes")

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth >= MAX_DEPTH:
                raise GGUFError(f"GGUF metadata nests arrays deeper than {MAX_DEPTH} levels; refused")
            etype: int = self.unpack("I")
            count = self.length()
            keep = count <= MAX_KEPT_ARRAY
            if etype in _SCALARS:
                size = struct.calcsize("<" + _SCALARS[etype])
                raw = self.take(size * count)
                return list(struct.unpack(f"<{count}{_SCALARS[etype]}", raw)) if keep else None
            items = []
            for _ in range(count):
                if etype == _STRING and not keep:
                    self.skip_string()
                else:
                    items.append(self.value(etype, depth + 1))
            return items if keep else None
        raise GGUFError(f"unknown GGUF value type {vtype}")


def parse_header(data: bytes) -> dict[str, Any]:
    """The metadata of a GGUF file from its first bytes; :class:`NeedMoreError` when cut short."""
    if len(data) < 8:
        raise NeedMoreError("GGUF header needs more bytes")
    if data[:4] != MAGIC:
        raise GGUFError("not a GGUF file (bad magic)")
    version = struct.unpack("<I", data[4:8])[0]
    if version not in (1, 2, 3):
        raise GGUFError(f"unsupported GGUF version {version}")
    r = _Reader(data, wide=version >= 2)
    r.pos = 8
    tensors = r.length()
    kv_count = r.length()
    meta: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": tensors}
    for _ in range(kv_count):
        key = r.string()
        vtype: int = r.unpack("I")
        value = r.value(vtype)
        if value is not None:
            meta[key] = value
    return meta
