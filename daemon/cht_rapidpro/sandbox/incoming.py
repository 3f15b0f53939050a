"""The incoming-SMS simulator: RapidPro's Call Webhook as the CHT flow makes it (spec §6).

Faithful: the body is `json(object(...))`, i.e. compact with keys sorted and Unicode unescaped;
the engine adds `User-Agent` and `X-Mailroom-Mode` but no `Content-Type` (the flow sets it); one
total timeout (15 s); status 0 for connection errors and timeouts; Success iff 200-299; no retries
in current, and v9's narrow retry rule. Simplified: loopback and private addresses are allowed
(RapidPro blocks them), and only POST is simulated.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from .wire import Dialect

USER_AGENTS: Mapping[Dialect, str] = {"v9": "RapidProMailroom/9.0.0", "current": "Mailroom/26.3"}
#: Response bodies are read up to 1 MiB (v9) or 256 KiB (current).
MAX_RESPONSE: Mapping[Dialect, int] = {"v9": 1024 * 1024, "current": 256 * 1024}
#: v9's planned delays before each retry (mailroom <= v10.2); current never retries.
RETRY_BACKOFFS: Mapping[Dialect, tuple[float, ...]] = {"v9": (5.0, 10.0), "current": ()}
_IDEMPOTENCY_HEADERS = frozenset({"idempotency-key", "x-idempotency-key"})


@dataclass(frozen=True, slots=True)
class IncomingOutcome:
    """What a simulated Call Webhook got; `category` is the flow's route (spec §6.3)."""

    url: str
    run_uuid: str
    request_body: str
    status: int  # 0: connection error or timeout, as `@webhook.status`
    body: str
    attempts: int
    error: str | None

    @property
    def category(self) -> str:
        return "Success" if 200 <= self.status <= 299 else "Failure"

    def as_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "category": self.category}


def cht_headers(token: str) -> dict[str, str]:
    """The headers CHT's documented flow configures (cht-docs, spec §6.1)."""
    return {"Authorization": f"Token {token}", "Content-Type": "application/json"}


def webhook_body(body: Mapping[str, Any]) -> str:
    """goflow's `json()`: compact, keys sorted, Unicode and HTML unescaped."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


async def call_webhook(
    url: str,
    *,
    body: Mapping[str, Any],
    headers: Mapping[str, str],
    dialect: Dialect,
    timeout_s: float = 15.0,
    retry_backoffs: Sequence[float] | None = None,
) -> IncomingOutcome:
    """POST `body` to `url` like a flow's Call Webhook node, retrying as the dialect does."""
    payload = webhook_body(body)
    sent_headers = {
        "Accept-Encoding": "gzip",
        **headers,
        "User-Agent": USER_AGENTS[dialect],
        "X-Mailroom-Mode": "normal",
    }
    backoffs = RETRY_BACKOFFS[dialect] if retry_backoffs is None else tuple(retry_backoffs)
    attempts = 0
    async with aiohttp.ClientSession() as session:
        while True:
            attempts += 1
            status, text, retry_after, error = await _attempt(
                session, url, payload, sent_headers, timeout_s, MAX_RESPONSE[dialect]
            )
            if attempts > len(backoffs):
                break
            backoff = backoffs[attempts - 1]
            if not _should_retry(sent_headers, status, retry_after, backoff):
                break
            await asyncio.sleep(backoff)
    return IncomingOutcome(url, str(body.get("id")), payload, status, text, attempts, error)


async def _attempt(
    session: aiohttp.ClientSession,
    url: str,
    payload: str,
    headers: Mapping[str, str],
    timeout_s: float,
    limit: int,
) -> tuple[int, str, float | None, str | None]:
    """One request: `(status, body, retry_after, error)`; status 0 if no response came."""
    try:
        async with session.post(
            url,
            data=payload.encode(),
            headers=dict(headers),
            skip_auto_headers=("Content-Type", "Accept"),  # Go's client adds neither
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as response:
            raw = await response.content.read(limit)
            retry_after = _retry_after(response.headers.get("Retry-After"))
            return response.status, raw.decode(errors="replace"), retry_after, None
    except TimeoutError:
        return 0, "", None, f"timed out after {timeout_s:g} s"
    except (aiohttp.ClientError, ValueError) as exc:
        return 0, "", None, f"{type(exc).__name__}: {exc}"


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: not worth simulating


def _should_retry(
    headers: Mapping[str, str], status: int, retry_after: float | None, backoff: float
) -> bool:
    """gocommon `DefaultShouldRetry` (v9): a `Retry-After` within the planned backoff, or an
    idempotent request (for POST: an idempotency key header) with no response or status > 501."""
    if 200 <= status < 400:
        return False
    if retry_after is not None:
        return retry_after <= backoff
    idempotent = any(name.lower() in _IDEMPOTENCY_HEADERS for name in headers)
    return idempotent and (status == 0 or status > 501)
