"""The chip table and the named Mac profiles agree with Apple's published figures (notes §4.4)."""

from __future__ import annotations

import pytest

from orchardist.planning import macs

GiB = 2**30


@pytest.mark.parametrize(
    ("family", "gpu_cores", "gb_s"),
    [
        ("M1", 8, 68),
        ("M2 Pro", 19, 200),
        ("M3 Max", 30, 300),
        ("M3 Max", 40, 400),
        ("M3 Ultra", 80, 819),
        ("M4", 10, 120),
        ("M4 Pro", 20, 273),
        ("M4 Max", 32, 410),
        ("M4 Max", 40, 546),
        ("M2 Ultra", 76, 800),
    ],
)
def test_bandwidth_by_family_and_gpu_cores(family: str, gpu_cores: int, gb_s: int) -> None:
    assert macs.CHIPS[family].bandwidth_bytes_per_second(gpu_cores) == gb_s * 10**9


def test_unknown_core_count_takes_the_bin_at_or_below() -> None:
    assert macs.CHIPS["M4 Max"].bandwidth_bytes_per_second(36) == 410 * 10**9
    assert macs.CHIPS["M4 Max"].bandwidth_bytes_per_second(None) == 546 * 10**9


@pytest.mark.parametrize(
    ("brand", "family"),
    [
        ("Apple M4 Pro", "M4 Pro"),
        ("Apple M4 Max (Virtual)", "M4 Max"),
        ("Apple M1", "M1"),
        ("Intel Xeon", None),
    ],
)
def test_family_of_brand_string(brand: str, family: str | None) -> None:
    assert macs.family_of(brand) == family


def test_every_profile_is_a_real_configuration() -> None:
    """Family known, GPU cores among the family's options, memory within the family's maximum."""
    for profile in macs.PROFILES.values():
        chip = macs.CHIPS[profile.family]
        assert profile.gpu_cores in chip.gpu_core_options, profile.name
        assert profile.memory_bytes <= chip.max_memory_gb * GiB, profile.name
        assert 0.6 < profile.gpu_working_set_bytes / profile.memory_bytes < 0.9, profile.name
        assert profile.working_set_source.startswith(("observed: ", "estimate: ")), profile.name


def test_the_issue_names_are_all_there() -> None:
    for name in (
        "m1-8gb",
        "m1-16gb",
        "m2-16gb",
        "m2-pro-32gb",
        "m3-max-64gb",
        "m4-16gb",
        "m4-24gb",
        "m4-pro-48gb",
        "m4-pro-64gb",
        "m4-max-128gb",
        "m2-ultra-192gb",
        "m3-ultra-256gb",
        "m3-ultra-512gb",
    ):
        assert macs.get(name).name == name


def test_observed_working_sets() -> None:
    assert macs.get("m4-pro-64gb").gpu_working_set_bytes == 49_152 * 2**20  # 75%
    assert macs.get("m4-max-128gb").gpu_working_set_bytes == int(107.52 * GiB)  # 84%
    assert macs.get("m4-24gb").gpu_working_set_bytes == 19_069_665_280


@pytest.mark.parametrize(
    ("ram_gib", "fraction"),
    [
        (8, 2 / 3),
        (16, 2 / 3),
        (36, 2 / 3),
        (48, 2 / 3),
        (64, 0.75),
        (96, 0.75),
        (128, 0.84),
        (192, 0.84),
        (512, 0.87),
    ],
)
def test_estimate_steps(ram_gib: int, fraction: float) -> None:
    assert macs.estimate_working_set(ram_gib * GiB) == int(ram_gib * GiB * fraction)


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="m4-pro-64gb"):
        macs.get("m9-1tb")
