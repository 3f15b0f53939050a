"""Test-side helpers: a plain CouchDB admin client, CHT document builders, a waiting helper.

These talk to the real test server; they are deliberately independent of the daemon's own
CouchDB client so that a bug there cannot hide itself in the tests.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from cht_rapidpro.cht import credentials
from pouchdb import ADMIN_PASSWORD, ADMIN_USER, COUCH_SECRET, HEADERS, free_port

T = TypeVar("T")

OUTGOING_KEY = "0123456789abcdef0123456789abcdef01234567"
INCOMING_KEY = "incoming-key-for-tests"


@dataclass(frozen=True)
class CouchServer:
    """A running CouchDB-compatible server (URL without credentials)."""

    url: str
    user: str = ADMIN_USER
    password: str = ADMIN_PASSWORD

    def db_url(self, db: str) -> str:
        """`COUCH_URL` as CHT writes it: credentials and the db name in the URL."""
        parts = urllib.parse.urlsplit(self.url)
        netloc = f"{self.user}:{self.password}@{parts.netloc}"
        return urllib.parse.urlunsplit((parts.scheme, netloc, f"/{db}", "", ""))


class CouchAdmin:
    """A minimal async admin client bound to one database."""

    def __init__(self, server: CouchServer, db: str) -> None:
        self.server = server
        self.db = db
        token = base64.b64encode(f"{server.user}:{server.password}".encode()).decode()
        self.session = aiohttp.ClientSession(headers={**HEADERS, "Authorization": f"Basic {token}"})
        self._node: str | None = None

    @property
    def couch_url(self) -> str:
        return self.server.db_url(self.db)

    async def close(self) -> None:
        await self.session.close()

    async def request(
        self, method: str, path: str, body: Any = None, *, expect: Iterable[int] = (200, 201)
    ) -> Any:
        url = self.server.url + path
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": "application/json"} if body is not None else None
        async with self.session.request(method, url, data=data, headers=headers) as resp:
            text = await resp.text()
            if resp.status not in tuple(expect):
                raise AssertionError(f"{method} {path}: {resp.status} {text}")
            return json.loads(text) if text else None

    # -- databases and documents ----------------------------------------------------------

    async def create_db(self, name: str | None = None) -> None:
        await self.request("PUT", "/" + (name or self.db))

    async def delete_db(self, name: str | None = None) -> None:
        await self.request("DELETE", "/" + (name or self.db), expect=(200, 404))

    def _doc_path(self, doc_id: str, db: str | None = None) -> str:
        return f"/{db or self.db}/{urllib.parse.quote(doc_id, safe='')}"

    async def get(self, doc_id: str, db: str | None = None) -> dict[str, Any] | None:
        async with self.session.get(self.server.url + self._doc_path(doc_id, db)) as resp:
            if resp.status == 404:
                return None
            assert resp.status == 200, await resp.text()
            doc: dict[str, Any] = json.loads(await resp.text())
            return doc

    async def put(self, doc: dict[str, Any], db: str | None = None) -> dict[str, Any]:
        """Create or update `doc` (its `_rev` is updated in place); returns it."""
        doc.setdefault("_id", uuid.uuid4().hex)
        result = await self.request("PUT", self._doc_path(doc["_id"], db), doc)
        doc["_rev"] = result["rev"]
        return doc

    async def update(self, doc_id: str, change: Callable[[dict[str, Any]], None]) -> None:
        """Read-modify-write one doc, retrying on conflicts."""
        while True:
            doc = await self.get(doc_id)
            assert doc is not None, doc_id
            change(doc)
            url = self.server.url + self._doc_path(doc_id)
            async with self.session.put(
                url, data=json.dumps(doc), headers={"Content-Type": "application/json"}
            ) as resp:
                if resp.status == 409:
                    continue
                assert resp.status in (200, 201), await resp.text()
                return

    async def bulk(self, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await self.request(
            "POST", f"/{self.db}/_bulk_docs", {"docs": docs}
        )
        return rows

    async def all_docs(self) -> list[dict[str, Any]]:
        body = await self.request("GET", f"/{self.db}/_all_docs?include_docs=true")
        return [row["doc"] for row in body["rows"] if not row["id"].startswith("_design/")]

    # -- server config (global: tests that change it restore it) -------------------------

    async def node(self) -> str:
        if self._node is None:
            membership = await self.request("GET", "/_membership")
            self._node = str(membership["all_nodes"][0])
        return self._node

    async def set_config(self, section: str, key: str, value: str) -> None:
        node = await self.node()
        await self.request("PUT", f"/_node/{node}/_config/{section}/{key}", value)

    async def delete_config(self, section: str, key: str) -> None:
        node = await self.node()
        await self.request("DELETE", f"/_node/{node}/_config/{section}/{key}", expect=(200, 404))

    async def set_admin(self, user: str, password: str) -> CouchServer:
        """Add (or re-password) a server admin; returns the server as that admin.

        CouchDB 3 stores the password as given and hashes it a moment later (PBKDF2, 600,000
        rounds); until then the admin cannot log in, and failed logins would not even count
        towards the lockout. This waits for the hash, asking as the suite's admin (no failed
        login on the way).
        """
        await self.set_config("admins", user, password)
        node = await self.node()

        async def stored() -> Any:
            return await self.request("GET", f"/_node/{node}/_config/admins/{user}")

        await eventually(stored, lambda value: value != password, within=30, every=0.1,
                         what=f"admin {user}'s password hashed")  # fmt: skip
        return CouchServer(self.server.url, user, password)

    # -- CHT set-up -------------------------------------------------------------------------

    async def put_settings(self, **settings: Any) -> dict[str, Any]:
        """(Re)write the CHT `settings` doc with the given app settings."""
        existing = await self.get("settings")
        doc: dict[str, Any] = {"_id": "settings", "settings": settings}
        if existing:
            doc["_rev"] = existing["_rev"]
        return await self.put(doc)

    async def put_vault_credential(self, key: str, value: str, secret: str = COUCH_SECRET) -> None:
        """Store a credential the CHT 4.x way (`PUT /api/v1/credentials/<key>`)."""
        vault = f"{self.db}-vault"
        await self.request("PUT", f"/{vault}", expect=(201, 412))
        doc_id = f"credential:{key}"
        existing = await self.get(doc_id, db=vault)
        doc: dict[str, Any] = {"_id": doc_id, "password": credentials.encrypt(secret, value)}
        if existing:
            doc["_rev"] = existing["_rev"]
        await self.put(doc, db=vault)


def rapidpro_settings(url: str, **extra: Any) -> dict[str, Any]:
    """App settings with this daemon as the outgoing service (CHT's own sender stays idle)."""
    settings: dict[str, Any] = {
        "sms": {"outgoing_service": "cht-rapidpro", "rapidpro": {"url": url}},
        "default_country_code": 254,
        "phone_validation": "none",
    }
    settings.update(extra)
    return settings


async def start_daemon_process(
    couch_url: str, log: Path, instance: str = "crashy", **env: str
) -> asyncio.subprocess.Process:
    """`python -m cht_rapidpro run` with quick test timings, logging logfmt (appended) to `log`."""
    environment = {
        **os.environ,
        "COUCH_URL": couch_url,
        "CHT_RAPIDPRO_PORT": str(free_port()),
        "CHT_RAPIDPRO_INSTANCE": instance,
        "CHT_RAPIDPRO_POLL_INTERVAL": "0.5",
        "CHT_RAPIDPRO_CHECKPOINT_INTERVAL": "0.2",
        "CHT_RAPIDPRO_SEND_TIMEOUT": "2",
        "CHT_RAPIDPRO_CLAIM_TTL": "8",
        "CHT_RAPIDPRO_RETRY_MAX": "1",
        "CHT_RAPIDPRO_LOG_FORMAT": "logfmt",
        **env,
    }
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cht_rapidpro", "run", env=environment, stdout=out, stderr=out
        )


