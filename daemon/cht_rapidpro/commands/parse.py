"""`cht-rapidpro parse`: the report an incoming SMS would become, with the current SMS forms;
and (`--rapidpro-message`) what the daemon writes for a message of RapidPro's log.

It builds the document exactly as the webhook does (`create_by_form` with the app settings,
the free-text fallback when CHT's parser throws) and prints it; nothing is written.
"""

from __future__ import annotations

import contextlib
import json
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from yarl import URL

from ..cht import credentials as creds
from ..cht.records import JsError, RecordError, create_by_form
from ..chtconfig import read_credential
from ..config import Settings
from ..couch.client import CouchClient
from ..errors import GatewayError
from ..incoming import doc_id_for
from ..messagelog import PAIR_WAIT_S
from ..mirror import minify, mirror_doc, mirror_id, recipient
from ..rapidpro.client import RapidProClient
from ..rapidpro.models import Message, Run, Target
from ..rapidpro.throttle import Budget
from ..recovery import IncomingRow, identity, pair_runs, reported_ms, webhook_from
from ..status import REF_VIEW
from ..tracking import MIRROR_REF_PREFIX
from .common import (
    COMMAND_COUCH_TIMEOUT_S,
    EX_CONFIG,
    EX_FAILED,
    EX_OK,
    EX_UNAVAILABLE,
    EX_USAGE,
    CommandError,
    load_app_settings,
    open_couch,
    require_db,
    sms_settings,
)

#: `from` when none is given: not a number, so no normalisation and no contact match.
DEFAULT_FROM = "unknown"


def read_app_settings_file(path: str) -> dict[str, Any]:
    """App settings from a JSON file: cht-conf's `app_settings.json`, or a `settings` doc."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CommandError(f"--app-settings {path}: {exc.strerror or exc}", EX_USAGE) from exc
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise CommandError(f"--app-settings {path}: not valid JSON: {exc}", EX_CONFIG) from exc
    if not isinstance(value, dict):
        raise CommandError(f"--app-settings {path}: not a JSON object", EX_CONFIG)
    if value.get("_id") == "settings" and isinstance(value.get("settings"), dict):
        inner: dict[str, Any] = value["settings"]
        return inner
    return value


async def app_settings_from_db(settings: Settings) -> dict[str, Any]:
    async with open_couch(settings) as couch:
        await require_db(couch)
        app = await load_app_settings(couch)
    if app.source is None:
        raise CommandError(
            f"no CHT app settings in {settings.couch.redacted}: point COUCH_URL at CHT's "
            "database, or give them with --app-settings FILE",
            EX_CONFIG,
        )
    if app.problem:
        raise CommandError(f"CHT app settings: {app.problem}", EX_CONFIG)
    return app.values


def build_report(
    app_settings: dict[str, Any],
    message: str,
    *,
    sender: str = DEFAULT_FROM,
    message_id: str | None = None,
    locale: str | None = None,
) -> tuple[dict[str, Any], str | None]:
    """The document the webhook would store, and the parser's error if it had to fall back."""
    data: dict[str, Any] = {"from": sender, "message": message}
    if message_id is not None:
        data["gateway_ref"] = message_id
    problem: str | None = None
    try:
        doc = create_by_form(data, settings=app_settings, locale=locale)
    except JsError as exc:
        # The webhook keeps such a message as free text rather than lose it: show that.
        problem = f"CHT's SMS parser fails on this message ({exc})"
        doc = create_by_form(data, settings={**app_settings, "forms": {}}, locale=locale)
    except RecordError as exc:
        raise CommandError(exc.public_message, EX_USAGE) from exc
    if message_id is not None:
        doc = {"_id": doc_id_for(message_id), **doc}
    return doc, problem


async def run_parse(
    settings: Settings | None,
    *,
    message: str,
    out: TextIO,
    err: TextIO,
    sender: str = DEFAULT_FROM,
    message_id: str | None = None,
    locale: str | None = None,
    app_settings_file: str | None = None,
) -> int:
    """`cht-rapidpro parse`: print the report as indented JSON.

    Returns 0, or 1 when CHT's parser throws on the message (the free-text document the
    daemon would store instead is printed, and the error goes to `err`).
    """
    if app_settings_file is not None:
        app_settings = read_app_settings_file(app_settings_file)
    else:
        if settings is None:
            raise CommandError("no settings to find the CHT database with", EX_CONFIG)
        app_settings = await app_settings_from_db(settings)
    doc, problem = build_report(
        app_settings, message, sender=sender, message_id=message_id, locale=locale
    )
    out.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    if problem:
        err.write(f"{problem}: the daemon would store it as free text (shown above)\n")
        return EX_FAILED
    return EX_OK


# -- what the daemon writes for a message of RapidPro's log ------------------------------------


def _row_json(row: Message) -> dict[str, Any]:
    return {
        "id": row.id,
        "uuid": row.uuid,
        "direction": row.direction,
        "status": row.status,
        "broadcast": row.broadcast,
        "flow": {"uuid": row.flow.uuid, "name": row.flow.name} if row.flow else None,
        "created_on": row.created_on.isoformat() if row.created_on else None,
    }


