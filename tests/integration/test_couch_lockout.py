"""CouchDB 3.4's account lockout (issue 12 item 2), on real CouchDB.

CouchDB locks a user for 5 minutes after 5 failed logins from one address, and then refuses it
(403) whatever the password: `check` with a wrong password must cost one failed login, not four;
`check` must explain a lock; a daemon whose user is locked must wait it out with its keys and
answer the webhook 503, not stop or answer 403. Every test locks a server admin of its own, never
the suite's `admin`.
"""

from __future__ import annotations

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
from support import CouchAdmin, CouchServer

pytestmark = pytest.mark.couchdb_only


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