def iso(ms: float | None = None) -> str:
    """JS `new Date(ms).toISOString()`."""
    moment = time.time() if ms is None else ms / 1000
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment))
        + f".{int(moment * 1000) % 1000:03d}Z"
    )


def task(
    to: str, text: str, *, state: str = "pending", msg_uuid: str | None = None, **extra: Any
) -> dict[str, Any]:
    """One CHT task with one message, as transitions or the web app write it."""
    item: dict[str, Any] = {
        "messages": [{"uuid": msg_uuid or str(uuid.uuid4()), "to": to, "message": text}],
        "state": state,
        "state_history": [{"state": state, "timestamp": iso()}],
    }
    item.update(extra)
    return item


def message_doc(
    tasks: list[dict[str, Any]] | None = None,
    scheduled: list[dict[str, Any]] | None = None,
    *,
    doc_id: str | None = None,
) -> dict[str, Any]:
    """A `data_record` carrying outgoing messages (web-app "send message" shape)."""
    doc: dict[str, Any] = {
        "_id": doc_id or str(uuid.uuid4()),
        "type": "data_record",
        "form": None,
        "kujua_message": True,
        "from": "+254700000000",
        "sent_by": "admin",
        "reported_date": int(time.time() * 1000),
        "errors": [],
        "tasks": tasks or [],
    }
    if scheduled is not None:
        doc["scheduled_tasks"] = scheduled
    return doc


def all_tasks(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc.get("tasks") or []) + list(doc.get("scheduled_tasks") or [])