async def run_parse_rapidpro(
    settings: Settings, *, message_id: int, out: TextIO, err: TextIO
) -> int:
    """`cht-rapidpro parse --rapidpro-message ID`: what the daemon writes (or wrote) for one
    message of RapidPro's log: the mirror of an outgoing message it did not send, the report
    of an incoming SMS of a CHT flow, and whether it is in CouchDB. Nothing is written."""
    async with open_couch(settings) as couch:
        await require_db(couch)
        app = await load_app_settings(couch)
        url = sms_settings(app.values).get("rapidpro", {}).get("url")
        token = (await read_credential(couch, creds.OUTGOING)).value
        if not isinstance(url, str) or not url or not token:
            raise CommandError(
                "asking RapidPro needs sms.rapidpro.url in the app settings and the credential "
                "rapidpro:outgoing (cht-rapidpro check says which is missing)",
                EX_CONFIG,
            )
        target = Target(url=URL(url), token=token)
        row, run = await _fetch(settings, target, message_id)
        host = target.url.host or "rapidpro"
        if row.direction == "out":
            result = await _outgoing(couch, row, host)
        else:
            result = await _incoming(couch, settings, app.values, row, run)
    out.write(json.dumps({"rapidpro_message": _row_json(row), **result}, indent=2,
                         ensure_ascii=False) + "\n")  # fmt: skip
    if result.get("note"):
        err.write(f"{result['note']}\n")
    return EX_OK


async def _fetch(settings: Settings, target: Target, message_id: int) -> tuple[Message, Run | None]:
    timeout_s = min(settings.send_timeout_s, COMMAND_COUCH_TIMEOUT_S)
    async with aiohttp.ClientSession() as session:
        client = RapidProClient(session, Budget({}), timeout_s=timeout_s)
        try:
            found: list[Message] = []
            async with contextlib.aclosing(client.messages(target, message_id=message_id)) as pages:
                async for page in pages:
                    found = [r for r in page if r.id == message_id]
                    break
            if not found:
                raise CommandError(f"RapidPro lists no message {message_id}", EX_FAILED)
            row = found[0]
            run = None
            if row.direction == "in" and row.flow is not None and row.created_on is not None:
                runs: list[Run] = []
                after = row.created_on - timedelta(minutes=5)
                async with contextlib.aclosing(
                    client.runs(target, flow=row.flow.uuid, after=after)
                ) as listing:
                    async for run_page in listing:
                        runs += run_page
                item = IncomingRow.of(row)
                run = pair_runs([item], runs).get(row.id) if item else None
        except GatewayError as exc:
            raise CommandError(f"RapidPro: {exc}", EX_UNAVAILABLE) from exc
    return row, run


async def _outgoing(couch: CouchClient, row: Message, host: str) -> dict[str, Any]:
    if row.broadcast is not None and await couch.has_view(*REF_VIEW):
        rows = await couch.view(*REF_VIEW, keys=[row.broadcast, str(row.broadcast)])
        cht_ids = sorted({str(r["id"]) for r in rows if isinstance(r.get("id"), str)})
        ours = [i for i in cht_ids if not i.startswith(MIRROR_REF_PREFIX)]
        if ours:
            return {"what": "sent by this daemon", "doc_id": ours[0], "in_couchdb": True,
                    "document": await couch.get(ours[0])}  # fmt: skip
    doc_id = mirror_id(host, row.id)
    existing = await couch.get(doc_id)
    if existing is not None:
        return {"what": "mirrored", "doc_id": doc_id, "in_couchdb": True, "document": existing}
    contact = None
    phone = recipient(row.urn)
    if phone and await couch.has_view("medic-client", "contacts_by_phone"):
        rows = await couch.view(
            "medic-client", "contacts_by_phone", keys=[phone], include_docs=True, limit=1
        )
        if rows and isinstance(rows[0].get("doc"), dict):
            contact = minify(rows[0]["doc"])
    doc = mirror_doc(row, host=host, contact=contact)
    return {
        "what": "to be mirrored (with CHT_RAPIDPRO_MIRROR_OUTGOING=true)",
        "doc_id": doc_id,
        "in_couchdb": False,
        "document": doc,
        "note": None if doc else "no number or text: it is not mirrored",
    }


async def _incoming(
    couch: CouchClient,
    settings: Settings,
    app_settings: dict[str, Any],
    row: Message,
    run: Run | None,
) -> dict[str, Any]:
    found = identity(
        row, run, mode=settings.incoming_id, waited_s=float("inf"), pair_wait_s=PAIR_WAIT_S
    )
    docs = await couch.get_many([doc_id_for(i) for i in found.candidates])
    note = None
    if row.flow is None or row.flow.uuid not in settings.incoming_flows:
        note = "its flow is not in CHT_RAPIDPRO_INCOMING_FLOWS: the daemon does not recover it"
    if docs:
        doc_id = sorted(docs)[0]
        return {"what": "stored", "doc_id": doc_id, "in_couchdb": True,
                "document": docs[doc_id], "note": note}  # fmt: skip
    sender = webhook_from(row.urn)
    if found.store_as is None or sender is None or not row.text:
        reason = found.problem or ("no phone number" if sender is None else "no text")
        return {"what": "not recoverable", "doc_id": None, "in_couchdb": False,
                "document": None, "note": reason}  # fmt: skip
    doc, problem = build_report(app_settings, row.text, sender=sender, message_id=found.store_as)
    doc["reported_date"] = reported_ms(row)
    return {
        "what": "to be recovered",
        "doc_id": doc_id_for(found.store_as),
        "in_couchdb": False,
        "document": doc,
        "note": note or problem,
    }
