"""RapidPro wire objects, reduced to what the gateway reads, parsed at the edge."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from yarl import URL

from ..cht.state import parse_iso


@dataclass(frozen=True, slots=True)
class Target:
    """Where and as whom to call RapidPro: `sms.rapidpro.url` and `rapidpro:outgoing`."""

    url: URL
    token: str = field(repr=False)

    def endpoint(self, name: str) -> URL:
        # CHT joins paths (Node path.join), so a trailing slash or a path prefix in
        # `sms.rapidpro.url` works; keep that.
        base = self.url.with_query(None).with_fragment(None)
        return base.with_path(base.path.rstrip("/") + f"/api/v2/{name}.json")


def stored_text(text: str) -> str:
    """A broadcast text as RapidPro stores and lists it, for comparing with what was posted.

    `BroadcastWriteSerializer.text` is a `TranslatedTextField` whose child is a DRF
    `CharField(max_length=...)` with DRF's default `trim_whitespace=True`: `to_internal_value`
    returns `str(data).strip()` (Python's Unicode whitespace, so `\n`, `\r\n`, `\t` and
    no-break spaces at either end), and that is what the broadcast keeps (temba
    `api/v2/fields.py`, `api/v2/serializers.py`; rest_framework `fields.py` `CharField`). Nothing
    else is normalised: line endings inside the text, Unicode forms and `@` expressions are stored
    as sent (Django keeps the translations as JSON; mailroom's `msg/broadcast` stores them as
    given and evaluates expressions only per message).
    """
    return text.strip()


@dataclass(frozen=True, slots=True)
class Broadcast:
    """A broadcast as returned by POST (201) or listed by GET /broadcasts."""

    id: Any  # int on RapidPro; kept as sent, CHT stores it verbatim as `gateway_ref`
    status: str | None
    urns: tuple[str, ...]
    texts: tuple[str, ...]  # every translation's text
    created_on: datetime | None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Broadcast:
        text = body.get("text")
        if isinstance(text, dict):
            texts = tuple(v for v in text.values() if isinstance(v, str))
        elif isinstance(text, str):
            texts = (text,)
        else:
            texts = ()
        urns = body.get("urns")
        return cls(
            id=body.get("id"),
            status=body.get("status") if isinstance(body.get("status"), str) else None,
            urns=tuple(u for u in urns if isinstance(u, str)) if isinstance(urns, list) else (),
            texts=texts,
            created_on=parse_iso(body.get("created_on")),
        )


@dataclass(frozen=True, slots=True)
class FlowRef:
    """A flow as RapidPro names it in a message or run (`{"uuid", "name"}`)."""

    uuid: str
    name: str | None

    @classmethod
    def from_json(cls, value: Any) -> FlowRef | None:
        if not isinstance(value, dict) or not isinstance(value.get("uuid"), str):
            return None
        name = value.get("name")
        return cls(uuid=value["uuid"], name=name if isinstance(name, str) else None)


@dataclass(frozen=True, slots=True)
class Message:
    """A row of GET /messages (rapidpro-api §4.3): what the log follower reads of it.

    `text` and `contact_name` are health data: never logged.
    """

    id: Any
    broadcast: Any
    urn: str | None = field(repr=False)
    direction: str | None
    status: str | None
    created_on: datetime | None
    uuid: str | None = None  # current dialect only
    text: str | None = field(default=None, repr=False)
    flow: FlowRef | None = None
    contact_uuid: str | None = None
    modified_on: datetime | None = None
    attachments: int = 0

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Message:
        urn = body.get("urn")
        status = body.get("status")
        direction = body.get("direction")
        text = body.get("text")
        contact = body.get("contact")
        attachments = body.get("attachments")
        message_uuid = body.get("uuid")
        return cls(
            id=body.get("id"),
            broadcast=body.get("broadcast"),
            urn=urn if isinstance(urn, str) else None,
            direction=direction if isinstance(direction, str) else None,
            status=status if isinstance(status, str) else None,
            created_on=parse_iso(body.get("created_on")),
            uuid=message_uuid if isinstance(message_uuid, str) and message_uuid else None,
            text=text if isinstance(text, str) else None,
            flow=FlowRef.from_json(body.get("flow")),
            contact_uuid=(
                contact.get("uuid")
                if isinstance(contact, dict) and isinstance(contact.get("uuid"), str)
                else None
            ),
            modified_on=parse_iso(body.get("modified_on")),
            attachments=len(attachments) if isinstance(attachments, list) else 0,
        )


@dataclass(frozen=True, slots=True)
class Run:
    """A row of GET /runs: which contact a flow ran for, when, and its uuid."""

    id: Any
    uuid: str | None
    flow_uuid: str | None
    contact_uuid: str | None
    contact_urn: str | None = field(repr=False)
    started_by_flow_start: bool  # `start` set: not started by an incoming message
    created_on: datetime | None
    modified_on: datetime | None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Run:
        flow = FlowRef.from_json(body.get("flow"))
        contact = body.get("contact") if isinstance(body.get("contact"), dict) else {}
        assert isinstance(contact, dict)
        run_uuid = body.get("uuid")
        return cls(
            id=body.get("id"),
            uuid=run_uuid if isinstance(run_uuid, str) and run_uuid else None,
            flow_uuid=flow.uuid if flow else None,
            contact_uuid=contact.get("uuid") if isinstance(contact.get("uuid"), str) else None,
            contact_urn=contact.get("urn") if isinstance(contact.get("urn"), str) else None,
            started_by_flow_start=bool(body.get("start")),
            created_on=parse_iso(body.get("created_on")),
            modified_on=parse_iso(body.get("modified_on")),
        )
