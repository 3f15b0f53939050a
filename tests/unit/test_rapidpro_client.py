"""rapidpro.client: DRF error summaries and the status-code table (rapidpro-api §1.4, §5.3).

The last section drives `RapidProClient` through an in-memory stand-in for
`aiohttp.ClientSession` (no sockets) to check what `classify` cannot see on its own: 2xx
handling and how a 429 feeds the client-side budget.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from cht_rapidpro.errors import (
    AuthError,
    GatewayError,
    PermanentError,
    RetryableError,
    UpstreamConfigError,
)
from cht_rapidpro.rapidpro.client import (
    DEFAULT_RETRY_AFTER_S,
    MAX_SUMMARY,
    RapidProClient,
    classify,
    summarize_errors,
)
from cht_rapidpro.rapidpro.models import Broadcast, Target, stored_text
from cht_rapidpro.rapidpro.throttle import BROADCASTS, MESSAGES, Budget

INVALID_URN = "Invalid URN: tel:123. Ensure phone numbers contain country codes."
MASKED_URN = "Invalid URN: tel:***. Ensure phone numbers contain country codes."
FLAGGED = (
    "Sorry, your workspace is currently flagged. To re-enable starting flows and sending "
    "messages, please contact support."
)


@pytest.mark.parametrize(
    ("body", "summary"),
    [
        ({"urns": {"0": [INVALID_URN]}}, f"urns.0: {MASKED_URN}"),
        (
            {"urns": {"0": ["Invalid URN: tel:+2547. Ensure phone numbers ..."]}},
            "urns.0: Invalid URN: tel:***547. Ensure phone numbers ...",
        ),
        (
            {"urns": {"0": ["Invalid URN: tel:+254 712 345 678. Ensure phone numbers ..."]}},
            "urns.0: Invalid URN: tel:***678. Ensure phone numbers ...",
        ),
        (
            {"text": {"eng": ["Ensure this field has no more than 640 characters."]}},
            "text.eng: Ensure this field has no more than 640 characters.",
        ),
        ({"groups": ["No such object: 123456"]}, "groups: No such object: ***456"),
        (
            {"non_field_errors": ["Must provide either text or attachments."]},
            "Must provide either text or attachments.",
        ),
        ({"non_field_errors": [FLAGGED]}, FLAGGED),
        ({"detail": "Value for id must be an integer"}, "Value for id must be an integer"),
        (
            {"urns": {"0": [INVALID_URN], "2": ["Invalid URN: tel:abc."]}},
            f"urns.0: {MASKED_URN}; urns.2: Invalid URN: tel:abc.",
        ),
        (
            {"urns": ["This field is required."], "text": ["This field may not be blank."]},
            "urns: This field is required.; text: This field may not be blank.",
        ),
        (
            {"urns": {"non_field_errors": ["Ensure this field has no more than 100 elements."]}},
            "urns: Ensure this field has no more than 100 elements.",
        ),
        (["A list of errors", "at the top"], "A list of errors; at the top"),
        ("Server said no", "Server said no"),
        (None, "Bad request"),
        ({}, "Bad request"),
        ({"urns": {}}, "Bad request"),
    ],
    ids=[
        "listfield-string-index",
        "short-number-masked",
        "spaced-number-masked",
        "translated-text",
        "relation-flat-list",
        "non-field-errors",
        "flagged-workspace",
        "query-detail",
        "two-urns",
        "two-fields",
        "nested-non-field-errors",
        "top-level-list",
        "plain-string",
        "no-body",
        "empty-object",
        "empty-field",
    ],
)
def test_summarize_errors(body: Any, summary: str) -> None:
    assert summarize_errors(body) == summary


def test_summary_is_bounded_for_state_details() -> None:
    summary = summarize_errors({"text": ["x" * 2000]})
    assert len(summary) == MAX_SUMMARY
    assert summary.startswith("text: xxx")
    assert summary.endswith("…")


def headers(**values: str) -> CIMultiDictProxy[str]:
    """Response headers as aiohttp gives them: case-insensitive."""
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in values.items()}))


# (id, status, body, headers, is_post, error class, retry_after, ambiguous)
CLASSIFY_CASES: list[tuple[str, int, Any, Mapping[str, str], bool, type, float | None, bool]] = [
    ("400-urn", 400, {"urns": {"0": [INVALID_URN]}}, headers(), True, PermanentError, None, False),
    ("400-query", 400, {"detail": "Value"}, headers(), False, PermanentError, None, False),
    ("401", 401, {"detail": "Invalid token"}, headers(), True, AuthError, None, False),
    (
        "403-token",
        403,
        {"detail": "Invalid token or email"},
        headers(),
        True,
        AuthError,
        None,
        False,
    ),
    ("403-no-body", 403, None, headers(), False, AuthError, None, False),
    ("404-json", 404, {"detail": "Not found."}, headers(), True, UpstreamConfigError, None, False),
    ("404-html", 404, None, headers(), False, UpstreamConfigError, None, False),
    (
        "429-retry-after",
        429,
        {"detail": "Request was throttled. Expected available in 36 seconds."},
        headers(Retry_After="36"),
        True,
        RetryableError,
        36.0,
        False,
    ),
    (
        "429-retry-after-lower-case-header",
        429,
        None,
        CIMultiDictProxy(CIMultiDict({"retry-after": "5"})),
        False,
        RetryableError,
        5.0,
        False,
    ),
    (
        "429-without-retry-after",
        429,
        {"detail": "Request was throttled."},
        headers(),
        True,
        RetryableError,
        None,
        False,
    ),
    (
        "429-http-date-retry-after-ignored",
        429,
        None,
        headers(Retry_After="Wed, 21 Oct 2026 07:28:00 GMT"),
        False,
        RetryableError,
        None,
        False,
    ),
    ("429-negative", 429, None, headers(Retry_After="-3"), False, RetryableError, None, False),
    ("429-zero", 429, None, headers(Retry_After="0"), False, RetryableError, 0.0, False),
    ("500-post", 500, None, headers(), True, RetryableError, None, True),
    ("500-get", 500, None, headers(), False, RetryableError, None, False),
    ("502-post", 502, None, headers(), True, RetryableError, None, True),
    ("503-get", 503, None, headers(), False, RetryableError, None, False),
    ("504-post", 504, None, headers(), True, RetryableError, None, True),
    (
        "301-redirect",
        301,
        None,
        headers(Location="https://textit.com/api/v2/broadcasts.json"),
        True,
        UpstreamConfigError,
        None,
        False,
    ),
    ("302-redirect", 302, None, headers(), False, UpstreamConfigError, None, False),
    ("413-too-large", 413, None, headers(), True, PermanentError, None, False),
    ("405-wrong-verb", 405, {"detail": "x"}, headers(), True, UpstreamConfigError, None, False),
]


@pytest.mark.parametrize(
    ("status", "body", "response_headers", "is_post", "kind", "retry_after", "ambiguous"),
    [case[1:] for case in CLASSIFY_CASES],
    ids=[case[0] for case in CLASSIFY_CASES],
)
def test_classify(
    status: int,
    body: Any,
    response_headers: Mapping[str, str],
    is_post: bool,
    kind: type,
    retry_after: float | None,
    ambiguous: bool,
) -> None:
    error = classify(status, body, response_headers, is_post=is_post, what="send broadcast")
    assert type(error) is kind
    assert isinstance(error, GatewayError)
    assert str(error)
    if isinstance(error, RetryableError):
        assert error.retry_after == retry_after
        assert error.ambiguous is ambiguous


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413], ids=lambda s: str(s))
def test_permanent_statuses_are_never_retryable(status: int) -> None:
    """Style guide: 400 on send is permanent (task `failed`); 401/403/404 are set-up problems."""
    error = classify(status, None, headers(), is_post=True, what="send broadcast")
    assert isinstance(error, PermanentError)
    assert not isinstance(error, RetryableError)


def test_400_error_carries_the_drf_summary_with_numbers_masked() -> None:
    refused = "Invalid URN: tel:+254712345678. Ensure phone numbers contain country codes."
    error = classify(400, {"urns": {"0": [refused]}}, headers(), is_post=True, what="send")
    assert str(error) == (
        "urns.0: Invalid URN: tel:***678. Ensure phone numbers contain country codes."
    )


def test_auth_error_detail_is_masked_too() -> None:
    error = classify(403, {"detail": "No access for +254712345678"}, headers(), is_post=False,
                     what="list broadcasts")  # fmt: skip
    assert "***678" in str(error) and "254712345678" not in str(error)


@pytest.mark.parametrize("status", [401, 403], ids=lambda s: str(s))
def test_auth_error_names_the_credential_to_fix(status: int) -> None:
    error = classify(
        status, {"detail": "Invalid token or email"}, headers(), is_post=True, what="x"
    )
    assert "rapidpro:outgoing" in str(error)
    assert str(status) in str(error)
    assert "Invalid token or email" in str(error)


def test_redirect_error_names_the_new_location() -> None:
    location = "https://textit.com/api/v2/broadcasts.json"
    error = classify(301, None, headers(Location=location), is_post=True, what="send broadcast")
    assert location in str(error)


# --------------------------------------------------------------------------- client over a stub


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class StubResponse:
    """What `async with session.request(...) as resp` yields: status, headers, read()."""

    def __init__(self, status: int, body: Any, response_headers: Mapping[str, str]) -> None:
        self.status = status
        self.headers = CIMultiDictProxy(CIMultiDict(response_headers))
        self._raw = body if isinstance(body, bytes) else json.dumps(body).encode()

    async def read(self) -> bytes:
        return self._raw

    async def __aenter__(self) -> StubResponse:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


class StubSession:
    """Answers every request with the next scripted response and records the request."""

    def __init__(self, *responses: StubResponse) -> None:
        self._responses = list(responses)
        self.requests: list[dict[str, Any]] = []

    def request(self, method: str, url: URL | str, **kwargs: Any) -> StubResponse:
        self.requests.append({"method": method, "url": str(url), **kwargs})
        return self._responses.pop(0)


TARGET = Target(url=URL("https://rapidpro.example/"), token="tok-123")
BROADCAST_201 = {
    "id": 101,
    "status": "queued",
    "urns": ["tel:+254712345678"],
    "text": {"eng": "hello"},
    "created_on": "2026-05-01T08:00:00.123456Z",
}


def make_client(*responses: StubResponse) -> tuple[RapidProClient, StubSession, FakeClock]:
    clock = FakeClock()
    session = StubSession(*responses)
    budget = Budget({BROADCASTS: 10, MESSAGES: 10}, clock=clock)
    client = RapidProClient(session, budget, timeout_s=5)  # type: ignore[arg-type]
    return client, session, clock


async def test_send_broadcast_201_returns_the_broadcast() -> None:
    client, session, _ = make_client(StubResponse(201, BROADCAST_201, {}))
    broadcast = await client.send_broadcast(TARGET, ["tel:+254712345678"], "hello")
    assert isinstance(broadcast, Broadcast)
    assert broadcast.id == 101
    assert broadcast.status == "queued"
    (request,) = session.requests
    assert request["method"] == "POST"
    assert request["url"] == "https://rapidpro.example/api/v2/broadcasts.json"
    assert request["headers"]["Authorization"] == "Token tok-123"
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["allow_redirects"] is False
    assert json.loads(request["data"]) == {"urns": ["tel:+254712345678"], "text": "hello"}
    assert client.budget.remaining(BROADCASTS) == 9


async def test_send_broadcast_400_is_permanent_with_summary() -> None:
    client, _, _ = make_client(StubResponse(400, {"urns": {"0": [INVALID_URN]}}, {}))
    with pytest.raises(PermanentError, match="Invalid URN") as raised:
        await client.send_broadcast(TARGET, ["tel:123"], "hello")
    assert not isinstance(raised.value, AuthError | UpstreamConfigError)


@pytest.mark.parametrize(
    ("response_headers", "retry_after", "blocked_for"),
    [
        ({"Retry-After": "36"}, 36.0, 36.0),
        ({}, None, DEFAULT_RETRY_AFTER_S),
        ({"Retry-After": "0"}, 0.0, 0.0),
    ],
    ids=["retry-after-36", "no-retry-after-waits-60", "retry-after-0-is-honoured"],
)
async def test_send_broadcast_429_blocks_the_scope(
    response_headers: dict[str, str], retry_after: float | None, blocked_for: float
) -> None:
    """rapidpro-api §5.3: back off by Retry-After, or 60 s without it; other scopes go on."""
    client, _, clock = make_client(
        StubResponse(429, {"detail": "Request was throttled."}, response_headers)
    )
    with pytest.raises(RetryableError) as raised:
        await client.send_broadcast(TARGET, ["tel:+254712345678"], "hello")
    assert raised.value.retry_after == retry_after
    assert raised.value.ambiguous is False
    assert client.budget.wait_time(BROADCASTS) == blocked_for
    assert client.budget.throttled[BROADCASTS] == 1
    assert client.budget.wait_time(MESSAGES) == 0
    clock.now += blocked_for
    assert client.budget.wait_time(BROADCASTS) == 0


@pytest.mark.parametrize(
    "body",
    [{"status": "queued"}, {"id": None}, {"id": ""}, [], None],
    ids=["no-id", "null-id", "empty-id", "list", "empty-body"],
)
async def test_send_broadcast_2xx_without_id_is_ambiguous(body: Any) -> None:
    """cht-messaging §8.9: a 2xx without an id must be looked up, not trusted or resent."""
    raw = b"" if body is None else json.dumps(body).encode()
    client, _, _ = make_client(StubResponse(201, raw, {}))
    with pytest.raises(RetryableError) as raised:
        await client.send_broadcast(TARGET, ["tel:+254712345678"], "hello")
    assert raised.value.ambiguous is True


async def test_send_broadcast_5xx_is_ambiguous() -> None:
    client, _, _ = make_client(StubResponse(502, b"<html>Bad Gateway</html>", {}))
    with pytest.raises(RetryableError) as raised:
        await client.send_broadcast(TARGET, ["tel:+254712345678"], "hello")
    assert raised.value.ambiguous is True


@pytest.mark.parametrize(
    ("posted", "stored"),
    [
        ("visit reminder\n", "visit reminder"),
        ("visit reminder ", "visit reminder"),
        ("\tvisit reminder\r\n", "visit reminder"),
        ("line one\r\nline two\n", "line one\r\nline two"),
        ("ziara\u00a0", "ziara"),
        ("ziara\u200b", "ziara\u200b"),
        ("visit @@ 5pm ", "visit @@ 5pm"),
    ],
    ids=[
        "newline",
        "space",
        "tab-and-crlf",
        "inner-line-endings-kept",
        "no-break-space",
        "zero-width-space-is-not-whitespace",
        "escaped-at-untouched",
    ],
)
def test_stored_text_is_trimmed_as_drf_does(posted: str, stored: str) -> None:
    """RapidPro's `CharField(trim_whitespace=True)`: what a lookup must compare against."""
    assert stored_text(posted) == stored