async def eventually(
    probe: Callable[[], Awaitable[T]],
    until: Callable[[T], bool] = bool,
    *,
    within: float = 20.0,
    every: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll `probe` until `until(value)`; fail with the last value after `within` seconds.

    This waits for an outcome; it never asserts how fast it came.
    """
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if until(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last value: {value!r}")
        await asyncio.sleep(every)


#: CHT's `medic/messages_by_state` map (spec cht-messaging §2.1), for tests that need the view.
MESSAGES_BY_STATE = """function(doc) {
  var emitTasks = function(tasks) {
    tasks.forEach(function(task) {
      var due = task.due || task.timestamp || doc.reported_date;
      if (typeof due === 'string') { due = Date.parse(due); }
      if (task.messages) {
        task.messages.forEach(function(msg) {
          if (msg.uuid && msg.to && msg.message) {
            var value = { content: msg.message, to: msg.to, id: msg.uuid };
            emit([task.state, due], value);
            if (task.state === 'pending' || task.state === 'forwarded-to-gateway') {
              emit(['pending-or-forwarded', due], value);
            }
          }
        });
      } else {
        emit([task.state, due], {});
      }
    });
  };
  emitTasks(doc.tasks || []);
  emitTasks(doc.scheduled_tasks || []);
}"""


#: CHT's `medic-sms/messages_by_gateway_ref` map (spec cht-messaging §2.3): outgoing tasks by
#: their `gateway_ref`, incoming SMS by `sms_message.gateway_ref`.
MESSAGES_BY_GATEWAY_REF = """function(doc) {
  var emitTasks = function(tasks) {
    tasks.forEach(function(task) {
      if (task.gateway_ref && task.messages) {
        task.messages.forEach(function(msg) { emit(task.gateway_ref, msg.uuid); });
      }
    });
  };
  emitTasks(doc.tasks || []);
  emitTasks(doc.scheduled_tasks || []);
  if (doc.type === 'data_record' && doc.sms_message && doc.sms_message.gateway_ref) {
    emit(doc.sms_message.gateway_ref, doc.sms_message.uuid);
  }
}"""

#: CHT's `medic-sms/gateway_messages_by_state` map (spec cht-messaging §2.2).
GATEWAY_MESSAGES_BY_STATE = """function(doc) {
  var emitTasks = function(tasks) {
    tasks.forEach(function(task) {
      if (task.messages && task.gateway_ref) {
        task.messages.forEach(function(msg) {
          if (msg.uuid && msg.to && msg.message) {
            emit(task.state, { id: msg.uuid, gateway_ref: task.gateway_ref });
          }
        });
      }
    });
  };
  emitTasks(doc.tasks || []);
  emitTasks(doc.scheduled_tasks || []);
}"""

#: CHT 4.x `medic-client/contacts_by_phone` map.
CONTACTS_BY_PHONE = """function(doc) {
  if (doc.phone) {
    var types = [ 'contact', 'district_hospital', 'health_center', 'clinic', 'person' ];
    if (types.indexOf(doc.type) !== -1) {
      emit(doc.phone);
    }
  }
}"""

#: CHT 4.x `medic-client/messages_by_contact_date` map: the Messages tab's conversations.
MESSAGES_BY_CONTACT_DATE = """function(doc) {
  var getLineage = function(contact) {
    var lineage = [];
    while (contact) {
      if (contact._id) { lineage.push(contact._id); }
      contact = contact.parent;
    }
    return lineage;
  };
  var emitMessage = function(doc, contact, phone, message) {
    var from = (contact && contact._id) || phone;
    var id = from || doc._id;
    emit([ id, doc.reported_date ], {
      from: from,
      date: doc.reported_date,
      message: message,
      contact: contact && contact._id,
      lineage: getLineage(contact && contact.parent)
    });
  };
  if (doc.type === 'data_record' && !doc.form) {
    if (doc.kujua_message) {
      doc.tasks.forEach(function(task) {
        var message = task.messages[0];
        emitMessage(doc, message.contact, message.to, message.message);
      });
    } else if (doc.sms_message) {
      emitMessage(doc, doc.contact, doc.from, doc.sms_message.message);
    }
  }
}"""


async def install_cht_views(
    couch: CouchAdmin, *, sms: bool = True, client: bool = True, medic: bool = False
) -> None:
    """Install the CHT 4.x views the daemon uses (CHT's map functions, as CHT ships them)."""
    if sms:
        await couch.put(
            {
                "_id": "_design/medic-sms",
                "views": {
                    "messages_by_gateway_ref": {"map": MESSAGES_BY_GATEWAY_REF},
                    "gateway_messages_by_state": {"map": GATEWAY_MESSAGES_BY_STATE},
                },
            }
        )
    if client:
        await couch.put(
            {
                "_id": "_design/medic-client",
                "views": {
                    "contacts_by_phone": {"map": CONTACTS_BY_PHONE},
                    "messages_by_contact_date": {"map": MESSAGES_BY_CONTACT_DATE},
                },
            }
        )
    if medic:
        await couch.put(
            {"_id": "_design/medic", "views": {"messages_by_state": {"map": MESSAGES_BY_STATE}}}
        )


async def view_rows(couch: CouchAdmin, ddoc: str, view: str, **params: Any) -> list[Any]:
    """Rows of a view query (JSON-encoded parameters, as CouchDB wants them)."""
    query = urllib.parse.urlencode({k: json.dumps(v) for k, v in params.items()})
    body = await couch.request("GET", f"/{couch.db}/_design/{ddoc}/_view/{view}?{query}")
    rows: list[Any] = body["rows"]
    return rows
