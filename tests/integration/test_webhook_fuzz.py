"""Property-based fuzz of the webhook: any body, any headers, never a 5xx, never a stray document.

The daemon runs as its own process (hypothesis drives plain synchronous HTTP); the test db is
set up through the same server the rest of the suite uses.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import INCOMING_KEY, CouchServer

PATHS = ["/api/v2/sms/rapidpro/incoming-messages", "/api/v1/sms/radpidpro/incoming-messages"]


class Sync:
    """Blocking admin calls for the set-up (no event loop in hypothesis tests)."""

    def __init__(self, server: CouchServer) -> None:
        self.server = server
        token = base64.b64encode(f"{server.user}:{server.password}".encode()).decode()
        self.headers = {
            "Authorization": f"Basic {token}",
            "Accept": "application/json",
            "Accept-Encoding": "identity",
            "Content-Type": "application/json",
        }

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.server.url + path, data=data, method=method, headers=self.headers
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.loads(resp.read() or b"null")


@pytest.fixture(scope="module")
def fuzz_daemon(
    couch_server: CouchServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    admin = Sync(couch_server)
    db = f"fuzz_{uuid.uuid4().hex[:10]}"
    admin.call("PUT", f"/{db}")
    admin.call("PUT", f"/{db}/settings", {"settings": {"forms": {}, "default_country_code": 254}})
    node = admin.call("GET", "/_membership")["all_nodes"][0]
    key_path = f"/_node/{node}/_config/medic-credentials/rapidpro:incoming"
    admin.call("PUT", key_path, INCOMING_KEY)
    log = tmp_path_factory.mktemp("fuzz") / "daemon.log"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cht_rapidpro", "run"],
            env={
                **os.environ,
                "COUCH_URL": couch_server.db_url(db),
                "CHT_RAPIDPRO_PORT": str(port),
                "CHT_RAPIDPRO_LOG_FORMAT": "logfmt",
                "CHT_RAPIDPRO_INSTANCE": "fuzz",
            },
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_listening(port, log, proc)
        yield {"port": port, "db": db, "admin": admin}
    finally:
        proc.terminate()
        proc.wait(15)
        admin.call("DELETE", key_path)
        admin.call("DELETE", f"/{db}")


def _wait_listening(port: int, log: Any, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            connection.close()
        time.sleep(0.05)
    raise AssertionError(f"daemon did not start:\n{log.read_text()}")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
#: Text with a lone surrogate in it (JSON's "\ud800"), which CouchDB refuses to store.
any_text = st.tuples(
    st.text(max_size=10), st.characters(categories=["Cs"]), st.text(max_size=10)
).map("".join)
message_like = st.fixed_dictionaries(
    {},
    optional={
        "id": json_values | st.uuids().map(str) | any_text,
        "from": json_values | st.just("+254712345678") | any_text,
        "content": json_values | st.text(max_size=200) | any_text,
        "sent_timestamp": json_values | st.datetimes().map(lambda moment: moment.isoformat()),
    },
)
bodies = (
    message_like.map(lambda body: json.dumps(body).encode())
    | json_values.map(lambda value: json.dumps(value).encode())
    | st.binary(max_size=300)
)
auth_headers = st.one_of(
    st.just(f"Token {INCOMING_KEY}"),
    st.just(f"Token  {INCOMING_KEY}"),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60),
    st.none(),
)
content_types = st.sampled_from(
    ["application/json", "text/plain", "application/x-www-form-urlencoded", None]
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.sampled_from(PATHS),
    body=bodies,
    authorization=auth_headers,
    content_type=content_types,
)
def test_webhook_never_fails_and_writes_only_what_it_saves(
    fuzz_daemon: Any, path: str, body: bytes, authorization: str | None, content_type: str | None
) -> None:
    headers = {}
    if authorization is not None:
        headers["Authorization"] = authorization
    if content_type is not None:
        headers["Content-Type"] = content_type
    admin, db = fuzz_daemon["admin"], fuzz_daemon["db"]
    before = admin.call("GET", f"/{db}")["doc_count"]
    connection = http.client.HTTPConnection("127.0.0.1", fuzz_daemon["port"], timeout=10)
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        status, answer = response.status, json.loads(response.read())
    finally:
        connection.close()
    after = admin.call("GET", f"/{db}")["doc_count"]
    assert status in (200, 400, 403, 413), (status, answer)
    if status == 200:
        assert answer in ({"saved": 1}, {"saved": 0, "duplicate": True})
        assert after - before == answer["saved"]
    else:
        assert answer["code"] == status and answer["error"]
        assert after == before
