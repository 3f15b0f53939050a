"""The webhook RapidPro flows call with each incoming SMS (spec cht-messaging §3.3, §4).

Each message is stored exactly once as the report CHT's `records.createByForm` would create.
The document `_id` is derived from RapidPro's id, so CouchDB itself refuses a second copy, even
under concurrent deliveries; ids CHT stored itself are found through its own
`medic-sms/messages_by_gateway_ref` view when it exists.

A message is the same message when its id, `from` and `content` are the same: a repeated call
(a retry) is answered as a duplicate. CHT's documented flow body sends the flow *run's* UUID as
the id, which a flow that calls the webhook twice in one run repeats for a different message:
such a message is stored as its own report under `<_id>~<digest of from and content>`, so a
retry of it is recognised too, and `webhook_id_reused` is logged. (A flow that sends the same
text from the same number twice in one run under one id cannot be told from a retry: the
README's flow body sends the message's own id, `input.uuid`.)

Deliberate differences from CHT (whose answers send RapidPro's flow down its failure branch):
a duplicate answers 200 `{"saved": 0, "duplicate": true}` (CHT: 400), another message under a
known id is stored (CHT: dropped), malformed JSON answers 400 (CHT: 500), a CouchDB outage
answers 503 (CHT: 500), and an answer comes within `webhook_timeout_s`, below RapidPro's 15 s
(CHT waits as long as CouchDB takes). Every error body is CHT's JSON shape
`{"code": n, "error": "..."}`.

The key is checked against the last `rapidpro:incoming` read from CouchDB. While the credentials
cannot be read (CouchDB down, the daemon's user locked out or refused), a missing or different
key is not the caller's fault as far as we know: the answer is a retryable 503, never a 403
(which would tell RapidPro's flow that the request itself is wrong).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web

from .cht.records import create_by_form
from .chtconfig import ChtConfig
from .couch.client import BulkWriter, CouchClient
from .errors import GatewayError, RetryableError
from .logs import get_logger
from .metrics import Metrics

ROUTES = (
    "/api/v1/sms/radpidpro/incoming-messages",  # CHT's original path, typo and all
    "/api/v2/sms/rapidpro/incoming-messages",
)
_TOKEN = re.compile(r"^Token\s+(.*)$")
_FIELDS = ("id", "from", "content")

log = get_logger(component="webhook")


class WebhookError(Exception):
    """An answer other than success: HTTP status and CHT's error text."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


def reused_id_doc_id(message: dict[str, Any]) -> str:
    """The `_id` of a message whose RapidPro id an earlier, different message has.

    `~` never occurs in `doc_id_for`'s ids, so these cannot meet another message's `_id`; the
    digest of `from` and `content` makes a retry of the same call land on the same `_id`.
    """
    identity = json.dumps([message["from"], message["content"]]).encode()
    return f"{doc_id_for(message['id'])}~{hashlib.sha256(identity).hexdigest()[:32]}"


def same_message(doc: dict[str, Any], message: dict[str, Any], *, sender: bool = True) -> bool:
    """Whether a stored report (ours or CHT's) holds this message: same sender, same text.

    `sender=False` compares the text only, for a caller whose `from` may be written otherwise
    than the flow's body wrote it (recovery: CHT's body sends the contact's first number).
    """
    sms = doc.get("sms_message")
    return (
        isinstance(sms, dict)
        and (not sender or sms.get("from") == message["from"])
        and sms.get("message") == message["content"]
    )


def doc_id_for(message_id: str | int) -> str:
    """The report's `_id` for a RapidPro message id (a run uuid in CHT's flow set-up).

    Readable for the usual uuid-like ids; hashed for anything else so that every id, whatever
    its characters or length, maps to one valid CouchDB id. Strings and numbers never collide.
    """
    if isinstance(message_id, str) and re.fullmatch(
        r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}", message_id
    ):
        return f"sms-rapidpro:{message_id}"
    digest = hashlib.sha256(json.dumps(message_id).encode()).hexdigest()[:40]
    return f"sms-rapidpro:sha256:{digest}"


@dataclass(frozen=True, slots=True)
class Stored:
    """What storing one incoming SMS did: `saved`, or `duplicate` (a report of it exists)."""

    outcome: str  # "saved" | "duplicate"
    doc_id: str | None


class StoreRefusedError(GatewayError):
    """CouchDB answered the write with an error other than a conflict."""


