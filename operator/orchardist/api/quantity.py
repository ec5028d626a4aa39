"""Byte counts as people and Kubernetes write them: the one parser for every command and setting.

Accepted: Kubernetes quantities (``64Gi``, ``500M``, ``1e9``, ``1.5Gi``, ``2P``; binary suffixes
``Ki``..``Ei``, decimal ``k``/``K``, ``M``, ``G``, ``T``, ``P``, ``E``) and the sizes people type
(``64GB``, ``64 GiB``, ``1048576``; the ``B`` forms in any case). A fraction of a byte rounds up, as
Kubernetes rounds a quantity's value. Refused with the reason: negatives, ``m`` (milli: ``500m`` is
half a byte, almost always a typo for ``500M``), digit separators and anything else.

The error is a ``ValueError`` and also an ``argparse.ArgumentTypeError``, so ``type=parse_bytes``
shows the message itself instead of argparse's generic "invalid value".
"""

from __future__ import annotations

import argparse
import math
import re
from fractions import Fraction
from typing import Final

_NUMBER: Final = re.compile(
    r"""\s*
    (?P<sign>[+-]?)
    (?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)
    (?:(?P<exponent>[eE][+-]?[0-9]+)|\s*(?P<unit>[A-Za-z]+))?
    \s*""",
    re.VERBOSE,
)

_PREFIXES: Final = ("k", "m", "g", "t", "p", "e")

#: Suffixes exactly as Kubernetes spells them (case matters: ``m`` is milli, ``M`` mega), plus ``K``.
_EXACT: Final[dict[str, int]] = {
    "": 1,
    "k": 1000,
    "K": 1000,
    **{p.upper(): 1000 ** (i + 1) for i, p in enumerate(_PREFIXES) if p != "k"},
    **{f"{p.upper()}i": 1 << (10 * (i + 1)) for i, p in enumerate(_PREFIXES)},
}

#: Sizes ending in B (``GB``, ``GiB``, ``B``), matched in any case: nobody means millibytes by ``mb``.
_BYTE_FORMS: Final[dict[str, int]] = {
    "b": 1,
    **{f"{p}b": 1000 ** (i + 1) for i, p in enumerate(_PREFIXES)},
    **{f"{p}ib": 1 << (10 * (i + 1)) for i, p in enumerate(_PREFIXES)},
}

_EXAMPLES: Final = "e.g. 64Gi, 500M, 1e9, 1.5Gi, 64GB, 64 GiB, 1048576"


class QuantityError(ValueError, argparse.ArgumentTypeError):
    """Text that is not a byte count; the message says why and shows the accepted forms."""


def parse_bytes(text: str) -> int:
    """``"64Gi"`` -> 68719476736: a byte count from a Kubernetes quantity or a typed size."""
    match = _NUMBER.fullmatch(text)
    if match is None:
        raise QuantityError(f"not a byte count: {text!r} ({_EXAMPLES})")
    value = Fraction(match["number"])
    if match["exponent"] is not None:
        value *= Fraction(10) ** int(match["exponent"][1:])
    else:
        value *= _multiplier(text, match["unit"] or "")
    if match["sign"] == "-" and value != 0:
        raise QuantityError(f"a byte count cannot be negative: {text!r}")
    return math.ceil(value)


def _multiplier(text: str, unit: str) -> int:
    if unit in _EXACT:
        return _EXACT[unit]
    if unit.lower() in _BYTE_FORMS:
        return _BYTE_FORMS[unit.lower()]
    if unit == "m":
        raise QuantityError(f"{text!r} is thousandths of a byte (m is milli); did you mean M or Mi?")
    raise QuantityError(f"not a byte count: {text!r}: unknown unit {unit!r} ({_EXAMPLES})")
