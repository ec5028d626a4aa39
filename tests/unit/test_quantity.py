"""The one byte-count parser: Kubernetes quantities and typed sizes in, bytes out; the rest refused."""

from __future__ import annotations

import argparse

import pytest

from orchardist.api.quantity import QuantityError, parse_bytes

KiB, MiB, GiB, TiB, PiB, EiB = (1 << (10 * n) for n in range(1, 7))


@pytest.mark.parametrize(
    ("text", "want"),
    [
        # plain integers
        ("0", 0),
        ("1048576", MiB),
        ("51539607552", 48 * GiB),
        (" 42 ", 42),
        ("+7", 7),
        ("-0", 0),
        # Kubernetes binary suffixes
        ("64Gi", 64 * GiB),
        ("1Ki", KiB),
        ("2Mi", 2 * MiB),
        ("1.5Gi", 3 * GiB // 2),
        ("3Ti", 3 * TiB),
        ("1Pi", PiB),
        ("1Ei", EiB),
        # Kubernetes decimal suffixes (k lower-case as Kubernetes writes it; K as people do)
        ("500M", 500 * 10**6),
        ("1k", 1000),
        ("1K", 1000),
        ("64G", 64 * 10**9),
        ("2T", 2 * 10**12),
        ("2P", 2 * 10**15),
        ("1E", 10**18),
        # decimal exponents
        ("1e9", 10**9),
        ("1E9", 10**9),
        ("2.5e3", 2500),
        ("5e+2", 500),
        ("12e-1", 2),  # 1.2 bytes rounds up
        # fractions: exact, a fraction of a byte rounds up as Kubernetes rounds a value
        ("39.7GB", 39_700_000_000),
        ("51.5GB", 51_500_000_000),
        (".5Ki", 512),
        ("1.", 1),
        ("1.5", 2),
        ("0.1Ki", 103),
        # sizes people type: B forms in any case, a space before the unit
        ("64GB", 64 * 10**9),
        ("64 GiB", 64 * GiB),
        ("64gib", 64 * GiB),
        ("1.5TiB", int(1.5 * TiB)),
        ("100 MB", 100 * 10**6),
        ("100mb", 100 * 10**6),
        ("1kB", 1000),
        ("512B", 512),
        ("512 b", 512),
        ("3 Gi", 3 * GiB),
    ],
)
def test_parses(text: str, want: int) -> None:
    assert parse_bytes(text) == want


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "not a byte count: ''"),
        ("   ", "not a byte count"),
        ("lots", "not a byte count: 'lots'"),
        ("Gi", "not a byte count: 'Gi'"),
        ("1_000", "not a byte count: '1_000'"),
        ("1,000", "not a byte count: '1,000'"),
        ("5 parsecs", "unknown unit 'parsecs'"),
        ("5X", "unknown unit 'X'"),
        ("1e", "unknown unit 'e'"),
        ("1gi", "unknown unit 'gi'"),
        ("1KiKi", "unknown unit 'KiKi'"),
        ("1e9Gi", "not a byte count: '1e9Gi'"),
        ("1.2.3", "not a byte count: '1.2.3'"),
        ("0x10", "not a byte count: '0x10'"),
        ("-3Gi", "cannot be negative: '-3Gi'"),
        ("-1", "cannot be negative: '-1'"),
        ("-1e3", "cannot be negative"),
        ("500m", "m is milli"),
        ("nan", "not a byte count"),
        ("inf", "not a byte count"),
    ],
)
def test_refuses_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(QuantityError) as caught:
        parse_bytes(text)
    assert why in str(caught.value)


def test_the_error_is_a_value_error_and_reads_well_in_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    """argparse prints an ArgumentTypeError's own message instead of 'invalid parse_bytes value'."""
    parser = argparse.ArgumentParser(prog="t")
    parser.add_argument("--size", type=parse_bytes)
    assert parser.parse_args(["--size", "2P"]).size == 2 * 10**15
    with pytest.raises(SystemExit):
        parser.parse_args(["--size=-3Gi"])
    assert "argument --size: a byte count cannot be negative: '-3Gi'" in capsys.readouterr().err
    assert issubclass(QuantityError, ValueError)
