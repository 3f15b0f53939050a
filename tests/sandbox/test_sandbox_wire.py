"""The sandbox's pure parts: URNs, templates, validation, timelines, cursors, throttling."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cht_rapidpro.sandbox import Sandbox, SandboxConfig, default_rates, throttle_scope
from cht_rapidpro.sandbox.state import ThrottledError, build_timeline, throttle_detail
from cht_rapidpro.sandbox.wire import (
    Cursor,
    CursorError,
    ValidationError,
    iso,
    normalize_urn,
    paginate,
    parse_query_datetime,
    render_template,
    validate_broadcast,
)

T0 = datetime(2026, 3, 2, 17, 28, 12, 123456, tzinfo=UTC)


@pytest.mark.parametrize(
    ("urn", "country", "expected"),
    [
        ("tel:+1-800-123-4567", None, "tel:+18001234567"),
        ("tel:(078) 812-3123", "RW", "tel:+250788123123"),
        ("tel:0712345678", "KE", "tel:+254712345678"),
        ("tel:250788123123", None, "tel:+250788123123"),
        ("tel: +254 712 345 678 ", "KE", "tel:+254712345678"),
        ("tel:2.54712345678E+11", "KE", "tel:+254712345678"),
        ("TEL:+254712345678", None, None),
        ("tel:800-123-4567", None, None),
        ("tel:0712345678", None, None),
        ("12345", None, None),
        ("tel:12", "KE", None),
        ("tel:++--", "KE", None),
        ("tel:", None, None),
        ("sms:+254712345678", None, None),
        ("whatsapp:254712345678", None, "whatsapp:254712345678"),
        (42, None, None),
        # Not possible with its `+`: kept as bare digits, a local number of the workspace.
        ("tel:+2547123", "KE", "tel:2547123"),
        ("tel:+999123456", "KE", "tel:999123456"),
        ("tel:+0712345678", "KE", "tel:0712345678"),
        ("tel:+15551212", "KE", "tel:15551212"),
        # ...and refused where the workspace has no country.
        ("tel:+2547123", None, None),
        ("tel:+999123456", None, None),
        ("tel:+0712345678", None, None),
    ],
    ids=[
        "e164-dashes",
        "local-rw",
        "local-ke",
        "implied-plus",
        "spaces-trimmed",
        "excel-exponent",
        "scheme-is-case-sensitive",
        "no-country",
        "local-without-country",
        "no-scheme",
        "short-code",
        "no-digits",
        "empty-path",
        "unknown-scheme",
        "other-scheme",
        "not-a-string",
        "too-short-plus-reinterpreted",
        "unknown-country-code-reinterpreted",
        "plus-zero-reinterpreted",
        "local-only-length-reinterpreted",
        "too-short-plus-no-country",
        "unknown-country-code-no-country",
        "plus-zero-no-country",
    ],
)
def test_normalize_urn(urn: Any, country: str | None, expected: str | None) -> None:
    assert normalize_urn(urn, country) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("visit @@ 5pm, mail a@@b.org", "visit @ 5pm, mail a@b.org"),
        ("mail a@gmail.com", "mail a@gmail.com"),
        ("Hi @contact.name!", "Hi Amina Njeri!"),
        ("Hi @contact.first_name.", "Hi Amina."),
        ("Hi @contact", "Hi Amina Njeri"),
        ("to @urns.tel", "to tel:+254712345678"),
        ("x @fields.age y", "x  y"),
        ("sum @(1 + 1)", "sum "),
        ("@@@@", "@@"),
    ],
    ids=[
        "escaped",
        "email-literal",
        "name",
        "first-name-dot",
        "default",
        "urn",
        "missing-field",
        "expression-empty",
        "double-escape",
    ],
)
def test_render_template(text: str, expected: str) -> None:
    context = {
        "contact": {"__default__": "Amina Njeri", "name": "Amina Njeri", "first_name": "Amina"},
        "urns": {"tel": "tel:+254712345678"},
    }
    assert render_template(text, context) == expected


def _validate(body: Any, dialect: str = "current") -> Any:
    return validate_broadcast(body, dialect=dialect, country=None, find_contact=lambda _: None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("body", "dialect", "errors"),
    [
        ([], "current", {"non_field_errors": ["Request body should be a single JSON object"]}),
        (
            {"urns": ["tel:+254712345678"]},
            "current",
            {"non_field_errors": ["Must provide either text or attachments."]},
        ),
        (
            {"text": "hi"},
            "current",
            {"non_field_errors": ["Must provide either urns, contacts or groups."]},
        ),
        (
            {"urns": ["tel:+254712345678", "tel:123"], "text": "hi"},
            "current",
            {"urns": {"1": ["Invalid URN: tel:123. Ensure phone numbers contain country codes."]}},
        ),
        (
            {"urns": [f"tel:+2547123{n:05d}" for n in range(101)], "text": "hi"},
            "current",
            {"urns": ["Ensure this field has no more than 100 elements."]},
        ),
        (
            {"urns": "tel:+254712345678", "text": "hi"},
            "current",
            {"urns": ['Expected a list of items but got type "str".']},
        ),
        (
            {"urns": ["tel:+254712345678"], "text": "x" * 641},
            "v9",
            {"text": {"eng": ["Ensure this field has no more than 640 characters."]}},
        ),
        (
            {"urns": ["tel:+254712345678"], "text": "x" * 4097},
            "current",
            {"text": {"eng": ["Ensure this field has no more than 4096 characters."]}},
        ),
        (
            {"urns": ["tel:+254712345678"], "text": "  "},
            "current",
            {"text": {"eng": ["This field may not be blank."]}},
        ),
        (
            {"urns": ["tel:+254712345678"], "text": {"fra": "salut"}, "base_language": "eng"},
            "current",
            {"non_field_errors": ["No text translation provided in base language."]},
        ),
        (
            {"contacts": ["nobody"], "text": "hi"},
            "current",
            {"contacts": ["No such object: nobody"]},
        ),
        ({"groups": ["Nurses"], "text": "hi"}, "current", {"groups": ["No such object: Nurses"]}),
        (
            {"urns": ["tel:+254712345678"], "text": "visit\x00today"},
            "v9",
            {"text": {"eng": ["Null characters are not allowed."]}},
        ),
        (
            {"urns": ["tel:+254712345678"], "text": {"eng": "ok", "swa": "sawa \ud83d"}},
            "current",
            {"text": {"swa": ["Surrogate characters are not allowed: U+D83D."]}},
        ),
        (
            {"urns": ["tel:+254712345678"], "text": "\x00" + "x" * 640},
            "v9",
            {
                "text": {
                    "eng": [
                        "Ensure this field has no more than 640 characters.",
                        "Null characters are not allowed.",
                    ]
                }
            },
        ),
        (
            {"urns": ["tel:+254712345678"], "text": "x" * 641 + " "},
            "v9",
            {"text": {"eng": ["Ensure this field has no more than 640 characters."]}},
        ),
    ],
    ids=[
        "not-object",
        "no-text",
        "no-recipients",
        "bad-urn",
        "too-many-urns",
        "urns-not-list",
        "v9-too-long",
        "current-too-long",
        "blank",
        "base-language",
        "unknown-contact",
        "unknown-group",
        "nul",
        "lone-surrogate",
        "every-failing-validator-reports",
        "too-long-even-trimmed",
    ],
)
def test_validation_errors(body: Any, dialect: str, errors: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as caught:
        _validate(body, dialect)
    assert caught.value.errors == errors


def test_validation_normalises_and_keys_text_by_language() -> None:
    request = _validate({"urns": ["tel:+1-800-123-4567", "tel:+18001234567"], "text": "x" * 640})
    assert request.urns == ("tel:+18001234567",)
    assert request.text == {"eng": "x" * 640}
    assert request.base_language == "eng"


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("x" * 640 + " ", "x" * 640),
        ("reminder\n", "reminder"),
        (" \t reminder\r\n", "reminder"),
        ("two\r\nlines\n\n", "two\r\nlines"),
        ("nbsp\u00a0\u2003", "nbsp"),
        ("zero width\u200b", "zero width\u200b"),
        (5, "5"),
    ],
    ids=[
        "limit-checked-after-trim",
        "trailing-newline",
        "both-ends",
        "inner-crlf-kept",
        "unicode-spaces",
        "zero-width-is-not-whitespace",
        "number-coerced",
    ],
)
def test_text_is_trimmed_as_drf_does(text: Any, stored: str) -> None:
    """DRF `CharField(trim_whitespace=True)`: `str.strip()`, nothing else (no line endings)."""
    request = _validate({"urns": ["tel:+254712345678"], "text": {"eng": text}}, "v9")
    assert request.text == {"eng": stored}


@pytest.mark.parametrize(
    ("outcome", "statuses"),
    [
        (["wired", "sent", "delivered"], ["queued", "wired", "sent", "delivered"]),
        (["failed"], ["queued", "failed"]),
        (
            ["errored", "errored", "failed"],
            ["queued", "errored", "queued", "errored", "queued", "failed"],
        ),
        (
            ["errored", "errored", "errored"],
            ["queued", "errored", "queued", "errored", "queued", "failed"],
        ),
    ],
    ids=["delivered", "failed-at-once", "retried-then-failed", "third-error-fails"],
)
def test_timeline_follows_courier(outcome: list[str], statuses: list[str]) -> None:
    timeline = build_timeline(T0, outcome, step=1, backoff=300)
    assert [status for _, status in timeline] == statuses


def test_timeline_backs_off_five_then_ten_minutes() -> None:
    timeline = build_timeline(T0, ["errored", "errored", "failed"], step=1, backoff=300)
    offsets = [(when - T0).total_seconds() for when, _ in timeline]
    assert offsets == [0, 1, 301, 302, 902, 903]


def test_sent_on_is_set_once_and_reset_on_error() -> None:
    sandbox = Sandbox(SandboxConfig(real_time=False, step_seconds=1, retry_backoff_seconds=10))
    sandbox.script("tel:+254712345678", ["wired", "sent", "errored", "delivered"])
    sandbox.create_broadcast(
        sandbox.validate_broadcast({"urns": ["tel:+254712345678"], "text": "x"})
    )
    [message] = sandbox.messages
    created = message.created_on
    states = [message.state_at(created + timedelta(seconds=s)) for s in (0, 1, 2, 3, 13, 14)]
    assert [s[0] for s in states] == ["queued", "wired", "sent", "errored", "queued", "delivered"]
    assert [s[1] for s in states] == [
        None,
        created + timedelta(seconds=1),
        created + timedelta(seconds=1),
        None,
        None,
        created + timedelta(seconds=14),
    ]
    assert states[2][2] == created + timedelta(seconds=2)  # modified_on follows every write


def test_iso_drops_zero_microseconds_like_drf() -> None:
    assert iso(T0) == "2026-03-02T17:28:12.123456Z"
    assert iso(T0.replace(microsecond=0)) == "2026-03-02T17:28:12Z"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-03-02T17:28:12.123456Z", T0),
        ("2026-03-02", datetime(2026, 3, 2, tzinfo=UTC)),
        ("2026-03-02T17:28:12", T0.replace(microsecond=0)),
        ("yesterday", None),
    ],
    ids=["full", "date-only", "naive-is-utc", "unparseable"],
)
def test_query_datetimes(value: str, expected: datetime | None) -> None:
    assert parse_query_datetime(value) == expected


def test_pagination_is_positional_and_reversible() -> None:
    rows = list(range(1, 8))

    def key(n: int) -> tuple[datetime, int]:
        return T0, n

    first = paginate(rows, key, None, 3)
    assert first.rows == [7, 6, 5] and first.previous is None and first.next is not None
    second = paginate([*rows, 8, 9], key, Cursor.decode(first.next.encode()), 3)
    assert second.rows == [4, 3, 2]  # rows added ahead of the cursor don't shift this page
    assert second.previous is not None and second.next is not None
    back = paginate([*rows, 8, 9], key, second.previous, 3)
    assert back.rows == [7, 6, 5]
    assert paginate(rows, key, second.next, 3).rows == [1]


@pytest.mark.parametrize("token", ["%%%", "bm9wZQ==", ""], ids=["not-base64", "no-p", "empty"])
def test_bad_cursor(token: str) -> None:
    with pytest.raises(CursorError):
        Cursor.decode(token)


def test_throttle_is_a_sliding_log_per_scope() -> None:
    sandbox = Sandbox(SandboxConfig(real_time=False, rates={"v2.messages": 2}))
    sandbox.check_throttle("v2.messages")
    sandbox.advance(600)
    sandbox.check_throttle("v2.messages")
    with pytest.raises(ThrottledError) as caught:
        sandbox.check_throttle("v2.messages")
    assert caught.value.wait == pytest.approx(3000)  # until the oldest ages out
    sandbox.check_throttle("v2")  # other scopes are separate buckets (and unthrottled here)
    sandbox.advance(3000)
    sandbox.check_throttle("v2.messages")


def test_lowered_rate_throttles_without_a_wait() -> None:
    sandbox = Sandbox(SandboxConfig(real_time=False, rates={"v2": 3}))
    for _ in range(3):
        sandbox.check_throttle("v2")
    sandbox.configure(rates={"v2": 1})
    with pytest.raises(ThrottledError) as caught:
        sandbox.check_throttle("v2")
    assert caught.value.wait is None
    assert throttle_detail(None) == ("Request was throttled.", None)


@pytest.mark.parametrize(
    ("wait", "detail", "header"),
    [
        (35.2, "Request was throttled. Expected available in 36 seconds.", 36),
        (0.4, "Request was throttled. Expected available in 1 second.", 1),
    ],
    ids=["plural", "singular"],
)
def test_throttle_detail(wait: float, detail: str, header: int) -> None:
    assert throttle_detail(wait) == (detail, header)


def test_default_rates_and_scopes_per_dialect() -> None:
    assert default_rates("v9")["v2.broadcasts"] == 36000
    assert default_rates("current")["v2"] == 3600
    assert "v2.broadcasts" not in default_rates("current")
    assert throttle_scope("broadcasts", "v9") == "v2.broadcasts"
    assert throttle_scope("broadcasts", "current") == "v2"
    assert throttle_scope("messages", "current") == "v2.messages"


def test_config_rejects_unknown_dialect_and_status() -> None:
    with pytest.raises(ValueError, match="dialect"):
        SandboxConfig(dialect="v7")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="status"):
        Sandbox().script("tel:+254712345678", ["delivred"])
