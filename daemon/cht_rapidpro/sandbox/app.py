"""The sandbox's HTTP side: RapidPro API v2 routes, the `/_sandbox/` control API, start-up.

Faithful (spec §1): `Token`/`Basic` auth answering 403 (never 401) with DRF's details; checks in
RapidPro's order: a bad token is refused while authenticating, then `APIPermission` answers 405
to a method the endpoint lacks (before the anonymous check and before throttling: even an
unauthenticated or throttled DELETE gets 405), then anonymous requests get 403, then the
throttle (a 403 or 405 uses no quota, a 400 does), then the handler. `X-Temba-Org` on
authenticated answers, compact JSON with Unicode unescaped and `Content-Type: application/json`
(no charset, no `Allow` or `Vary` header, as RapidPro answers), suffix-less GET lists answering
`[]`, Django's HTML 404 for unknown URLs (a trailing slash included), cursor pagination with
absolute `next` and `previous` links keeping the filters.

Simplified, on purpose: only JSON request bodies (form and multipart get 415), no session auth
or permissions per role (every valid token may do everything), one workspace (`X-Temba-Org: 1`),
no POST /messages or contact writes, no HTTPS requirement.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import dataclasses
import functools
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import structlog
from aiohttp import web

from . import wire
from .incoming import cht_headers
from .state import (
    BroadcastRecord,
    Contact,
    Fault,
    MessageRecord,
    Sandbox,
    SandboxConfig,
    ThrottledError,
    default_rates,
    throttle_detail,
    throttle_scope,
)

SANDBOX = web.AppKey("sandbox", Sandbox)
NOT_PROVIDED = "Authentication credentials were not provided."
EXCLUSIVE = ("contact", "folder", "label", "broadcast")
SERVER_ERROR = "Server Error. Site administrators have been notified."
NOT_FOUND_HTML = (
    '<!doctype html>\n<html lang="en">\n<head>\n  <title>Not Found</title>\n</head>\n<body>\n'
    "  <h1>Not Found</h1><p>The requested resource was not found on this server.</p>\n"
    "</body>\n</html>\n"
)
FOLDER_STATUSES = {
    "outbox": frozenset({"queued", "errored"}),
    "sent": frozenset({"wired", "sent", "delivered", "read"}),
    "failed": frozenset({"failed"}),
}

log = structlog.get_logger("cht_rapidpro.sandbox")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")
dumps = functools.partial(json.dumps, separators=(",", ":"), ensure_ascii=False)


class ApiError(Exception):
    """An answer other than a DRF validation error, e.g. a 415 or a 500."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def json_response(data: Any, status: int = 200) -> web.Response:
    """DRF's `JSONRenderer` output: compact UTF-8, `Content-Type: application/json` exactly."""
    return web.Response(
        body=dumps(data).encode(), status=status, headers={"Content-Type": "application/json"}
    )


# --- middleware: request log, faults, error pages ------------------------------------------------


