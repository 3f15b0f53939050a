"""Prometheus metrics, on a registry per application (tests build many apps)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

# Every counter and histogram would export a `<name>_created` series holding the process's
# start time: noise in `/metrics` (and a series per label set) that no alert or dashboard
# uses. prometheus_client has no per-registry switch; this process exports only ours.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client


class Metrics:
    """Every metric the daemon exports at `/metrics`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.messages_sent = Counter(
            "chtrp_messages_sent_total",
            "Messages accepted by RapidPro (broadcast created).",
            registry=r,
        )
        self.messages_adopted = Counter(
            "chtrp_messages_adopted_total",
            "Uncertain sends found already created in RapidPro and adopted, not resent.",
            registry=r,
        )
        self.messages_failed = Counter(
            "chtrp_messages_failed_total",
            "Messages marked failed (RapidPro 400 or status).",
            registry=r,
        )
        self.messages_delivered = Counter(
            "chtrp_messages_delivered_total", "Messages that reached 'delivered'.", registry=r
        )
        self.state_updates = Counter(
            "chtrp_state_updates_total",
            "Task state changes written from status polls.",
            ["state"],
            registry=r,
        )
        self.send_errors = Counter(
            "chtrp_send_errors_total",
            "Broadcast POSTs that failed, by kind.",
            ["kind"],
            registry=r,
        )
        self.bad_documents = Counter(
            "chtrp_bad_documents_total",
            "Documents skipped because a task was malformed.",
            registry=r,
        )
        self.write_conflicts = Counter(
            "chtrp_write_conflicts_total",
            "CouchDB write conflicts (re-read and re-applied).",
            registry=r,
        )
        self.conflicts_resolved = Counter(
            "chtrp_conflicts_resolved_total",
            "Documents whose conflicting branches (CouchDB cluster) the daemon merged.",
            registry=r,
        )
        self.claims_contested = Counter(
            "chtrp_claims_contested_total",
            "Claims another branch of the document contested (resolved, then looked up).",
            registry=r,
        )
        self.claims_uncommitted = Counter(
            "chtrp_claims_uncommitted_total",
            "Claim writes CouchDB accepted without quorum (never sent on).",
            registry=r,
        )
        self.couch_write_requests = Counter(
            "chtrp_couch_write_requests_total",
            "`_bulk_docs` requests the daemon made (group commit).",
            registry=r,
        )
        self.couch_writes = Counter(
            "chtrp_couch_writes_total",
            "Documents written in those requests.",
            registry=r,
        )
        self.rapidpro_requests = Counter(
            "chtrp_rapidpro_requests_total",
            "Requests made to RapidPro, by throttle scope.",
            ["scope"],
            registry=r,
        )
        self.rapidpro_throttled = Counter(
            "chtrp_rapidpro_throttled_total",
            "429 answers from RapidPro, by throttle scope.",
            ["scope"],
            registry=r,
        )
        self.budget_remaining = Gauge(
            "chtrp_rapidpro_budget_remaining",
            "Requests left in the client-side hourly budget, by throttle scope (+Inf: no limit).",
            ["scope"],
            registry=r,
        )
        self.status_polls = Counter(
            "chtrp_status_polls_total", "Delivery-status poll rounds completed.", registry=r
        )
        self.in_flight = Gauge(
            "chtrp_in_flight_messages",
            "Messages whose delivery status is being tracked.",
            registry=r,
        )
        self.send_queue = Gauge(
            "chtrp_send_queue_documents", "Documents waiting to be sent.", registry=r
        )
        self.webhook_requests = Counter(
            "chtrp_webhook_requests_total",
            "Incoming-webhook answers, by HTTP status.",
            ["code"],
            registry=r,
        )
        self.feed_lag = Gauge(
            "chtrp_feed_lag_seconds",
            "Seconds since the changes feed last caught up.",
            registry=r,
        )
        self.checkpoint_age = Gauge(
            "chtrp_checkpoint_age_seconds",
            "Seconds since the feed checkpoint was last saved.",
            registry=r,
        )
        # Read at scrape time (set_function, wired in app.py): what /healthz and the
        # alert rules in monitoring/ need as numbers.
        self.healthy = Gauge(
            "chtrp_healthy",
            "1 while /healthz answers 200, 0 while it reports a problem (503).",
            registry=r,
        )
        self.sending_paused = Gauge(
            "chtrp_sending_paused",
            "1 while RapidPro refuses the API token or URL in use (401/403/404 at the last "
            "send, none accepted since): nothing is sent until the configuration changes.",
            registry=r,
        )
        self.unsent_messages = Gauge(
            "chtrp_unsent_messages",
            "Messages seen pending or forwarded-to-gateway and not yet sent (feed and sweeps).",
            registry=r,
        )
        self.oldest_unsent_age = Gauge(
            "chtrp_oldest_unsent_age_seconds",
            "Seconds the oldest of those messages has waited since it became pending (0: none).",
            registry=r,
        )
        self.messages_mirrored = Counter(
            "chtrp_messages_mirrored_total",
            "Messages RapidPro sent on its own, written to CHT as outgoing messages.",
            registry=r,
        )
        self.incoming_recovered = Counter(
            "chtrp_incoming_recovered_total",
            "Incoming SMS found in RapidPro's log without a CHT report, and stored.",
            registry=r,
        )
        self.incoming_unrecoverable = Counter(
            "chtrp_incoming_unrecoverable_total",
            "Incoming SMS of CHT flows that cannot be stored (no number or text, no uuids).",
            registry=r,
        )
        self.log_requests = Counter(
            "chtrp_message_log_requests_total",
            "GET messages.json requests of the message-log follower (pages and look-ups).",
            registry=r,
        )
        self.refresh_overdue = Gauge(
            "chtrp_status_refresh_overdue_messages",
            "Tracked messages whose status was not asked of RapidPro within the last hour.",
            registry=r,
        )
        self.log_lag = Gauge(
            "chtrp_message_log_lag_seconds",
            "Seconds between now and the newest message the log follower has read "
            "(mirroring or recovery on).",
            registry=r,
        )
        self.send_latency = Histogram(
            "chtrp_send_seconds",
            "Time from picking a document up to RapidPro's answer.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
