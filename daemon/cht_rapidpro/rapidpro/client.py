"""RapidPro API v2 client: send broadcasts, list broadcasts, messages and flow runs.

Thin and typed: it turns every HTTP outcome into an `errors` class through one table
(`classify`) and holds no business rules. Callers pass the `Target` (URL and token), which
comes from CHT's settings and vault and may change at any time.

Text that RapidPro wrote (a 400's field errors, a 403's detail) reaches the errors only through
`cht.phone.mask_numbers`: RapidPro repeats the URN it refused (`Invalid URN: tel:+2547. ...`),
and these texts go to logs, `/healthz` and the task's `state_details`.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp
from yarl import URL

from .. import __version__
from ..cht.phone import mask_numbers
from ..errors import (
    AuthError,
    GatewayError,
    PermanentError,
    RetryableError,
    UpstreamConfigError,
)
from ..metrics import Metrics
from .models import Broadcast, Message, Run, Target
from .throttle import BROADCASTS, MESSAGES, Budget

#: RapidPro's `v2.runs` throttle scope (a bucket of its own, rapidpro-api §1.6).
RUNS = "runs"

USER_AGENT = (
    f"cht-rapidpro/{__version__} (+https://github.com/medic/cht-core; "
    f"{platform.system().lower()},{platform.machine()})"
)
#: Default wait after a 429 that carries no Retry-After (spec rapidpro-api §5.3).
DEFAULT_RETRY_AFTER_S = 60.0
#: Longest 400 summary kept in `state_details`.
MAX_SUMMARY = 500


def summarize_errors(body: Any) -> str:
    """Flatten a DRF error body into one line: `urns.0: Invalid URN: ...; text.eng: ...`.

    Phone numbers in it are masked (`tel:***547`), and it is bounded for `state_details`.
    """
    parts: list[str] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                name = "" if key in ("non_field_errors", "detail") else str(key)
                walk(f"{prefix}.{name}" if prefix and name else prefix or name, inner)
        elif isinstance(value, list):
            for inner in value:
                walk(prefix, inner)
        elif value is not None:
            parts.append(f"{prefix}: {value}" if prefix else str(value))

    walk("", body)
    summary = mask_numbers("; ".join(parts)) or "Bad request"
    return summary if len(summary) <= MAX_SUMMARY else summary[: MAX_SUMMARY - 1] + "…"


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def classify(
    status: int, body: Any, headers: Mapping[str, str], *, is_post: bool, what: str
) -> GatewayError:
    """The error for a non-2xx RapidPro answer (rapidpro-api §1.4)."""
    if status == 400:
        return PermanentError(summarize_errors(body))
    if status in (401, 403):
        detail = body.get("detail") if isinstance(body, dict) else None
        detail = mask_numbers(str(detail)) if detail else None
        return AuthError(
            f"{what}: RapidPro refused the API token ({status} {detail or 'forbidden'}); "
            "check credential rapidpro:outgoing (a token of an Administrator or Editor)"
        )
    if status == 429:
        return RetryableError(f"{what}: throttled by RapidPro", retry_after=_retry_after(headers))
    if 300 <= status < 400:
        location = headers.get("Location", "?")
        return UpstreamConfigError(
            f"{what}: RapidPro redirected to {location}; set sms.rapidpro.url to the final "
            "URL (https://...)"
        )
    if status == 404:
        return UpstreamConfigError(
            f"{what}: 404 from RapidPro; is sms.rapidpro.url the RapidPro/TextIt host "
            "(e.g. https://textit.com)?"
        )
    if status >= 500:
        # The server may have processed the request before failing (or a proxy timed out).
        return RetryableError(f"{what}: RapidPro answered {status}", ambiguous=is_post)
    if status == 413:
        return PermanentError("Request too large for RapidPro")
    return UpstreamConfigError(f"{what}: unexpected {status} from RapidPro")


class RapidProClient:
    """Calls RapidPro on one `aiohttp.ClientSession`, within the client-side `Budget`."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        budget: Budget,
        *,
        timeout_s: float,
        user_agent: str = USER_AGENT,
        metrics: Metrics | None = None,
    ) -> None:
        self._session = session
        self._metrics = metrics
        self.budget = budget
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(10.0, timeout_s))
        self._user_agent = user_agent
        self.requests = 0  # made (for metrics, tests and benchmarks)

    def _headers(self, target: Target) -> dict[str, str]:
        return {
            "Authorization": f"Token {target.token}",
            "Accept": "application/json",
            "User-Agent": self._user_agent,
        }

    async def _call(
        self,
        method: str,
        url: URL | str,
        target: Target,
        *,
        scope: str,
        what: str,
        body: Any = None,
        wait_for_budget: bool = True,
        before_request: Callable[[], Awaitable[None]] | None = None,
    ) -> Any:
        if wait_for_budget:
            await self.budget.acquire(scope)
        elif not self.budget.try_acquire(scope):
            raise RetryableError(
                f"{what}: client-side budget used up", retry_after=self.budget.wait_time(scope)
            )
        if before_request is not None:
            await before_request()  # the caller's last word, however long the budget took
        headers = self._headers(target)
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            try:
                data = json.dumps(body, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                # A lone surrogate (CouchDB's JSON can hold "\ud83d"; UTF-8 cannot): send it
                # escaped, and RapidPro answers its own 400 ("Surrogate characters are not
                # allowed"), so the message fails with a reason instead of crashing the job.
                data = json.dumps(body).encode("ascii")
        is_post = method == "POST"
        self.requests += 1
        if self._metrics is not None:
            self._metrics.rapidpro_requests.labels(scope).inc()
        try:
            async with self._session.request(
                method,
                url,
                data=data,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,  # a redirect turns a POST into a GET: report it instead
            ) as resp:
                raw = await resp.read()
                status, resp_headers = resp.status, resp.headers
        except aiohttp.ClientConnectorError as exc:
            # Nothing reached the server: safe to repeat.
            raise RetryableError(f"{what}: cannot connect to RapidPro ({exc.os_error})") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The request may have been processed before the connection broke.
            raise RetryableError(
                f"{what}: {type(exc).__name__} talking to RapidPro", ambiguous=is_post
            ) from exc
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        if 200 <= status < 300:
            if parsed is None and raw:
                raise RetryableError(f"{what}: RapidPro sent a non-JSON body", ambiguous=is_post)
            return parsed
        error = classify(status, parsed, resp_headers, is_post=is_post, what=what)
        if status == 429:
            assert isinstance(error, RetryableError)
            if self._metrics is not None:
                self._metrics.rapidpro_throttled.labels(scope).inc()
            self.budget.block(
                scope,
                DEFAULT_RETRY_AFTER_S if error.retry_after is None else error.retry_after,
            )
        raise error

    async def send_broadcast(
        self,
        target: Target,
        urns: Sequence[str],
        text: str,
        *,
        before_request: Callable[[], Awaitable[None]] | None = None,
    ) -> Broadcast:
        """POST /api/v2/broadcasts.json; the text goes as given (escape `@` before).

        `before_request` runs once the request is allowed to go, just before it does (the
        sender re-checks its claim there); an exception from it cancels the request.

        Raises:
            PermanentError: 400, the message can never be sent as it is (summary inside).
            RetryableError: try again later; `.ambiguous` means look it up first.
            AuthError, UpstreamConfigError: the set-up is wrong; sending must pause.
        """
        body = await self._call(
            "POST",
            target.endpoint("broadcasts"),
            target,
            scope=BROADCASTS,
            what="send broadcast",
            body={"urns": list(urns), "text": text},
            before_request=before_request,
        )
        if not isinstance(body, dict) or body.get("id") in (None, ""):
            # 2xx without an id: a proxy or an unexpected server. We can't tell whether a
            # broadcast exists, so look it up before trying again.
            raise RetryableError("send broadcast: RapidPro answered without an id", ambiguous=True)
        return Broadcast.from_json(body)

    async def _pages(
        self, target: Target, name: str, scope: str, params: Mapping[str, str], *, wait: bool
    ) -> AsyncIterator[list[dict[str, Any]]]:
        url: URL | str | None = target.endpoint(name).with_query(params)
        while url is not None:
            body = await self._call(
                "GET", url, target, scope=scope, what=f"list {name}", wait_for_budget=wait
            )
            if not isinstance(body, dict) or not isinstance(body.get("results"), list):
                raise RetryableError(f"list {name}: unexpected response shape")
            yield [row for row in body["results"] if isinstance(row, dict)]
            # Follow `next` verbatim: the cursor is opaque and keeps every filter.
            next_url = body.get("next")
            url = next_url if isinstance(next_url, str) and next_url else None

    async def messages(
        self,
        target: Target,
        *,
        after: datetime | None = None,
        before: datetime | None = None,
        broadcast: int | None = None,
        message_id: int | None = None,
        folder: str | None = None,
        wait_for_budget: bool = False,
    ) -> AsyncGenerator[list[Message], None]:
        """GET /api/v2/messages.json, newest first, a page (250) at a time.

        `after`/`before` are inclusive bounds on `created_on`; `broadcast` and `message_id`
        ask for one broadcast's or one message's rows (deprecated filters on TextIt, still
        served); `folder` (e.g. `flows`) excludes `broadcast` (rapidpro-api §4.1).
        """
        params: dict[str, str] = {}
        if after is not None:
            params["after"] = _iso(after)
        if before is not None:
            params["before"] = _iso(before)
        if broadcast is not None:
            params["broadcast"] = str(broadcast)
        if message_id is not None:
            params["id"] = str(message_id)
        if folder is not None:
            params["folder"] = folder
        async for page in self._pages(target, "messages", MESSAGES, params, wait=wait_for_budget):
            yield [Message.from_json(row) for row in page]

    async def runs(
        self,
        target: Target,
        *,
        flow: str,
        after: datetime | None = None,
        wait_for_budget: bool = False,
    ) -> AsyncGenerator[list[Run], None]:
        """GET /api/v2/runs.json?flow=...&after=... (`after` on `modified_on`), newest first."""
        params = {"flow": flow}
        if after is not None:
            params["after"] = _iso(after)
        async for page in self._pages(target, "runs", RUNS, params, wait=wait_for_budget):
            yield [Run.from_json(row) for row in page]

    async def broadcasts(
        self, target: Target, *, after: datetime
    ) -> AsyncIterator[list[Broadcast]]:
        """GET /api/v2/broadcasts.json?after=..., newest first (for send reconciliation)."""
        params = {"after": _iso(after)}
        async for page in self._pages(target, "broadcasts", BROADCASTS, params, wait=True):
            yield [Broadcast.from_json(row) for row in page]


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
