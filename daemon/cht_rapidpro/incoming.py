"""The webhook RapidPro flows call with each incoming SMS (spec cht-messaging §3.3, §4).

Each message is stored exactly once as the report CHT's `records.createByForm` would create.
The document `_id` is derived from RapidPro's id, so CouchDB itself refuses a second copy, even
under concurrent deliveries; ids CHT stored itself are found through its own
`medic-sms/messages_by_gateway_ref` view when it exists.

Deliberate differences from CHT (whose answers send RapidPro's flow down its failure branch):
a duplicate answers 200 `{"saved": 0, "duplicate": true}` (CHT: 400), malformed JSON answers 400
(CHT: 500), and a CouchDB outage answers 503 (CHT: 500). Every error body is CHT's JSON shape
`{"code": n, "error": "..."}`.

The key is checked against the last `rapidpro:incoming` read from CouchDB. While the credentials
cannot be read (CouchDB down, the daemon's user locked out or refused), a missing or different
key is not the caller's fault as far as we know: the answer is a retryable 503, never a 403
(which would tell RapidPro's flow that the request itself is wrong).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .cht.records import create_by_form
from .chtconfig import ChtConfig
from .couch.client import BulkWriter, CouchClient
from .errors import GatewayError
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
    """What storing one incoming SMS did: `saved`, or `duplicate` (a report exists)."""

    outcome: str  # "saved" | "duplicate"
    doc_id: str | None


class StoreRefusedError(GatewayError):
    """CouchDB answered the write with an error other than a conflict."""


class IncomingStore:
    """Stores an incoming SMS as CHT's report, exactly once per id (the webhook and the log
    follower's recovery share it, so both write the same document under the same `_id`)."""

    def __init__(self, couch: CouchClient, writer: BulkWriter, cht: ChtConfig) -> None:
        self._couch = couch
        self._writer = writer  # group commit: concurrent deliveries share `_bulk_docs` requests
        self._cht = cht
        self._has_ref_view: bool | None = None

    async def store(
        self, message: dict[str, Any], *, now_ms: int | None = None, check_cht: bool = True
    ) -> Stored:
        """Store `{id, from, content}` (the webhook body) unless a report of its id exists.

        `now_ms` is the report's `reported_date` (default: now, as CHT). `check_cht=False`
        skips asking CHT's view for the id (the caller did, for many at once).

        Raises:
            GatewayError: CouchDB could not be asked or written (nothing was stored).
            StoreRefusedError: CouchDB refused the write.
        """
        doc_id = doc_id_for(message["id"])
        if check_cht and await self._seen_by_cht(message["id"]):
            return Stored("duplicate", None)
        doc = self.report(message, now_ms=now_ms)
        doc["_id"] = doc_id
        result = await self._writer.write(doc)
        if result.conflict:  # the id exists: CouchDB itself keeps the copies to one
            return Stored("duplicate", doc_id)
        if not result.ok:
            raise StoreRefusedError(str(result.error))
        return Stored("saved", doc_id)

    def report(self, message: dict[str, Any], *, now_ms: int | None = None) -> dict[str, Any]:
        """The report CHT's `createByForm` builds for the SMS (no `_id`)."""
        data = {
            "from": message["from"],
            "message": message["content"],
            "gateway_ref": message["id"],
        }
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

    async def _seen_by_cht(self, message_id: Any) -> bool:
        return bool(await self.seen_by_cht([message_id]))


class IncomingWebhook:
    """The request handler; one instance per daemon."""

    def __init__(self, store: IncomingStore, cht: ChtConfig, metrics: Metrics) -> None:
        self._store_sms = store
        self._cht = cht
        self._metrics = metrics

    async def handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            status, body, outcome = 200, await self._accept(request), "saved"
            if body.get("duplicate"):
                outcome = "duplicate"
        except WebhookError as exc:
            status, body, outcome = exc.status, {"code": exc.status, "error": exc.error}, "refused"
        self._metrics.webhook_requests.labels(code=str(status)).inc()
        log.info(
            "webhook_handled",
            outcome=outcome,
            status=status,
            error=body.get("error"),
            doc_id=body.pop("_doc_id", None),
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return web.json_response(body, status=status)

    async def _accept(self, request: web.Request) -> dict[str, Any]:
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
        return await self._store(message)

    async def _store(self, message: dict[str, Any]) -> dict[str, Any]:
        doc_id = doc_id_for(message["id"])
        try:
            stored = await self._store_sms.store(message)
        except StoreRefusedError as exc:
            log.warning("webhook_store_refused", doc_id=doc_id, error=str(exc))
            raise WebhookError(503, "Message was not saved: the database refused it") from exc
        except GatewayError as exc:
            log.warning("webhook_store_failed", doc_id=doc_id, error=str(exc))
            raise WebhookError(503, "Message was not saved: the database is unavailable") from exc
        if stored.outcome == "duplicate":
            return {"saved": 0, "duplicate": True, "_doc_id": stored.doc_id}
        return {"saved": 1, "_doc_id": stored.doc_id}


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
    return {field: body[field] for field in _FIELDS}