class IncomingStore:
    """Stores an incoming SMS as CHT's report, exactly once per message (the webhook and the
    log follower's recovery share it, so both write the same document under the same `_id`)."""

    def __init__(self, couch: CouchClient, writer: BulkWriter, cht: ChtConfig) -> None:
        self._couch = couch
        self._writer = writer  # group commit: concurrent deliveries share `_bulk_docs` requests
        self._cht = cht
        self._has_ref_view: bool | None = None

    async def store(
        self,
        message: dict[str, Any],
        *,
        now_ms: int | None = None,
        check_cht: bool = True,
        match_sender: bool = True,
        on_doc_id: Callable[[str], None] = lambda _doc_id: None,
    ) -> Stored:
        """Store `{id, from, content}` (the webhook body) unless a report of it exists: under
        the id's own `_id`, or, when a different message already has that, under
        `reused_id_doc_id` (see the module docstring).

        `now_ms` is the report's `reported_date` (default: now, as CHT). `check_cht=False`
        skips asking CHT's view (the caller did, for many at once). `match_sender=False`: a
        report under the id with the same text is this message whatever its `from` (see
        `same_message`). `on_doc_id` hears each
        `_id` tried, so a caller cut short still knows which one it got to.

        Raises:
            GatewayError: CouchDB could not be asked or written (nothing was stored).
            StoreRefusedError: CouchDB refused the write.
        """
        if check_cht and await self._seen_by_cht(message):
            return Stored("duplicate", None)
        first = doc_id_for(message["id"])
        on_doc_id(first)
        if await self._write(first, message, now_ms):
            return Stored("saved", first)
        existing = await self._couch.get(first)
        if existing is None:
            # Refused as a conflict, yet not readable: a cluster copy behind the one that
            # refused it, or a delete in between. Retrying will tell.
            raise RetryableError(f"write {first}: conflict, but no document to compare")
        if same_message(existing, message, sender=match_sender):
            return Stored("duplicate", first)
        second = reused_id_doc_id(message)
        on_doc_id(second)
        if not await self._write(second, message, now_ms):
            return Stored("duplicate", second)  # this message, stored by an earlier call
        log.warning("webhook_id_reused", doc_id=second, first_doc_id=first)
        return Stored("saved", second)

    async def _write(self, doc_id: str, message: dict[str, Any], now_ms: int | None) -> bool:
        """Create the report as `doc_id`: True if written, False if the id exists."""
        doc = self.report(message, now_ms=now_ms)
        doc["_id"] = doc_id
        result = await self._writer.write(doc)
        if result.conflict:  # the id exists: CouchDB itself keeps the copies to one
            return False
        if not result.ok:
            raise StoreRefusedError(f"{doc_id}: {result.error}")
        return True

    def report(self, message: dict[str, Any], *, now_ms: int | None = None) -> dict[str, Any]:
        """The report CHT's `createByForm` builds for the SMS (no `_id`)."""
        data = {
            "from": message["from"],
            "message": message["content"],
            "gateway_ref": message["id"],
        }
        if "sent_timestamp" in message:
            data["sent_timestamp"] = message["sent_timestamp"]
        settings = self._cht.app_settings
        try:
            return create_by_form(
                data, settings=settings, translate=self._cht.translator(), now_ms=now_ms
            )
        except Exception as exc:
            # A parser bug must not lose the SMS: keep it as a free-text message, as CHT
            # stores text that matches no form. Only the error type is logged (no content).
            log.error("webhook_parse_failed", error_type=type(exc).__name__)
            return create_by_form(data, settings={**settings, "forms": {}}, now_ms=now_ms)

    async def has_ref_view(self) -> bool:
        if self._has_ref_view is None:
            self._has_ref_view = await self._couch.has_view("medic-sms", "messages_by_gateway_ref")
        return self._has_ref_view

    async def seen_by_cht(self, message_ids: list[Any]) -> set[Any]:
        """Which ids CHT itself already stored (`medic-sms/messages_by_gateway_ref`)."""
        if not message_ids or not await self.has_ref_view():
            return set()
        rows = await self._couch.view("medic-sms", "messages_by_gateway_ref", keys=message_ids)
        return {row.get("key") for row in rows}

    async def _seen_by_cht(self, message: dict[str, Any]) -> bool:
        """Whether CHT itself already stored this message: a report with this id, sender and
        text."""
        if not await self.has_ref_view():
            return False
        rows = await self._couch.view(
            "medic-sms", "messages_by_gateway_ref", keys=[message["id"]], include_docs=True
        )
        return any(
            isinstance(row.get("doc"), dict) and same_message(row["doc"], message) for row in rows
        )


@dataclass(slots=True)
class _Request:
    """What one webhook call got to, for its canonical log line."""

    doc_id: str | None = None


