"""The operations commands (`check`, `send`, `parse`, `status`) against the test server and the
RapidPro sandbox: in process through their async functions, and as `python -m cht_rapidpro`
processes for the argparse layer and the exit codes."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import socket
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cht_rapidpro.commands import (
    EX_CONFIG,
    EX_FAILED,
    EX_OK,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    CommandError,
    run_check,
    run_parse,
    run_send,
    run_status,
)
from cht_rapidpro.commands import status as status_module
from cht_rapidpro.config import Settings
from cht_rapidpro.sandbox import DEFAULT_TOKEN
from pouchdb import free_port
from support import (
    INCOMING_KEY,
    MESSAGES_BY_STATE,
    CouchAdmin,
    all_tasks,
    eventually,
    install_cht_views,
    message_doc,
    rapidpro_settings,
    start_daemon_process,
    task,
)

FORM = {
    "meta": {"code": "VISIT", "label": "Home visit"},
    "fields": {
        "name": {"labels": {"short": "Name"}, "type": "string", "required": True},
        "age": {"labels": {"short": "Age"}, "type": "integer", "required": True},
    },
}
SECRET_TEXT = "Dear Amina, your test result is ready"


def settings_for(couch: CouchAdmin, **env: str) -> Settings:
    """The settings an operator's shell would give: COUCH_URL, the listener, overrides."""
    return Settings.from_env(
        {"COUCH_URL": couch.couch_url, "CHT_RAPIDPRO_PORT": str(free_port()), **env}
    )


def port_of(daemon: Any) -> str:
    return daemon.url.rsplit(":", 1)[1]


async def healthz(url: str) -> int:
    try:
        async with aiohttp.ClientSession() as session, session.get(url + "/healthz") as resp:
            return resp.status
    except aiohttp.ClientError:
        return 0


async def healthy_daemon(daemon_factory: Any, **env: str) -> Any:
    daemon = await daemon_factory(**env)
    await eventually(lambda: healthz(daemon.url), lambda s: s == 200, what="daemon healthy")
    return daemon


