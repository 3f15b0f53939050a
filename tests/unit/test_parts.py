"""rapidpro.parts: a message over RapidPro's text limit as numbered parts that fit."""

from __future__ import annotations

import pytest

from cht_rapidpro.rapidpro.parts import MAX_PARTS, TooManyParts, split, text_limit

WORDS = " ".join(f"word{n:03d}" for n in range(300))  # 2,399 characters


@pytest.mark.parametrize(
    ("summary", "limit"),
    [
        ("text.eng: Ensure this field has no more than 640 characters.", 640),
        ("text: Ensure this field has no more than 4096 characters.", 4096),
        ("urns.0: Invalid URN: tel:***123. Ensure phone numbers contain country codes.", None),
        (
            "urns.0: Invalid URN: tel:***123.; text.eng: Ensure this field has no more than "
            "640 characters.",
            None,
        ),
        ("text.eng: Null characters are not allowed.", None),
    ],
    ids=["v9", "current", "urn", "urn-and-length", "nul"],
)
def test_text_limit(summary: str, limit: int | None) -> None:
    assert text_limit(summary) == limit


def test_a_text_that_fits_is_one_part() -> None:
    assert split("short text", 640) == ["short text"]


@pytest.mark.parametrize("limit", [640, 1000])
def test_parts_fit_are_numbered_and_keep_every_word(limit: int) -> None:
    parts = split(WORDS, limit)
    assert len(parts) > 1
    assert all(len(part) <= limit for part in parts)
    total = len(parts)
    bodies = []
    for number, part in enumerate(parts, 1):
        prefix = f"({number}/{total}) "
        assert part.startswith(prefix)
        bodies.append(part.removeprefix(prefix))
    assert " ".join(bodies) == WORDS  # cut between words, nothing lost or repeated
    assert all(not body.startswith(" ") and not body.endswith(" ") for body in bodies)


def test_at_signs_count_twice_when_escaped() -> None:
    text = "@" * 700
    parts = split(text, 640, escaped_length=2)
    assert all(len(p) + p.count("@") <= 640 for p in parts)
    assert "".join(p.split(") ", 1)[1] for p in parts) == text


def test_chts_longest_message_fits_in_the_parts_allowed() -> None:
    longest = "x" * 9 + " " + "Take one tablet in the morning. " * 47  # ~1,530: 10 GSM SMS
    assert len(split(longest, 640)) <= MAX_PARTS


def test_more_parts_than_allowed_are_refused() -> None:
    with pytest.raises(TooManyParts, match="more than 4 are not sent"):
        split(WORDS * 2, 640)


def test_the_split_is_the_same_every_time() -> None:
    assert split(WORDS, 640) == split(WORDS, 640)
