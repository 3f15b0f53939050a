"""The demo: a local CouchDB-compatible server, the RapidPro sandbox and the daemon, at work.

Run through `scripts/demo` (which does the set-up first). It starts pouchdb-server with a
`medic` db set up as a CHT 4.x instance would be (app settings, the RapidPro credential in the
vault), the sandbox in this process, and `cht-rapidpro run` as a child process; then it writes
outgoing messages the way CHT does and prints each one's states as the daemon moves them from
`pending` to `delivered`. `--once` stops after the first batch is final (used by the tests).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test server runner and document builders

from cht_rapidpro import logs  # noqa: E402
from cht_rapidpro.sandbox import DEFAULT_TOKEN, SandboxConfig, start_sandbox  # noqa: E402
from pouchdb import PouchServer, free_port  # noqa: E402
from support import CouchAdmin, CouchServer, message_doc, rapidpro_settings, task  # noqa: E402

FINAL = ("delivered", "failed")
INCOMING_KEY = "demo-incoming-key"
WEBHOOK = "/api/v2/sms/rapidpro/incoming-messages"
DEMO_FORMS = {
    "VISIT": {
        "meta": {"code": "VISIT", "label": "Home visit"},
        "fields": {
            "patient_id": {
                "labels": {"short": "Patient ID", "tiny": "id"},
                "type": "string",
                "required": True,
            },
            "symptom": {"labels": {"short": "Symptom", "tiny": "s"}, "type": "string"},
        },
    }
}
TEXTS = [
    "Reminder: immunisation visit for baby Achieng is due tomorrow.",
    "ANC visit due this week for household 12.",
    "Please submit the monthly stock report.",
]


def say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')}  {text}", flush=True)


async def wait_healthy(port: int, proc: asyncio.subprocess.Process) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            if proc.returncode is not None:
                raise SystemExit(f"the daemon exited with code {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise SystemExit("the daemon did not become healthy; see its log")


async def follow(couch: CouchAdmin, doc_ids: list[str], *, once: bool) -> bool:
    """Print every state change of the demo messages; with `once`, return when all are final."""
    seen: dict[str, list[str]] = {}
    while True:
        for number, doc_id in enumerate(doc_ids, 1):
            doc = await couch.get(doc_id)
            if doc is None:
                continue
            item = doc["tasks"][0]
            history = [entry["state"] for entry in item.get("state_history", [])]
            if history != seen.get(doc_id):
                seen[doc_id] = history
                ref = item.get("gateway_ref")
                shown = " → ".join(history)
                say(f"message {number:>2}: {shown}" + (f"  (broadcast {ref})" if ref else ""))
        if once and len(seen) == len(doc_ids) and all(h and h[-1] in FINAL for h in seen.values()):
            return all(h[-1] == "delivered" for h in seen.values())
        await asyncio.sleep(0.2)


async def incoming(couch: CouchAdmin, rapidpro: Any, port: int) -> bool:
    """A health worker's SMS report, delivered the way a RapidPro flow calls the webhook."""
    text = "VISIT 12345 fever"
    say(f"simulated incoming SMS through the sandbox's flow webhook: {text!r}")
    outcome = await rapidpro.sandbox.deliver_incoming(
        f"http://127.0.0.1:{port}{WEBHOOK}",
        from_="+254712345678",
        text=text,
        headers={"Authorization": f"Token {INCOMING_KEY}", "Content-Type": "application/json"},
    )
    say(f"webhook answered {outcome.status} {outcome.body}")
    doc = await couch.get(f"sms-rapidpro:{outcome.run_uuid}")
    if doc is None:
        say("no report was stored")
        return False
    say(f"stored report {doc['_id']}: form={doc.get('form')} fields={doc.get('fields')}")
    return outcome.status == 200


async def demo(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="cht-rapidpro-demo-"))
    pouch = PouchServer(workdir)
    pouch.start()
    say(f"CouchDB-compatible server (pouchdb-server) on {pouch.url}  (admin/secret)")
    couch = CouchAdmin(CouchServer(pouch.url), "medic")
    proc: asyncio.subprocess.Process | None = None
    try:
        async with start_sandbox(SandboxConfig(step_seconds=args.step)) as rapidpro:
            say(f"RapidPro sandbox on {rapidpro.url}  (token {DEFAULT_TOKEN[:6]}…)")
            await couch.create_db()
            await couch.put_settings(**rapidpro_settings(rapidpro.url, forms=DEMO_FORMS))
            await couch.put_vault_credential("rapidpro:outgoing", DEFAULT_TOKEN)
            await couch.put_vault_credential("rapidpro:incoming", INCOMING_KEY)
            say("medic db seeded: app settings (sms.outgoing_service=cht-rapidpro), credentials")

            port = free_port()
            log_path = workdir / "daemon.log"
            env = {
                **os.environ,
                "COUCH_URL": couch.couch_url,
                "CHT_RAPIDPRO_PORT": str(port),
                "CHT_RAPIDPRO_POLL_INTERVAL": "1",
                "CHT_RAPIDPRO_LOG_FORMAT": "logfmt",
            }
            with log_path.open("wb") as log:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "cht_rapidpro", "run",
                    env=env, stdout=log, stderr=asyncio.subprocess.STDOUT,
                )  # fmt: skip
            await wait_healthy(port, proc)
            say(f"cht-rapidpro daemon running on :{port}; its log: {log_path}")
            say(
                f"health: http://127.0.0.1:{port}/healthz   metrics: http://127.0.0.1:{port}/metrics"
            )
            cli = f"COUCH_URL={couch.couch_url} CHT_RAPIDPRO_PORT={port} .venv/bin/cht-rapidpro"
            say("try, in another terminal while this runs:")
            print(f"    {cli} check", flush=True)
            print(f"    {cli} send --to +254712345678 --text 'Hello from the demo'", flush=True)
            print(f"    {cli} status", flush=True)

            batch = 0
            while True:
                batch += 1
                doc_ids = []
                for n in range(args.messages):
                    phone = f"+2547{batch:02d}{n:06d}"
                    doc = message_doc([task(phone, TEXTS[n % len(TEXTS)])])
                    await couch.put(doc)
                    doc_ids.append(doc["_id"])
                say(f"wrote {args.messages} pending messages (batch {batch})")
                ok = await follow(couch, doc_ids, once=True)
                say(f"batch {batch}: all {'delivered' if ok else 'final'}")
                if batch == 1:
                    ok = await incoming(couch, rapidpro, port) and ok
                if args.once:
                    return 0 if ok else 1
                say("Ctrl-C to stop; next batch in 5 s")
                await asyncio.sleep(5)
    finally:
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            code = await proc.wait()
            say(f"daemon stopped (exit {code})")
        await couch.close()
        pouch.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=3, help="messages per batch (default 3)")
    parser.add_argument("--step", type=float, default=0.5, help="sandbox seconds per status step")
    parser.add_argument("--once", action="store_true", help="stop when the first batch is final")
    args = parser.parse_args()
    logs.configure("warning", "console")  # the sandbox's request log would drown the story
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(demo(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