async def check_json(settings: Settings) -> tuple[int, dict[str, dict[str, Any]]]:
    out = io.StringIO()
    code = await run_check(settings, out=out, as_json=True)
    report = json.loads(out.getvalue())
    assert report["ok"] is (code == EX_OK)
    return code, {row["name"]: row for row in report["checks"]}


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`python -m cht_rapidpro ARGS` as an operator runs it: exit code, stdout, stderr."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CHT_RAPIDPRO_")}
    clean.pop("COUCH_URL", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cht_rapidpro", *args,
        env={**clean, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 50)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# -- check ------------------------------------------------------------------------------------


async def test_check_all_ok_with_cht_set_up_and_a_running_daemon(
    cht: CouchAdmin, daemon_factory: Any
) -> None:
    await cht.put_vault_credential("rapidpro:incoming", INCOMING_KEY)
    await install_cht_views(cht)  # CHT's design documents, as a CHT 4.x instance has them
    daemon = await healthy_daemon(daemon_factory)
    settings = settings_for(cht, CHT_RAPIDPRO_PORT=port_of(daemon))

    out = io.StringIO()
    assert await run_check(settings, out=out) == EX_OK
    table = out.getvalue()
    assert "all 12 checks passed" in table
    assert "FAIL" not in table and "fix:" not in table
    assert "CHT 4.x vault" in table
    for secret in (DEFAULT_TOKEN, INCOMING_KEY, "secret"):  # nor CouchDB's admin password
        assert secret not in table

    code, rows = await check_json(settings)
    assert code == EX_OK
    assert {name: row["status"] for name, row in rows.items()} == {
        "couch.reachable": "ok",
        "couch.admin": "ok",
        "couch.db": "ok",
        "cht.settings": "ok",
        "cht.outgoing_service": "ok",
        "cht.rapidpro_url": "ok",
        "cht.phone_numbers": "ok",
        "cht.credential.rapidpro:outgoing": "ok",
        "cht.credential.rapidpro:incoming": "ok",
        "rapidpro.api": "ok",
        "rapidpro.log": "ok",
        "daemon.listener": "ok",
    }
    assert rows["rapidpro.log"]["detail"].startswith("mirroring off, recovery off")


async def test_check_reports_mirroring_recovery_and_missing_views(cht: CouchAdmin) -> None:
    flow = "0b6a9f6e-2f4b-4c3e-8c9a-1d2e3f4a5b6c"
    settings = settings_for(
        cht, CHT_RAPIDPRO_MIRROR_OUTGOING="true", CHT_RAPIDPRO_INCOMING_FLOWS=flow
    )
    _, rows = await check_json(settings)
    row = rows["rapidpro.log"]
    assert row["status"] == "warn"
    assert row["detail"].startswith("mirroring on, recovery for 1 flow (webhook ids: run)")
    assert "threaded by number only" in row["detail"] and "kept in memory" in row["detail"]


async def test_check_explains_a_wrong_token(cht: CouchAdmin, rapidpro: Any) -> None:
    await cht.put_vault_credential("rapidpro:outgoing", "not-the-token")
    await cht.put_vault_credential("rapidpro:incoming", INCOMING_KEY)
    settings = settings_for(cht)  # no daemon on its port: a warning, not a failure

    code, rows = await check_json(settings)
    assert code == EX_FAILED
    api = rows["rapidpro.api"]
    assert api["status"] == "fail"
    assert "403" in api["detail"] and "Invalid token" in api["detail"]
    assert "rapidpro:outgoing" in api["fix"]
    assert rows["cht.credential.rapidpro:outgoing"]["status"] == "ok"  # present, just wrong
    assert rows["daemon.listener"]["status"] == "warn"
    assert "cht-rapidpro run" in rows["daemon.listener"]["fix"]
    # The sandbox did see exactly one cheap GET, with the wrong token; it is never printed.
    [request] = rapidpro.sandbox.requests
    assert (request.method, request.status) == ("GET", 403)
    out = io.StringIO()
    assert await run_check(settings, out=out) == EX_FAILED
    assert "not-the-token" not in out.getvalue()
    assert "FAIL" in out.getvalue() and "1 check failed, 1 warning" in out.getvalue()


@pytest.mark.parametrize("wrong", ["refused", "not-found"])
async def test_check_explains_a_wrong_rapidpro_url(
    cht: CouchAdmin, rapidpro: Any, wrong: str
) -> None:
    url = f"http://127.0.0.1:{free_port()}" if wrong == "refused" else rapidpro.url + "/wrong"
    await cht.put_settings(**rapidpro_settings(url))
    code, rows = await check_json(settings_for(cht))
    assert code == EX_FAILED
    api = rows["rapidpro.api"]
    assert api["status"] == "fail"
    assert "sms.rapidpro.url" in api["fix"]
    expected = "cannot connect" if wrong == "refused" else "404"
    assert expected in api["detail"]
    assert rows["cht.rapidpro_url"]["status"] == "ok"  # well-formed, just not RapidPro


async def test_check_lists_every_cht_side_problem_with_its_fix(
    couch: CouchAdmin, config_credential: Any
) -> None:
    # A db with app settings for another sender, no RapidPro URL, one 3.x credential.
    await couch.put_settings(sms={"outgoing_service": "medic-gateway"})
    await config_credential("rapidpro:incoming", INCOMING_KEY)
    code, rows = await check_json(settings_for(couch))
    assert code == EX_FAILED
    service = rows["cht.outgoing_service"]
    assert service["status"] == "fail"
    assert "'medic-gateway'" in service["detail"]
    assert "set sms.outgoing_service to 'cht-rapidpro'" in service["fix"]
    assert "Do not set CHT_RAPIDPRO_SERVICE" in service["fix"]  # medic-gateway is CHT's own
    assert rows["cht.rapidpro_url"]["status"] == "fail"
    assert "set sms.rapidpro.url in app settings" in rows["cht.rapidpro_url"]["fix"]
    outgoing = rows["cht.credential.rapidpro:outgoing"]
    assert outgoing["status"] == "fail"
    assert "not set" in outgoing["detail"]
    assert "/api/v1/credentials/rapidpro:outgoing" in outgoing["fix"]
    incoming = rows["cht.credential.rapidpro:incoming"]
    assert incoming["status"] == "ok"
    assert "CHT 3.x config section medic-credentials" in incoming["detail"]
    assert rows["rapidpro.api"]["status"] == "skip"


async def test_check_fails_loudly_unless_exactly_one_sender(cht: CouchAdmin, rapidpro: Any) -> None:
    """Issue 12: CHT's own sender acts while sms.outgoing_service names one of its services."""
    settings = rapidpro_settings(rapidpro.url)
    settings["sms"]["outgoing_service"] = "rapidpro"  # the old README's set-up
    await cht.put_settings(**settings)
    # With the daemon's defaults CHT sends alone: one sender, but not the one meant.
    code, rows = await check_json(settings_for(cht))
    row = rows["cht.outgoing_service"]
    assert (code, row["status"]) == (EX_FAILED, "fail")
    assert "CHT's own sender sends the messages" in row["detail"]
    assert "set sms.outgoing_service to 'cht-rapidpro'" in row["fix"]
    assert "Do not set CHT_RAPIDPRO_SERVICE to 'rapidpro'" in row["fix"]

    # Both on CHT's service: two senders. The daemon refuses to run; check says why and how.
    env = {"COUCH_URL": cht.couch_url, "CHT_RAPIDPRO_SERVICE": "rapidpro"}
    code, out, _ = await cli("check", env={**env, "CHT_RAPIDPRO_PORT": str(free_port())})
    assert code == EX_FAILED, out
    [line] = [line for line in out.splitlines() if line.split()[1:2] == ["sms.outgoing_service"]]
    assert line.startswith("FAIL") and "TWO SENDERS" in line, out
    assert "CHT_RAPIDPRO_NO_CHT_API=true instead only if no CHT API serves" in out
    code, _, err = await cli("run", env=env)
    assert code == EX_CONFIG
    assert "'rapidpro' is one of CHT's own outgoing services" in err

    # Allowed only where the operator states that no CHT API serves the database.
    code, rows = await check_json(
        settings_for(cht, CHT_RAPIDPRO_SERVICE="rapidpro", CHT_RAPIDPRO_NO_CHT_API="true")
    )
    assert rows["cht.outgoing_service"]["status"] == "warn"

    # The set-up the README shows: the daemon sends, CHT stays idle.
    settings["sms"]["outgoing_service"] = "cht-rapidpro"
    await cht.put_settings(**settings)
    code, rows = await check_json(settings_for(cht))
    assert rows["cht.outgoing_service"]["status"] == "ok"


async def test_check_without_settings_doc_and_with_a_wrong_password(couch: CouchAdmin) -> None:
    code, rows = await check_json(settings_for(couch))
    assert code == EX_FAILED
    assert rows["cht.settings"]["status"] == "fail"
    assert "CHT's own database" in rows["cht.settings"]["fix"]
    assert rows["cht.outgoing_service"]["status"] == "skip"

    wrong = couch.couch_url.replace(f":{couch.server.password}@", ":wrong-password@")
    code, rows = await check_json(Settings.from_env({"COUCH_URL": wrong}))
    assert code == EX_FAILED
    assert rows["couch.reachable"]["status"] == "ok"
    assert rows["couch.admin"]["status"] == "fail"
    assert "server admin" in rows["couch.admin"]["fix"]


async def test_check_as_a_process_prints_the_table_and_exits_1(cht: CouchAdmin) -> None:
    # No incoming key: one failure; no daemon: a warning.
    env = {"COUCH_URL": cht.couch_url, "CHT_RAPIDPRO_PORT": str(free_port())}
    code, out, _ = await cli("check", env=env)
    assert code == EX_FAILED
    lines = out.splitlines()
    assert lines[0].split() == ["STATUS", "CHECK", "DETAIL"]
    failed = [line for line in lines if line.startswith("FAIL")]
    assert len(failed) == 1 and "credential rapidpro:incoming" in failed[0]
    assert any(line.startswith("warn") and "webhook listener" in line for line in lines)
    assert DEFAULT_TOKEN not in out


# -- send -------------------------------------------------------------------------------------


async def test_send_follows_the_message_to_delivered(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    await healthy_daemon(daemon_factory)
    out, err = io.StringIO(), io.StringIO()
    code = await run_send(
        settings_for(cht), to="0712 345 678", text="hello from the CLI", timeout_s=30,
        out=out, err=err,
    )  # fmt: skip
    printed = out.getvalue()
    assert code == EX_OK, printed
    assert err.getvalue() == ""
    lines = printed.splitlines()
    assert lines[0].startswith("created message ")
    assert "to +254712345678 (from '0712 345 678')" in lines[0]
    assert lines[-1].startswith("delivered: pending → forwarded-to-gateway → received-by-gateway")
    assert lines[-1].endswith("→ delivered")
    shown = [line.split()[1] for line in lines[1:-1]]
    assert shown[:3] == ["pending", "forwarded-to-gateway", "received-by-gateway"]
    assert shown[-1] == "delivered"
    assert any("(broadcast " in line for line in lines)

    # The document is the one CHT's web app writes, and RapidPro got the normalised number.
    [doc] = [d for d in await cht.all_docs() if d.get("kujua_message")]
    assert doc["_id"] in lines[0]
    assert (doc["type"], doc["form"], doc["sent_by"], doc["errors"]) == (
        "data_record", None, "cht-rapidpro", []
    )  # fmt: skip
    [message] = doc["tasks"][0]["messages"]
    assert set(message) == {"sent_by", "to", "message", "uuid"}
    assert (message["to"], message["message"]) == ("+254712345678", "hello from the CLI")
    assert doc["tasks"][0]["state_history"][0]["state"] == "pending"
    [posted] = rapidpro.sandbox.posted_broadcasts()
    assert list(posted.urns) == ["tel:+254712345678"]


async def test_send_reports_a_number_that_cannot_be_sent_as_failed(
    cht: CouchAdmin, daemon_factory: Any
) -> None:
    await healthy_daemon(daemon_factory)
    out = io.StringIO()
    code = await run_send(
        settings_for(cht), to="12", text="too short", timeout_s=30, out=out, err=io.StringIO()
    )
    printed = out.getvalue()
    assert code == EX_FAILED, printed
    assert "failed: Invalid phone number" in printed
    assert printed.splitlines()[-1] == "pending → forwarded-to-gateway → failed"


async def test_no_full_number_in_the_daemon_log_or_the_reasons(
    cht: CouchAdmin, rapidpro: Any, tmp_path: Path
) -> None:
    """Issue 12: `send --to '+2547'` logged RapidPro's `Invalid URN: tel:+2547. ...` verbatim."""
    log = tmp_path / "daemon.log"
    daemon = await start_daemon_process(cht.couch_url, log, instance="private")
    try:
        # Refused by the daemon itself: RapidPro would take it as a local number.
        out = io.StringIO()
        code = await run_send(settings_for(cht), to="+2547", text="short", timeout_s=30, out=out,
                              err=io.StringIO())  # fmt: skip
        assert code == EX_FAILED, out.getvalue()
        # Refused by RapidPro, whose 400 repeats the number.
        refusal = "Invalid URN: tel:+254712345678. Ensure phone numbers contain country codes."
        rapidpro.sandbox.add_fault(method="POST", path="broadcasts.json", status=400,
                                   body=json.dumps({"urns": {"0": [refusal]}}))  # fmt: skip
        code = await run_send(settings_for(cht), to="+254712345678", text="hello", timeout_s=30,
                              out=out, err=io.StringIO())  # fmt: skip
        assert code == EX_FAILED, out.getvalue()
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(daemon.wait(), 15) == 0
    details = [t.get("state_details") for d in await cht.all_docs() for t in all_tasks(d)]
    assert sorted(details) == [
        "Invalid phone number under CHT's rules (default_country_code 254, phone_validation "
        "none): not sent",
        "urns.0: Invalid URN: tel:***678. Ensure phone numbers contain country codes.",
    ]
    text = log.read_text()
    assert text.count("event=message_rejected") == 2, text
    assert "to=***547" in text and "to=***678" in text
    assert "+2547" not in text and "254712345678" not in text and "712345678" not in text


async def test_send_without_a_daemon_times_out_still_pending(cht: CouchAdmin) -> None:
    settings = rapidpro_settings("https://textit.com", phone_validation="full")
    settings["sms"]["outgoing_service"] = "rapidpro"  # CHT's own sender (not running here)
    await cht.put_settings(**settings)
    out, err = io.StringIO(), io.StringIO()
    code = await run_send(
        settings_for(cht),
        to="+254712345678", text="nobody sends this", timeout_s=0.5, out=out, err=err,
    )  # fmt: skip
    assert code == EX_TEMPFAIL
    assert "no final state after 0.5s: the message is pending" in out.getvalue()
    # The operator is told why this daemon would not send it.
    assert "sms.outgoing_service is 'rapidpro', not 'cht-rapidpro'" in err.getvalue()
    [doc] = [d for d in await cht.all_docs() if d.get("kujua_message")]
    assert [t["state"] for t in all_tasks(doc)] == ["pending"]


async def test_send_usage_and_unreachable_couch_exit_codes(couch: CouchAdmin) -> None:
    with pytest.raises(CommandError) as usage:
        await run_send(settings_for(couch), to="  ", text="x", out=io.StringIO(), err=io.StringIO())
    assert usage.value.exit_code == EX_USAGE
    code, _, err = await cli("send", "--to", "+254712345678", env={"COUCH_URL": couch.couch_url})
    assert code == EX_USAGE
    assert "--text" in err
    down = f"http://admin:pass@127.0.0.1:{free_port()}/medic"
    code, _, err = await cli("send", "--to", "+254712345678", "--text", "x",
                             env={"COUCH_URL": down})  # fmt: skip
    assert code == EX_UNAVAILABLE
    assert "CouchDB at http://127.0.0.1:" in err and "pass" not in err
    assert await couch.all_docs() == []


# -- parse ------------------------------------------------------------------------------------


async def test_parse_prints_the_report_the_webhook_would_store(couch: CouchAdmin) -> None:
    await couch.put_settings(forms={"VISIT": FORM}, default_country_code=254)
    out, err = io.StringIO(), io.StringIO()
    code = await run_parse(
        settings_for(couch), message="VISIT Amina 34", sender="0712345678", out=out, err=err
    )
    assert code == EX_OK
    doc = json.loads(out.getvalue())
    assert out.getvalue().startswith('{\n  "')  # indented
    assert doc["type"] == "data_record"
    assert doc["form"] == "VISIT"
    assert doc["fields"] == {"name": "Amina", "age": 34}
    assert doc["errors"] == []
    assert doc["from"] == "+254712345678"
    assert doc["sms_message"]["message"] == "VISIT Amina 34"
    assert await couch.all_docs() == [await couch.get("settings")]  # nothing written

    out = io.StringIO()
    assert await run_parse(settings_for(couch), message="VISIT", out=out, err=err) == EX_OK
    missing = json.loads(out.getvalue())
    assert [e["code"] for e in missing["errors"]] == ["sys.missing_fields"]
    assert missing["from"] == "unknown"


async def test_parse_with_an_app_settings_file_needs_no_database(tmp_path: Path) -> None:
    path = tmp_path / "app_settings.json"
    path.write_text(json.dumps({"forms": {"VISIT": FORM}}))
    code, out, _ = await cli(
        "parse", "--app-settings", str(path), "--id", "run-7", "--from", "+254712345678",
        "VISIT Juma 5",
    )  # fmt: skip
    assert code == EX_OK
    doc = json.loads(out)
    assert doc["_id"] == "sms-rapidpro:run-7"
    assert doc["fields"] == {"name": "Juma", "age": 5}
    assert doc["sms_message"]["gateway_ref"] == "run-7"

    code, _, err = await cli("parse", "VISIT Juma 5")  # neither COUCH_URL nor a file
    assert code == EX_CONFIG
    assert "COUCH_URL: required" in err


# -- status -----------------------------------------------------------------------------------


async def status_json(settings: Settings) -> dict[str, Any]:
    out = io.StringIO()
    assert await run_status(settings, out=out, as_json=True) == EX_OK
    report: dict[str, Any] = json.loads(out.getvalue())
    return report


async def put_message_docs(couch: CouchAdmin) -> None:
    """3 pending (one very old, two sharing a view key), 1 forwarded-to-gateway, 2 delivered,
    1 failed, 1 scheduled without messages yet (a translation_key task), and 1 message
    without text (CHT's view skips it)."""
    old = message_doc([task("+254700000001", SECRET_TEXT)], doc_id="the-oldest")
    old["reported_date"] = 1_000_000  # ms: January 1970, the oldest by far
    docs = [
        old,
        message_doc([task("+254700000002", SECRET_TEXT),
                     task("+254700000003", SECRET_TEXT, state="delivered"),
                     task("+254700000008", SECRET_TEXT)]),
        message_doc([task("+254700000004", SECRET_TEXT, state="forwarded-to-gateway"),
                     task("+254700000005", SECRET_TEXT, state="failed")]),
        message_doc([task("+254700000006", SECRET_TEXT, state="delivered")],
                    [{"state": "scheduled", "due": "2030-01-01T08:00:00.000Z",
                      "translation_key": "visit.reminder"}]),
        message_doc([task("+254700000007", "", state="pending")]),
    ]  # fmt: skip
    await couch.bulk(docs)


EXPECTED_COUNTS = {
    "pending": 3,
    "forwarded-to-gateway": 1,
    "delivered": 2,
    "failed": 1,
    "scheduled": 1,
}


async def test_status_counts_messages_by_state_by_scan_and_by_cht_view(
    couch: CouchAdmin, monkeypatch: pytest.MonkeyPatch
) -> None:
    await put_message_docs(couch)
    settings = settings_for(couch)
    scanned = await status_json(settings)
    assert scanned["messages"]["method"] == "scan"
    assert scanned["messages"]["by_state"] == EXPECTED_COUNTS
    assert scanned["messages"]["oldest_unsent_due_ms"] == 1_000_000
    assert scanned["messages"]["oldest_unsent_doc_id"] == "the-oldest"
    assert scanned["messages"]["oldest_unsent_age_s"] > 1_000_000_000

    await couch.put(
        {"_id": "_design/medic", "views": {"messages_by_state": {"map": MESSAGES_BY_STATE}}}
    )
    # Small pages, so that rows of one key span pages (paging must neither skip nor repeat).
    monkeypatch.setattr(status_module, "VIEW_PAGE", 2)
    viewed = await status_json(settings)
    assert viewed["messages"]["method"] == "view"
    assert viewed["messages"]["by_state"] == EXPECTED_COUNTS
    assert viewed["messages"]["oldest_unsent_due_ms"] == 1_000_000
    assert viewed["messages"]["oldest_unsent_doc_id"] == "the-oldest"

    out = io.StringIO()
    await run_status(settings, out=out)
    text = out.getvalue()
    assert "CHT's view medic/messages_by_state" in text
    assert re.search(r"^ +pending +3$", text, re.MULTILINE), text
    assert "daemon       not running" in text
    # Only numbers: no message text, no phone numbers.
    assert SECRET_TEXT not in text and "+2547000000" not in text


async def test_status_shows_checkpoints_and_the_running_daemon(
    cht: CouchAdmin, daemon_factory: Any
) -> None:
    # The daemon follows the feed but does not send (another service is configured).
    daemon = await healthy_daemon(daemon_factory, CHT_RAPIDPRO_SERVICE="another-daemon")
    await cht.put(message_doc([task("+254700000001", SECRET_TEXT)]))

    async def caught_up() -> bool:
        # Nothing changed after the checkpoint (CouchDB 3 spells one position in many ways:
        # a checkpoint never equals `update_seq` as a string, so ask the feed).
        point = await cht.get("_local/cht-rapidpro.test-0")
        if point is None:
            return False
        since = urllib.parse.quote(json.dumps(point["seq"]) if not isinstance(point["seq"], str)
                                   else point["seq"])  # fmt: skip
        after = await cht.request("GET", f"/{cht.db}/_changes?since={since}&limit=1")
        return after["results"] == []

    await eventually(caught_up, what="checkpoint at the tip")
    # A stopped replica's checkpoint, three changes ago.
    info = await cht.request("GET", f"/{cht.db}")
    await cht.put({"_id": "_local/cht-rapidpro.old-replica", "seq": info["update_seq"],
                   "saved_at": "2026-01-01T00:00:00.000Z"})  # fmt: skip
    await cht.bulk([message_doc([task(f"+25470000001{n}", SECRET_TEXT)]) for n in range(3)])
    await eventually(caught_up, what="checkpoint at the tip again")

    settings = settings_for(cht, CHT_RAPIDPRO_INSTANCE="old-replica",
                            CHT_RAPIDPRO_PORT=port_of(daemon))  # fmt: skip
    report = await status_json(settings)
    points = {p["instance"]: p for p in report["checkpoints"]}
    assert set(points) == {"old-replica", "test-0"}  # test-0 through its presence document
    assert (points["old-replica"]["pending_changes"], points["old-replica"]["caught_up"]) == (
        3,
        False,
    )
    assert points["test-0"]["caught_up"] is True
    assert points["test-0"]["replica"].startswith("announced itself")
    assert report["messages"]["by_state"] == {"pending": 4}
    assert report["daemon"]["running"] is True
    assert report["daemon"]["health"] == "ok"
    assert report["daemon"]["in_flight"] == 0
    # No throttle in the sandbox, but the default client-side budgets still count down.
    assert set(report["daemon"]["budget_left"]) == {"broadcasts", "messages", "runs"}

    code, out, _ = await cli("status", env={"COUCH_URL": cht.couch_url,
                                            "CHT_RAPIDPRO_INSTANCE": "old-replica",
                                            "CHT_RAPIDPRO_PORT": port_of(daemon)})  # fmt: skip
    assert code == EX_OK
    assert "old-replica (CHT_RAPIDPRO_INSTANCE): 3 changed documents behind" in out
    assert "test-0: caught up with the database" in out
    assert f"daemon       http://127.0.0.1:{port_of(daemon)}: ok" in out
    assert SECRET_TEXT not in out


@pytest.mark.couchdb_only
async def test_status_counts_a_checkpoints_backlog_in_one_request_on_couchdb(
    couch: CouchAdmin, monkeypatch: pytest.MonkeyPatch
) -> None:
    # CouchDB's `pending` gives the exact backlog at once; paging through the feed (the only
    # way on pouchdb-server) stops at PENDING_CHANGES_CAP.
    monkeypatch.setattr(status_module, "PENDING_CHANGES_CAP", 4)
    monkeypatch.setattr(status_module, "CHANGES_PAGE", 2)
    info = await couch.request("GET", f"/{couch.db}")
    await couch.put({"_id": "_local/cht-rapidpro.behind", "seq": info["update_seq"],
                     "saved_at": "2026-01-01T00:00:00.000Z"})  # fmt: skip
    await couch.bulk([message_doc([task(f"+25470000002{n}", SECRET_TEXT)]) for n in range(9)])
    report = await status_json(settings_for(couch, CHT_RAPIDPRO_INSTANCE="behind"))
    [point] = report["checkpoints"]
    assert (point["pending_changes"], point["pending_capped"], point["caught_up"]) == (
        9,
        False,
        False,
    )


async def test_status_exit_codes_for_a_missing_db_and_bad_settings(couch: CouchAdmin) -> None:
    missing = couch.couch_url.rsplit("/", 1)[0] + "/no_such_db"
    code, _, err = await cli("status", env={"COUCH_URL": missing})
    assert code == EX_CONFIG
    assert "check the database name at the end of COUCH_URL" in err
    code, _, err = await cli("status", env={"COUCH_URL": couch.couch_url,
                                            "CHT_RAPIDPRO_PORT": "not-a-port"})  # fmt: skip
    assert code == EX_CONFIG
    assert "CHT_RAPIDPRO_PORT" in err


# -- the argparse layer -----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["check", "send", "parse", "status"])
async def test_every_command_has_help_with_its_exit_codes(command: str) -> None:
    code, out, _ = await cli(command, "--help")
    assert code == EX_OK
    assert out.startswith(f"usage: cht-rapidpro {command}")
    assert "exit codes:" in out
    assert f"{EX_USAGE}  wrong arguments" in out


async def test_the_main_help_lists_every_exit_code_run_can_return() -> None:
    code, out, _ = await cli("--help")
    assert code == EX_OK
    codes = out.split("exit codes:", 1)[1]
    for number in (EX_OK, EX_FAILED, EX_USAGE, EX_UNAVAILABLE, 70, 71, EX_TEMPFAIL, EX_CONFIG):
        assert re.search(rf"^  {number} +\S", codes, re.MULTILINE), number
    # Each number setting shows its range.
    assert "CHT_RAPIDPRO_CLOCK_SKEW\n" in out and "(from 0 to 86400 seconds; default: 120.0)" in out


@pytest.mark.parametrize("command", ["check-config", "run", "status"])
async def test_config_may_follow_the_command(tmp_path: Path, command: str) -> None:
    config = tmp_path / "f.toml"
    config.write_text("port = 0\n")  # refused: so every command stops at the settings
    code, _, err = await cli(command, "--config", str(config),
                             env={"COUCH_URL": "http://a:b@127.0.0.1:9/medic"})  # fmt: skip
    assert code == EX_CONFIG, err
    assert "port (config file): '0' is out of range" in err


async def test_check_config_reads_a_config_given_after_the_command(tmp_path: Path) -> None:
    config = tmp_path / "f.toml"
    config.write_text("port = 6010\n")
    env = {"COUCH_URL": "http://a:b@127.0.0.1:9/medic"}
    for args in (("check-config", "--config", str(config)),
                 ("--config", str(config), "check-config")):  # fmt: skip
        code, out, err = await cli(*args, env=env)
        assert code == EX_OK, err
        assert json.loads(out)["listen_port"] == 6010


# -- settings `run` cannot use: exit 78 from check-config and run, never a traceback ------


BAD_SETTINGS = [
    {"CHT_RAPIDPRO_CLOCK_SKEW": "nan"},
    {"CHT_RAPIDPRO_CLOCK_SKEW": "1e300"},
    {"CHT_RAPIDPRO_CLAIM_TTL": "1e300"},
    {"CHT_RAPIDPRO_MAX_TRACKING": "1e300"},
    {"CHT_RAPIDPRO_SENT_GRACE": "1e300"},
    {"CHT_RAPIDPRO_POLL_INTERVAL": "1e308"},
    {"CHT_RAPIDPRO_PORT": "0"},
    {"CHT_RAPIDPRO_PORT": "\u0665\u0669\u0668\u0669"},
    {"CHT_RAPIDPRO_POLL_INTERVAL": "1_0"},
    {"CHT_RAPIDPRO_HOST": "999.1.1.1"},
    {"CHT_RAPIDPRO_HOST": "no-such-host.invalid"},  # RFC 6761: never resolves
    {"CHT_RAPIDPRO_HOST": "192.0.2.1"},  # TEST-NET-1: not an address of this machine
    {"COUCH_URL": "http://admin:x/Secret@127.0.0.1:5984/medic"},
]


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize("bad", BAD_SETTINGS, ids=lambda bad: "=".join(next(iter(bad.items()))))
async def test_settings_run_cannot_use_exit_78(
    couch: CouchAdmin, command: str, bad: dict[str, str]
) -> None:
    env = {"COUCH_URL": couch.couch_url, "CHT_RAPIDPRO_PORT": str(free_port()), **bad}
    code, out, err = await cli(command, env=env)
    assert code == EX_CONFIG, out + err
    assert err.startswith("configuration error (1 problem):\n"), err
    assert next(iter(bad)) + ": " in err
    assert "Traceback" not in out + err and "Secret" not in err


def _latin1_couch_url(path: Path) -> dict[str, str]:
    path.write_bytes(b"http://admin:s\xe9cret@127.0.0.1:5984/medic\n")
    return {"COUCH_URL_FILE": str(path)}


def _utf16_couch_url(path: Path) -> dict[str, str]:
    path.write_bytes("http://admin:secret@127.0.0.1:5984/medic\n".encode("utf-16"))
    return {"COUCH_URL_FILE": str(path)}


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize("source", ["latin-1 file", "utf-16 file", "latin-1 toml", "utf-16 toml"])
async def test_settings_that_are_not_utf8_exit_78_with_a_clear_message(
    tmp_path: Path, command: str, source: str
) -> None:
    args: tuple[str, ...] = (command,)
    env = {"COUCH_URL": "http://admin:secret@127.0.0.1:5984/medic"}
    if source == "latin-1 file":
        env = _latin1_couch_url(tmp_path / "couch_url")
    elif source == "utf-16 file":
        env = _utf16_couch_url(tmp_path / "couch_url")
    else:
        config = tmp_path / "f.toml"
        text = 'instance = "caf\u00e9"\n'
        config.write_bytes(text.encode("latin-1" if source == "latin-1 toml" else "utf-16"))
        args = (command, "--config", str(config))
    code, out, err = await cli(*args, env=env)
    assert code == EX_CONFIG, out + err
    assert "Traceback" not in out + err
    assert ("is UTF-16 text" if "utf-16" in source else "is not UTF-8 text (byte 0xe9") in err
    assert "save it as UTF-8" in err


# -- check: what it did not say (issue item 10) -----------------------------------------------


@pytest.mark.parametrize(
    ("app_settings", "status", "details"),
    [
        (
            {"default_country_code": 254, "phone_validation": "partial"},
            "ok",
            ["default_country_code 254 (KE), phone_validation 'partial'"],
        ),
        (
            {},
            "warn",
            [
                "default_country_code is not set: a number without its +country code cannot "
                "be normalised",
                "phone_validation is not set: CHT validates numbers fully ('full')",
            ],
        ),
        (
            {"default_country_code": "+254", "phone_validation": "Partial"},
            "warn",
            ["default_country_code '+254' is not a country calling code as CHT reads it"],
        ),
        (
            {"default_country_code": "254", "phone_validation": "strict"},
            "warn",
            ["phone_validation 'strict' is not 'full', 'partial' or 'none'"],
        ),
    ],
    ids=["set", "missing", "plus-sign", "unknown-mode"],
)
async def test_check_warns_about_phone_settings(
    couch: CouchAdmin, app_settings: dict[str, Any], status: str, details: list[str]
) -> None:
    await couch.put_settings(sms={"outgoing_service": "cht-rapidpro"}, **app_settings)
    _, rows = await check_json(settings_for(couch))
    row = rows["cht.phone_numbers"]
    assert row["status"] == status
    for detail in details:
        assert detail in row["detail"]
    if status == "warn":
        assert "in app settings" in row["fix"]
    if "default_country_code" in details[0] and status == "warn":
        assert "e.g. 254" in row["fix"]


async def test_check_shows_an_unset_outgoing_service_as_not_set(couch: CouchAdmin) -> None:
    await couch.put_settings(sms={"rapidpro": {"url": "https://textit.com"}})
    _, rows = await check_json(settings_for(couch))
    row = rows["cht.outgoing_service"]
    assert row["status"] == "fail"
    assert row["detail"].startswith("is not set, but CHT_RAPIDPRO_SERVICE is 'cht-rapidpro'")
    assert "None" not in row["detail"]


async def test_check_says_how_long_a_silent_couchdb_was_waited_for() -> None:
    """A server that accepts the connection and never answers: `TimeoutError: ` said
    nothing."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://admin:pass@127.0.0.1:{silent.getsockname()[1]}/medic"
        settings = Settings.from_env(
            {"COUCH_URL": url, "CHT_RAPIDPRO_COUCH_TIMEOUT": "0.5",
             "CHT_RAPIDPRO_PORT": str(free_port())}
        )  # fmt: skip
        _, rows = await check_json(settings)
    row = rows["couch.reachable"]
    assert row["status"] == "fail"
    assert row["detail"].endswith(": server info: no answer within 0.5 s"), row["detail"]