class IncomingWebhook:
    """The request handler; one instance per daemon."""

    def __init__(
        self, store: IncomingStore, cht: ChtConfig, metrics: Metrics, *, timeout_s: float
    ) -> None:
        self._store_sms = store
        self._cht = cht
        self._metrics = metrics
        self._timeout_s = timeout_s

    async def handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        call = _Request()
        deadline = asyncio.timeout(self._timeout_s)
        try:
            # RapidPro waits 15 s, then takes the flow's failure branch and never calls again:
            # an answer after that is lost, whatever it says. So CouchDB gets `timeout_s`
            # (< 15 s); a write it has not confirmed by then may still land, and a retry of
            # the call then finds it (the `_id` is derived from the message).
            async with deadline:
                body = await self._accept(request, call)
            status, outcome = 200, ("duplicate" if body.get("duplicate") else "saved")
        except TimeoutError:
            if not deadline.expired():
                raise
            status, outcome = 503, "unconfirmed"
            body = {
                "code": 503,
                "error": f"Not confirmed in time: the database did not answer within "
                f"{self._timeout_s:g} s. The message may still be saved; calling again with "
                "the same id is safe",
            }
        except WebhookError as exc:
            status, body, outcome = exc.status, {"code": exc.status, "error": exc.error}, "refused"
        self._metrics.webhook_requests.labels(code=str(status)).inc()
        log.info(
            "webhook_handled",
            outcome=outcome,
            status=status,
            error=body.get("error"),
            doc_id=call.doc_id,
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return web.json_response(body, status=status)

    async def _accept(self, request: web.Request, call: _Request) -> dict[str, Any]:
        given = _TOKEN.match(request.headers.get("Authorization", ""))
        if given is None:
            raise WebhookError(403, "Missing authorization token")
        await self._cht.refresh_credentials()  # cheap: re-reads only when stale
        expected = self._cht.incoming_key
        matches = bool(expected) and hmac.compare_digest(
            given.group(1).encode(), (expected or "").encode()
        )
        if not matches and not self._cht.credentials_current:
            raise WebhookError(
                503, "Cannot check the key now: the database is unavailable, try again"
            )
        if not expected:
            raise WebhookError(403, "No incoming key configured")
        if not matches:
            raise WebhookError(403, "Incorrect token")
        message = await _read_message(request)
        if not self._cht.settings_loaded:
            raise WebhookError(503, "Starting up: app settings not loaded yet, try again")

        def heard(doc_id: str) -> None:
            call.doc_id = doc_id

        try:
            stored = await self._store_sms.store(message, on_doc_id=heard)
        except StoreRefusedError as exc:
            log.warning("webhook_store_refused", doc_id=call.doc_id, error=str(exc))
            raise WebhookError(503, "Message was not saved: the database refused it") from exc
        except GatewayError as exc:
            log.warning("webhook_store_failed", doc_id=call.doc_id, error=str(exc))
            raise WebhookError(503, "Message was not saved: the database is unavailable") from exc
        if stored.outcome == "duplicate":
            return {"saved": 0, "duplicate": True}
        return {"saved": 1}


async def _read_message(request: web.Request) -> dict[str, Any]:
    """The `{id, from, content}` body, or a clear 4xx; nothing is written on any of these."""
    if request.content_type != "application/json":
        raise WebhookError(400, "Content-Type must be application/json")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise WebhookError(413, "Request body is too large for one SMS") from exc
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WebhookError(400, "Request body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise WebhookError(400, "Request body must be a JSON object {id, from, content}")
    for field in _FIELDS:
        value = body.get(field)
        valid_id = field == "id" and isinstance(value, int) and not isinstance(value, bool)
        if not (valid_id or isinstance(value, str)) or value in ("", 0):
            raise WebhookError(
                400, f'Message was not saved: missing required field "{field}" (a non-empty string)'
            )
        if isinstance(value, str) and not _storable(value):
            # CouchDB answers `400 invalid UTF-8 JSON` to it (and refuses the whole
            # `_bulk_docs` request it shares with other messages): no retry can store it.
            raise WebhookError(
                400,
                f'Message was not saved: "{field}" is not valid Unicode text (it holds a lone '
                "UTF-16 surrogate, which cannot be stored)",
            )
    message = {field: body[field] for field in _FIELDS}
    if body.get("sent_timestamp") is not None:
        message["sent_timestamp"] = _sent_timestamp(body["sent_timestamp"])
    return message


def _storable(text: str) -> bool:
    """Whether `text` is Unicode that UTF-8 can carry (JSON's `\\ud800` escapes and Python's
    decoder let lone surrogates through; CouchDB refuses them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _sent_timestamp(value: Any) -> int:
    """The optional `sent_timestamp` (when RapidPro received the SMS, e.g. the flow's
    `input.created_on`) as epoch milliseconds: CHT's `reported_date` of the report.

    An ISO 8601 time with its zone, or epoch milliseconds; anything else is refused (400) so
    that a mistyped flow body is noticed at once, not stored with a wrong date.
    """
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10**14:
        return value
    if isinstance(value, str) and _storable(value):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            moment = None
        if moment is not None and moment.tzinfo is not None:
            return round(moment.timestamp() * 1000)
    raise WebhookError(
        400,
        'Message was not saved: "sent_timestamp" must be an ISO 8601 time with its zone '
        "(e.g. 2025-01-31T09:30:00.000000Z, as @input.created_on gives it) or epoch "
        "milliseconds",
    )
