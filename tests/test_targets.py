"""Parameter targets written as text: counts with K/M/B suffixes and ratios of the original."""

from __future__ import annotations

import pytest

from adaptprune.allocation import parse_target


@pytest.mark.parametrize(
    "text, expected",
    [
        ("90M", 90_000_000),
        ("1.2B", 1_200_000_000),
        ("134515008", 134_515_008),
        ("500k", 500_000),
        (" 90 m ", 90_000_000),
        ("134_515_007", 134_515_007),
        ("0.7x", 1_400_000_000),
        (".5X", 1_000_000_000),
    ],
)
def test_parse_target(text, expected):
    assert parse_target(text, 2_000_000_000) == expected


def test_parse_target_ratio_rounds_to_a_count():
    assert parse_target("0.7x", 134_515_008) == round(0.7 * 134_515_008)


@pytest.mark.parametrize(
    "text, message",
    [
        ("ninety", "is not a count"),
        ("90MB", "is not a count"),
        ("-0.5x", "is not a count"),
        ("", "is not a count"),
        ("0x", "strictly between 0 and 1"),
        ("1x", "strictly between 0 and 1"),
        ("1.5x", "strictly between 0 and 1"),
        ("12.5", "whole number"),
        ("0", "must lie between 1"),
        ("200M", "must lie between 1"),
        ("134515008", "must lie between 1"),
    ],
)
def test_parse_target_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_target(text, 134_515_008)
