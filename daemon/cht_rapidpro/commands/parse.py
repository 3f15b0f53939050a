"""`cht-rapidpro parse`: the report an incoming SMS would become, with the current SMS forms.

It builds the document exactly as the webhook does (`create_by_form` with the app settings,
the free-text fallback when CHT's parser throws) and prints it; nothing is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

from ..cht.records import JsError, RecordError, create_by_form
from ..config import Settings
from ..incoming import doc_id_for
from .common import (
    EX_CONFIG,
    EX_FAILED,
    EX_OK,
    EX_USAGE,
    CommandError,
    load_app_settings,
    open_couch,
    require_db,
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
