"""CouchDB 3.4's account lockout (issue 12 item 2), on real CouchDB.

CouchDB locks a user for 5 minutes after 5 failed logins from one address, and then refuses it
(403) whatever the password: `check` with a wrong password must cost one failed login, not four;
`check` must explain a lock; a daemon whose user is locked must wait it out with its keys and
answer the webhook 503, not stop or answer 403. Every test locks a server admin of its own, never
the suite's `admin`.
"""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from cht_rapidpro.commands import EX_FAILED, EX_UNAVAILABLE, CommandError, run_check, run_status
from cht_rapidpro.config import Settings
from couchdb_release import LOCKOUT_REASON, LOCKOUT_THRESHOLD
from pouchdb import HEADERS, free_port
from support import INCOMING_KEY, CouchAdmin, CouchServer, eventually

pytestmark = pytest.mark.couchdb_only

V2 = "/api/v2/sms/rapidpro/incoming-messages"
AUTH = {"Authorization": f"Token {INCOMING_KEY}"}


@pytest.fixture
async def own_admin(couch: CouchAdmin) -> AsyncIterator[CouchServer]:
    """A server admin for this test alone: the one it locks."""
    user = f"lock-{uuid.uuid4().hex[:8]}"
    yield await couch.set_admin(user, uuid.uuid4().hex)
    await couch.delete_config("admins", user)


async def login(server: CouchServer, password: str) -> tuple[int, str]:
    """`GET /` as `server.user` with `password`: (status, CouchDB's reason)."""
    auth = {"Authorization": aiohttp.encode_basic_auth(server.user, password)}
    async with (
        aiohttp.ClientSession(headers=HEADERS) as session,
        session.get(server.url + "/", headers=auth) as resp,
    ):
        body = await resp.json(content_type=None)
        return resp.status, str(body.get("reason", ""))


async def failed_logins_left(server: CouchServer) -> int:
    """How many more failed logins CouchDB takes before it locks the user (this locks it)."""
    for attempt in range(LOCKOUT_THRESHOLD + 1):
        status, reason = await login(server, "wrong-password")
        if status == 403:
            assert reason == LOCKOUT_REASON
            return attempt
        assert status == 401, (status, reason)
    raise AssertionError(f"{server.user} not locked after {LOCKOUT_THRESHOLD + 1} failed logins")


async def lock(server: CouchServer) -> None:
    await failed_logins_left(server)
    status, reason = await login(server, server.password)
    assert (status, reason) == (403, LOCKOUT_REASON)  # the right password no longer helps


async def check_rows(couch_url: str) -> tuple[int, dict[str, dict[str, Any]]]:
    out = io.StringIO()
    settings = Settings.from_env({"COUCH_URL": couch_url, "CHT_RAPIDPRO_PORT": str(free_port())})
    code = await run_check(settings, out=out, as_json=True)
    return code, {row["name"]: row for row in json.loads(out.getvalue())["checks"]}


async def test_check_with_a_wrong_password_costs_one_failed_login(
    couch: CouchAdmin, own_admin: CouchServer
) -> None:
    wrong = CouchServer(own_admin.url, own_admin.user, "wrong-password").db_url(couch.db)
    code, rows = await check_rows(wrong)
    # CouchDB counted exactly one failed login (it used to be four: two runs locked the user).
    assert await failed_logins_left(own_admin) == LOCKOUT_THRESHOLD - 1
    assert code == EX_FAILED
    assert rows["couch.admin"]["status"] == "fail"
    assert "lockout" in rows["couch.admin"]["fix"]
    skipped = {name for name, row in rows.items() if "no further attempts" in row["detail"]}
    assert skipped == {
        "couch.db",
        "cht.credential.rapidpro:outgoing",
        "cht.credential.rapidpro:incoming",
        "rapidpro.log",
    }


async def test_check_and_status_explain_a_locked_user(
    couch: CouchAdmin, own_admin: CouchServer
) -> None:
    await lock(own_admin)
    code, rows = await check_rows(own_admin.db_url(couch.db))  # the right password
    assert code == EX_FAILED
    assert rows["couch.reachable"]["status"] == "ok"
    admin = rows["couch.admin"]
    assert admin["status"] == "fail"
    assert f"user {own_admin.user!r} is locked" in admin["detail"]
    assert "after 5 failed logins from one address" in admin["detail"]
    assert admin["fix"].startswith("wait: CouchDB unlocks the user by itself 5 minutes after")
    for name in ("couch.db", "cht.credential.rapidpro:outgoing"):
        assert rows[name]["status"] == "skip"

    settings = Settings.from_env({"COUCH_URL": own_admin.db_url(couch.db)})
    with pytest.raises(CommandError) as refused:
        await run_status(settings, out=io.StringIO())
    assert refused.value.exit_code == EX_UNAVAILABLE
    assert "temporarily locked" in refused.value.message
    assert "wait" in refused.value.message


async def post(url: str, body: dict[str, Any], token: dict[str, str]) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", **token}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=json.dumps(body), headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def test_a_locked_out_daemon_keeps_its_keys_answers_503_and_resumes(
    couch: CouchAdmin, own_admin: CouchServer, daemon_factory: Any
) -> None:
    await couch.put_settings(forms={})
    await couch.put_vault_credential("rapidpro:incoming", INCOMING_KEY)
    daemon = await daemon_factory(COUCH_URL=own_admin.db_url(couch.db))
    gateway = daemon.gateway
    await eventually(lambda: asyncio.sleep(0, gateway.health()), lambda h: h[0],
                     what="daemon healthy")  # fmt: skip
    body = {"id": "before-the-lock", "from": "+50689999999", "content": "hi"}
    assert await post(daemon.url + V2, body, AUTH) == (200, {"saved": 1})

    # Someone else's wrong password for the daemon's user, from this host.
    await lock(own_admin)
    body["id"] = "during-the-lock"
    status, answer = await post(daemon.url + V2, body, AUTH)
    assert (status, answer["code"]) == (503, 503), answer
    assert gateway.cht.incoming_key == INCOMING_KEY
    # The feed sees the lock too, and waits: it used to exit 78, which systemd never restarts.
    # It sees it at its next request: on CouchDB 3 a long poll with heartbeats ignores its
    # timeout and lasts until a change comes, so make one.
    await couch.put({"_id": "a-change", "type": "anything"})
    await eventually(
        lambda: asyncio.sleep(0, gateway.health()),
        lambda h: any("temporarily locked" in problem for problem in h[1]),
        what="health naming the lock",
    )
    await asyncio.sleep(1.0)  # a few more feed and credential attempts
    assert daemon.fatal == []
    assert gateway.cht.incoming_key == INCOMING_KEY
    status, answer = await post(daemon.url + V2, body, {"Authorization": "Token not-the-key"})
    assert (status, answer["code"]) == (503, 503), answer

    # The lock ends (here: lockout switched off rather than waiting 5 minutes).
    await couch.set_config("chttpd_auth_lockout", "mode", "off")
    try:
        # The feed's next long poll only ends with a change (see the note on heartbeats above).
        await couch.put({"_id": "another-change", "type": "anything"})
        await eventually(lambda: asyncio.sleep(0, gateway.health()), lambda h: h[0],
                         what="daemon healthy again")  # fmt: skip
        assert await post(daemon.url + V2, body, AUTH) == (200, {"saved": 1})
    finally:
        await couch.delete_config("chttpd_auth_lockout", "mode")
    assert daemon.fatal == []
