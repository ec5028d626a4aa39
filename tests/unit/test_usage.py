"""The one reader of OpenAI-shaped usage, shared by the agent's proxy and the gateway."""

from __future__ import annotations

import pytest

from orchardist.usage import Usage, may_carry_usage, usage_of


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}, Usage(3, 4)),
        ({"usage": {"prompt_tokens": 3}}, Usage(3, 0)),  # a missing count is 0
        ({"usage": {"prompt_tokens": None, "completion_tokens": 2}}, Usage(0, 2)),
        ({"usage": {"prompt_tokens": "4", "completion_tokens": 2}}, None),  # not numbers: not metered
        ({"usage": {"prompt_tokens": True, "completion_tokens": 2}}, None),
        ({"usage": None}, None),
        ({"choices": []}, None),
        ([1], None),
    ],
)
def test_usage_of(body: object, expected: Usage | None) -> None:
    assert usage_of(body) == expected


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"choices": [], "usage": {"prompt_tokens": 1}}', True),
        (b'{"choices": [{}], "usage": null}', False),
        (b'{"choices": [{}],"usage":null}', False),
        (b'{"choices": [{}]}', False),
    ],
)
def test_may_carry_usage(payload: bytes, expected: bool) -> None:
    assert may_carry_usage(payload) is expected