@web.middleware
async def sandbox_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Route-independent behaviour: faults and the request log for the API, 400s for control."""
    if request.path.startswith("/_sandbox/"):
        try:
            return await handler(request)
        except (ValueError, TypeError, KeyError) as exc:
            return json_response({"error": f"{type(exc).__name__}: {exc}"}, status=400)
    if not request.path.startswith("/api/"):
        return await _html_404(handler, request)
    return await _api_request(request, handler)


async def _html_404(handler: Handler, request: web.Request) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return web.Response(status=404, text=NOT_FOUND_HTML, content_type="text/html")


async def _api_request(request: web.Request, handler: Handler) -> web.StreamResponse:
    sandbox = request.app[SANDBOX]
    body = await _logged_body(request)
    fault = sandbox.take_fault(request.method, request.path)
    response = await _respond(request, handler, fault)
    status = 0 if response is None else response.status
    sandbox.record_request(request.method, request.path, request.query, status, body)
    log.info("sandbox_request", method=request.method, path=request.path, status=status)
    if response is None:
        if request.transport is not None:
            request.transport.close()
        raise web.HTTPInternalServerError  # never written: the connection is gone
    return response


async def _respond(
    request: web.Request, handler: Handler, fault: Fault | None
) -> web.StreamResponse | None:
    """The answer with `fault` applied (see `Fault`); None to drop the connection."""
    if fault is None:
        return await _html_404(handler, request)
    committed = await _html_404(handler, request) if fault.commit else None
    if fault.delay:
        await asyncio.sleep(fault.delay)
    if fault.drop:
        return None
    if fault.status is not None:
        return fault_response(fault.status, fault.body, fault.retry_after)
    return committed or await _html_404(handler, request)


async def _logged_body(request: web.Request) -> Any:
    """The JSON body of a broadcast POST, kept for `Sandbox.requests` (read once, cached)."""
    if request.method != "POST" or "broadcasts" not in request.path:
        return None
    text = await request.text()
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text


def fault_response(status: int, body: str | None, retry_after: int | None) -> web.Response:
    """RapidPro's text 500, nginx's HTML 5xx pages, or a DRF 429."""
    if status == 429:
        detail, _ = throttle_detail(retry_after)
        response = json_response({"detail": body or detail}, status=429)
        if retry_after is not None:
            response.headers["Retry-After"] = str(retry_after)
        return response
    if status == 500:
        return web.Response(status=500, text=body or SERVER_ERROR, content_type="text/plain")
    reason = web.Response(status=status).reason
    html = (
        f"<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n"
        f"<center><h1>{status} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n"
        "</body>\r\n</html>\r\n"
    )
    return web.Response(status=status, text=body or html, content_type="text/html")


# --- API: auth, throttle, dispatch ---------------------------------------------------------------


def authenticate(header: str | None, tokens: frozenset[str]) -> str | None:
    """None if `Authorization` holds a valid token, else DRF's 403 detail (spec §1.2)."""
    parts = (header or "").split()
    if not parts or parts[0].lower() not in ("token", "basic"):
        return NOT_PROVIDED  # e.g. `Bearer`: ignored, the request is anonymous
    kind = parts[0].lower()
    if len(parts) == 1:
        return f"Invalid {kind} header. No credentials provided."
    if len(parts) > 2:
        what = "Token string" if kind == "token" else "Credentials string"
        return f"Invalid {kind} header. {what} should not contain spaces."
    if kind == "token":
        return None if parts[1] in tokens else "Invalid token"
    try:
        _, _, token = base64.b64decode(parts[1], validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return "Invalid basic header. Credentials not correctly base64 encoded."
    return None if token in tokens else "Invalid token or email"


async def api(request: web.Request) -> web.StreamResponse:
    """`/api/v2/<endpoint>[.json]` in RapidPro's order (DRF `initial`, then the handler).

    Authentication fails only for credentials it cannot accept (no credentials is anonymous);
    `APIPermission` then asks for the method's permission and answers 405 for a method the
    endpoint lacks before it looks at the user; anonymous requests get 403; then the throttle.
    """
    sandbox = request.app[SANDBOX]
    endpoint = request.match_info["endpoint"]
    methods = ENDPOINTS.get(endpoint)
    if methods is None:
        raise web.HTTPNotFound
    detail = authenticate(request.headers.get("Authorization"), sandbox.config.tokens)
    if detail is not None and detail != NOT_PROVIDED:
        return json_response({"detail": detail}, status=403)
    method = methods.get(request.method)
    if method is None:
        response = json_response({"detail": f'Method "{request.method}" not allowed.'}, status=405)
    elif detail is not None:
        return json_response({"detail": detail}, status=403)
    else:
        response = await _authenticated(request, sandbox, endpoint, method)
    if detail is None:
        response.headers["X-Temba-Org"] = "1"
    return response


async def _authenticated(
    request: web.Request, sandbox: Sandbox, endpoint: str, method: ApiHandler
) -> web.Response:
    try:
        sandbox.check_throttle(throttle_scope(endpoint, sandbox.config.dialect))
    except ThrottledError as exc:
        return _throttled(exc.wait, sandbox.config.retry_after_header)
    if request.method == "GET" and not request.path.endswith(".json"):
        return json_response([])  # "a request to browse the endpoint docs" (spec §1.1)
    try:
        return await method(request, sandbox)
    except ApiError as exc:
        return exc.response
    except wire.ValidationError as exc:
        return json_response(exc.errors, status=400)
    except wire.QueryError as exc:
        return json_response({"detail": str(exc)}, status=400)
    except wire.CursorError:
        return json_response({"detail": "Invalid cursor"}, status=404)


def _throttled(wait: float | None, with_header: bool) -> web.Response:
    detail, seconds = throttle_detail(wait if with_header else None)
    response = json_response({"detail": detail}, status=429)
    if seconds is not None:
        response.headers["Retry-After"] = str(seconds)
    return response


async def _json_body(request: web.Request) -> Any:
    """DRF's parsing: no body or no content type gives `{}`; JSON errors are a 400."""
    content_type = request.headers.get("Content-Type")
    if not request.body_exists or content_type is None:
        return {}
    if request.content_type != "application/json":
        detail = f'Unsupported media type "{content_type}" in request.'
        raise ApiError(json_response({"detail": detail}, status=415))
    text = await request.text()
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise wire.ValidationError({"detail": f"JSON parse error - {exc}"}) from None


def _datetime_filters(query: Mapping[str, str]) -> tuple[datetime | None, datetime | None, bool]:
    """`(after, before, unparseable)`: a bad date empties the result instead of a 400."""
    bounds: list[datetime | None] = []
    bad = False
    for name in ("after", "before"):
        value = query.get(name)
        moment = wire.parse_query_datetime(value) if value else None
        bad = bad or (bool(value) and moment is None)
        bounds.append(moment)
    return bounds[0], bounds[1], bad


def _window(rows: list[T], when: Callable[[T], datetime], query: Mapping[str, str]) -> list[T]:
    after, before, bad = _datetime_filters(query)
    if bad:
        return []
    return [
        r
        for r in rows
        if (after is None or when(r) >= after) and (before is None or when(r) <= before)
    ]


def _page(
    request: web.Request,
    rows: Sequence[T],
    key: Callable[[T], wire.SortKey],
    render: Callable[[T], dict[str, Any]],
) -> web.Response:
    """The `{"next","previous","results"}` envelope; links are absolute and keep the filters."""
    cursor = request.query.get("cursor")
    size = request.app[SANDBOX].config.page_size
    page = wire.paginate(rows, key, wire.Cursor.decode(cursor) if cursor else None, size)

    def link(position: wire.Cursor | None) -> str | None:
        return None if position is None else str(request.url.update_query(cursor=position.encode()))

    return json_response(
        {
            "next": link(page.next),
            "previous": link(page.previous),
            "results": [render(row) for row in page.rows],
        }
    )


async def post_broadcast(request: web.Request, sandbox: Sandbox) -> web.Response:
    body = await _json_body(request)
    record = sandbox.create_broadcast(sandbox.validate_broadcast(body), body)
    return json_response(sandbox.broadcast_json(record, record.created_on), status=201)


async def get_broadcasts(request: web.Request, sandbox: Sandbox) -> web.Response:
    query, now = request.query, sandbox.now()
    wanted_id = wire.int_param(query, "id")
    wanted_uuid = wire.uuid_param(query, "uuid") if sandbox.config.dialect == "current" else None
    rows = [
        b
        for b in sandbox.broadcasts
        if sandbox.visible(b.created_on, now)
        and (wanted_id is None or b.id == wanted_id)
        and (wanted_uuid is None or b.uuid == wanted_uuid)
    ]
    rows = _window(rows, lambda b: b.created_on, query)

    def key(b: BroadcastRecord) -> wire.SortKey:
        return b.created_on, b.id

    return _page(request, rows, key, lambda b: sandbox.broadcast_json(b, now))


async def get_messages(request: web.Request, sandbox: Sandbox) -> web.Response:
    """Filters, folders and orderings of `MessagesEndpoint` (spec §4.1-§4.2).

    Candidates come from the store's indexes (an id, a uuid, a broadcast, or the creation-time
    window), so a page costs about the same with a million messages in the workspace.
    """
    query, now, dialect = request.query, sandbox.now(), sandbox.config.dialect
    given = [name for name in EXCLUSIVE if query.get(name)]
    if len(given) > 1:
        raise wire.QueryError(
            "You may only specify one of the contact, folder, label, broadcast parameters"
        )
    wanted_id = wire.int_param(query, "id")
    wanted_uuid = wire.uuid_param(query, "uuid") if dialect == "current" else None
    broadcast = _broadcast_param(query)
    folder = query.get("folder", "").lower()
    after, before, bad = _datetime_filters(query)
    states: dict[int, tuple[str, datetime | None, datetime]] = {}

    def state(m: MessageRecord) -> tuple[str, datetime | None, datetime]:
        found = states.get(m.id)
        if found is None:
            found = states[m.id] = m.state_at(now)
        return found

    def ordering(m: MessageRecord) -> datetime:
        if folder == "sent":  # `-sent_on, -id` (v8.1.37+)
            return state(m)[1] or m.created_on
        if folder == "incoming":  # v9: ordered and windowed on `modified_on`
            return state(m)[2]
        return m.created_on

    def keep(m: MessageRecord) -> bool:
        if not sandbox.listed(m, now):
            return False
        if wanted_id is not None and m.id != wanted_id:
            return False
        if wanted_uuid is not None and m.uuid != wanted_uuid:
            return False
        if broadcast is not None and m.broadcast != broadcast:
            return False
        if query.get("contact") and m.contact.uuid != query["contact"]:
            return False
        if query.get("label"):
            return False  # no labels in the sandbox
        if folder and not _in_folder(m, state(m)[0], folder, dialect):
            return False
        moment = ordering(m)
        return (after is None or moment >= after) and (before is None or moment <= before)

    rows: list[MessageRecord]
    if bad:
        rows = []
    elif wanted_id is not None:
        found = sandbox.message_by_id(wanted_id)
        rows = [found] if found else []
    elif wanted_uuid is not None:
        found = sandbox.message_by_uuid(wanted_uuid)
        rows = [found] if found else []
    elif broadcast is not None:
        rows = sorted(sandbox.broadcast_messages(broadcast), key=lambda m: (m.created_on, m.id))
    elif folder in ("sent", "incoming"):
        # Not ordered by creation: every candidate is looked at (rare queries).
        rows = [m for m in sandbox.messages if keep(m)]
        return _page(request, rows, lambda m: (ordering(m), m.id), render(sandbox, now))
    else:
        rows = sandbox.messages_between(after, before)
    return _page_walk(request, rows, lambda m: (m.created_on, m.id), keep, render(sandbox, now))


def render(sandbox: Sandbox, now: datetime) -> Callable[[MessageRecord], dict[str, Any]]:
    return lambda m: sandbox.message_json(m, now)


def _broadcast_param(query: Mapping[str, str]) -> int | None:
    if not query.get("broadcast"):
        return None
    try:
        return int(query["broadcast"])
    except ValueError:
        # Straight into `filter(broadcast_id=...)`: Django raises, DRF answers 500 (§4.1).
        raise ApiError(web.Response(status=500, text=SERVER_ERROR)) from None


def _in_folder(message: MessageRecord, status: str, folder: str, dialect: str) -> bool:
    if message.direction == "in":
        if folder == "flows":
            return message.flow is not None
        if folder == "inbox":
            return message.flow is None
        return folder == "incoming" and dialect == "v9"
    return status in FOLDER_STATUSES.get(folder, ())


def _page_walk(
    request: web.Request,
    rows: Sequence[T],
    key: Callable[[T], wire.SortKey],
    keep: Callable[[T], bool],
    render: Callable[[T], dict[str, Any]],
) -> web.Response:
    """`_page` for rows already sorted oldest first: the page is found from the cursor by
    bisection and filled by walking from there, so a page never looks at the whole list."""
    cursor_text = request.query.get("cursor")
    cursor = wire.Cursor.decode(cursor_text) if cursor_text else None
    size = request.app[SANDBOX].config.page_size

    def walk(start: int, step: int) -> Iterator[int]:
        index = start
        while 0 <= index < len(rows):
            if keep(rows[index]):
                yield index
            index += step

    if cursor is not None and cursor.reverse:
        # The page just newer than the cursor: walk up, then read it newest first.
        start = bisect.bisect_right(rows, cursor.position, key=key)
        found = list(itertools.islice(walk(start, 1), size))
        found.reverse()
    else:
        start = len(rows) if cursor is None else bisect.bisect_left(rows, cursor.position, key=key)
        found = list(itertools.islice(walk(start - 1, -1), size))
    if not found:
        return json_response({"next": None, "previous": None, "results": []})
    newest, oldest = found[0], found[-1]
    has_next = next(walk(oldest - 1, -1), None) is not None
    has_previous = cursor is not None and next(walk(newest + 1, 1), None) is not None

    def link(position: wire.Cursor | None) -> str | None:
        return None if position is None else str(request.url.update_query(cursor=position.encode()))

    return json_response(
        {
            "next": link(wire.Cursor(key(rows[oldest])) if has_next else None),
            "previous": link(
                wire.Cursor(key(rows[newest]), reverse=True) if has_previous else None
            ),
            "results": [render(rows[index]) for index in found],
        }
    )


async def get_runs(request: web.Request, sandbox: Sandbox) -> web.Response:
    """`RunsEndpoint`: filters `flow`, `contact`, `id`, `uuid` (current), `responded`, and
    `before`/`after` on `modified_on`; ordered `-modified_on, -id` (spec §1.5)."""
    query, now = request.query, sandbox.now()
    wanted_id = wire.int_param(query, "id")
    wanted_uuid = wire.uuid_param(query, "uuid") if sandbox.config.dialect == "current" else None
    responded = query.get("responded", "").lower()
    rows = [
        r
        for r in sandbox.runs
        if sandbox.visible(r.created_on, now)
        and r.modified_on <= now
        and (wanted_id is None or r.id == wanted_id)
        and (wanted_uuid is None or r.uuid == wanted_uuid)
        and (not query.get("flow") or r.flow.get("uuid") == query["flow"])
        and (not query.get("contact") or r.contact.uuid == query["contact"])
        and (responded not in ("true", "false") or r.responded == (responded == "true"))
    ]
    rows = _window(rows, lambda r: r.modified_on, query)
    return _page(request, rows, lambda r: (r.modified_on, r.id), sandbox.run_json)


async def get_contacts(request: web.Request, sandbox: Sandbox) -> web.Response:
    """A minimal contact list: `uuid` and `urn` filters, newest modified first."""
    query = request.query
    urn = wire.normalize_urn(query["urn"], sandbox.config.default_country) if "urn" in query else ""
    rows = [
        c
        for c in sandbox.contacts
        if query.get("uuid", c.uuid) == c.uuid and (not urn or urn in c.urns)
    ]
    rows = _window(rows, lambda c: c.created_on, query)

    def key(c: Contact) -> wire.SortKey:
        return c.created_on, c.id

    return _page(request, rows, key, sandbox.contact_json)


ApiHandler = Callable[[web.Request, Sandbox], Awaitable[web.Response]]
ENDPOINTS: dict[str, dict[str, ApiHandler]] = {
    "broadcasts": {"GET": get_broadcasts, "POST": post_broadcast},
    "messages": {"GET": get_messages},
    "contacts": {"GET": get_contacts},
    "runs": {"GET": get_runs},
}


# --- control API ---------------------------------------------------------------------------------

control = web.RouteTableDef()


async def _body(request: web.Request) -> dict[str, Any]:
    body = await request.json() if request.body_exists else {}
    if not isinstance(body, dict):
        raise TypeError("the body must be a JSON object")
    return body


@control.get("/_sandbox/state")
async def control_state(request: web.Request) -> web.Response:
    return json_response(request.app[SANDBOX].snapshot())


@control.post("/_sandbox/script")
async def control_script(request: web.Request) -> web.Response:
    body = await _body(request)
    request.app[SANDBOX].script(body["urn"], body.get("outcome"))
    return json_response({"scripts": request.app[SANDBOX].snapshot()["scripts"]})


@control.post("/_sandbox/faults")
async def control_add_fault(request: web.Request) -> web.Response:
    fault = request.app[SANDBOX].add_fault(**await _body(request))
    return json_response(dataclasses.asdict(fault), status=201)


@control.delete("/_sandbox/faults")
async def control_clear_faults(request: web.Request) -> web.Response:
    request.app[SANDBOX].clear_faults()
    return json_response({"faults": []})


@control.post("/_sandbox/advance")
async def control_advance(request: web.Request) -> web.Response:
    sandbox = request.app[SANDBOX]
    sandbox.advance(float((await _body(request))["seconds"]))
    return json_response({"now": wire.iso(sandbox.now())})


@control.post("/_sandbox/reset")
async def control_reset(request: web.Request) -> web.Response:
    request.app[SANDBOX].reset()
    return json_response({"reset": True})


@control.post("/_sandbox/incoming")
async def control_incoming(request: web.Request) -> web.Response:
    """`{"url","from","text"}` plus `headers` or a CHT `token`, optionally `run_uuid`, `flow`
    (`{"uuid","name"}`) and `body` (`cht` or `message`)."""
    body = await _body(request)
    headers = dict(body.get("headers") or {})
    if body.get("token"):
        headers = {**cht_headers(str(body["token"])), **headers}
    extra: dict[str, Any] = {}
    if isinstance(body.get("flow"), dict):
        extra["flow"] = {"uuid": str(body["flow"]["uuid"]), "name": str(body["flow"]["name"])}
    outcome = await request.app[SANDBOX].deliver_incoming(
        str(body["url"]),
        from_=str(body["from"]),
        text=str(body["text"]),
        headers=headers,
        run_uuid=body.get("run_uuid"),
        body=str(body.get("body") or "cht"),
        **extra,
    )
    return json_response(outcome.as_json())


@control.post("/_sandbox/outgoing")
async def control_outgoing(request: web.Request) -> web.Response:
    """Messages RapidPro sends itself: `{"urns", "text"}`, optionally `flow` (`{"uuid",
    "name"}`: a flow's reply, no broadcast), `broadcast` (true: made in RapidPro's UI) and
    `outcome` (statuses after `queued`)."""
    body = await _body(request)
    flow = body.get("flow")
    made = request.app[SANDBOX].send_from_rapidpro(
        [str(urn) for urn in body["urns"]],
        str(body["text"]),
        flow={"uuid": str(flow["uuid"]), "name": str(flow["name"])} if flow else None,
        broadcast=bool(body.get("broadcast")),
        outcome=body.get("outcome"),
    )
    return json_response({"messages": [m.id for m in made]}, status=201)


@control.post("/_sandbox/config")
async def control_config(request: web.Request) -> web.Response:
    """Change config fields; `"rates": "default"` picks the (new) dialect's real rates."""
    sandbox = request.app[SANDBOX]
    changes = await _body(request)
    if changes.get("rates") == "default":
        changes["rates"] = default_rates(changes.get("dialect", sandbox.config.dialect))
    if "default_outcome" in changes:
        changes["default_outcome"] = tuple(changes["default_outcome"])
    sandbox.configure(**changes)
    return json_response(sandbox.snapshot()["config"])


def build_app(sandbox: Sandbox) -> web.Application:
    """The sandbox's aiohttp application, serving `sandbox`."""
    app = web.Application(middlewares=[sandbox_middleware])
    app[SANDBOX] = sandbox
    app.router.add_route("*", "/api/v2/{endpoint:[a-z_]+}.json", api)
    app.router.add_route("*", "/api/v2/{endpoint:[a-z_]+}", api)
    app.router.add_routes(control)
    return app


@dataclass(frozen=True, slots=True)
class RunningSandbox:
    """A sandbox serving HTTP: `url` is the base URL (no trailing slash)."""

    url: str
    sandbox: Sandbox

    @property
    def token(self) -> str:
        return min(self.sandbox.config.tokens)


@asynccontextmanager
async def start_sandbox(
    config: SandboxConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[RunningSandbox]:
    """Serve a new `Sandbox` on `host:port` (0: any free port) until the block exits."""
    sandbox = Sandbox(config)
    runner = web.AppRunner(build_app(sandbox), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        if bound_host in ("0.0.0.0", "::"):  # noqa: S104 - reporting, not binding
            bound_host = "127.0.0.1"
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        yield RunningSandbox(f"http://{shown}:{bound_port}", sandbox)
    finally:
        await runner.cleanup()
