"""Prometheus metric families, one registry per app (so tests and reloads never collide).

Labels only ever take bounded values: platform, transport, kind, outcome, reason, endpoint, route
template, status. Never user ids, conversation ids or client addresses. The core records through
the methods below, which also feed the in-process `Stats` behind the status page; adapters use the
families directly for what only they see (reconnects, platform API calls, dropped events).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from .procstats import ProcessMetrics
from .stats import Stats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
MODEL_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0)
API_CALL_BUCKETS = (0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89)
# HTTP request durations: 0.5 is a bound, so "share of requests slower than 500 ms" (the latency
# SLO in deploy/alerts.yml) is exact, not interpolated; finer below it, where webhooks answer.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Outcome(StrEnum):
    """What a reply the gateway sent (or tried to send) was: the `outcome` label."""

    OK = "ok"  # the model's answer (or a cached one) was delivered
    NOTICE = "notice"  # help, reset, greeting, rate-limit and other short intended notices
    BUSY = "busy"  # queue full, sender told to retry
    MODEL_ERROR = "model_error"  # the model failed; the user was told so
    TIMEOUT = "timeout"  # the deadline passed; the user got an apology
    ERROR = "error"  # the gateway failed; the user got an apology
    FAILED = "failed"  # the platform refused the delivery

    @property
    def success(self) -> bool:
        return self in (Outcome.OK, Outcome.NOTICE)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.stats = Stats()
        # process_cpu_seconds_total and friends, for the CPU, memory and restart alerts (Linux;
        # from /proc/self only, so they exist under the unit's ProcSubset=pid: gateway/procstats.py).
        ProcessMetrics(r)
        self.messages_received = Counter(
            "botgate_messages_received",
            "Inbound messages accepted from a platform.",
            ["platform", "transport", "kind"],
            registry=r,
        )
        self.replies = Counter(
            "botgate_replies",
            "Replies sent or attempted, by outcome (ok|notice|busy|model_error|timeout|error|failed).",
            ["platform", "outcome"],
            registry=r,
        )
        self.model_duration = Histogram(
            "botgate_model_request_duration_seconds",
            "Model call duration, request sent to last byte.",
            buckets=MODEL_BUCKETS,
            registry=r,
        )
        self.model_errors = Counter(
            "botgate_model_errors", "Failed model calls by reason.", ["reason"], registry=r
        )
        self.model_retries = Counter(
            "botgate_model_retries",
            "Failed model attempts that were retried (the call may still succeed), by reason.",
            ["reason"],
            registry=r,
        )
        self.model_tokens = Counter(
            "botgate_model_tokens", "Tokens reported by the model.", ["type"], registry=r
        )
        self.overhead = Histogram(
            "botgate_gateway_overhead_seconds",
            "Time the gateway adds around the model: arrival to request, last byte to delivery.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "botgate_queue_depth", "Messages accepted and waiting for a worker.", registry=r
        )
        self.inflight = Gauge("botgate_inflight", "Messages being answered right now.", registry=r)
        self.channel_connected = Gauge(
            "botgate_channel_connected",
            "1 when the bot's channel is connected (set at each scrape from the channels' status).",
            ["platform", "bot"],
            registry=r,
        )
        self.reconnects = Counter(
            "botgate_reconnects", "Reconnects of a long connection.", ["platform"], registry=r
        )
        self.dedup_dropped = Counter(
            "botgate_dedup_dropped", "Duplicate deliveries dropped.", ["platform"], registry=r
        )
        self.spill = Counter(
            "botgate_spill",
            "Messages the store refused, by what became of them: spilled (held in memory), "
            "recovered (in the inbox later), refused (memory full, sender told busy), lost (shutdown).",
            ["event"],
            registry=r,
        )
        self.spill_depth = Gauge(
            "botgate_spill_depth", "Messages held in memory until the store takes them.", registry=r
        )
        self.dropped = Counter(
            "botgate_messages_dropped",
            "Inbound events dropped on purpose (stale replay, self message, filtered).",
            ["platform", "reason"],
            registry=r,
        )
        self.cache_requests = Counter(
            "botgate_cache_requests", "Model cache lookups.", ["result"], registry=r
        )
        self.platform_api_calls = Counter(
            "botgate_platform_api_calls",
            "Outbound platform API calls.",
            ["platform", "endpoint"],
            registry=r,
        )
        self.send_retries = Counter(
            "botgate_send_retries",
            "Platform sends that failed transiently and were retried (see botgate_replies for outcomes).",
            ["platform"],
            registry=r,
        )
        self.platform_throttled = Counter(
            "botgate_platform_throttled",
            "Platform API calls refused for a rate limit (each is waited out and retried).",
            ["platform", "endpoint"],
            registry=r,
        )
        self.agent_answers = Counter(
            "botgate_agent_answers_total", "Answers given, by agent ([[agents]] name).", ["agent"], registry=r
        )
        self.api_calls_per_answer = Histogram(
            "botgate_platform_api_calls_per_answer",
            "Billable platform API calls (the ones the monthly quota counts) per answered message.",
            ["platform"],
            buckets=API_CALL_BUCKETS,
            registry=r,
        )
        self.api_budget_used = Gauge(
            "botgate_platform_api_budget_used",
            "Billable platform API calls counted this month (since the process started).",
            ["platform", "bot"],
            registry=r,
        )
        self.api_budget_ratio = Gauge(
            "botgate_platform_api_budget_ratio",
            "Share of monthly_api_budget used this month (0 without a budget): 0.8 = cards "
            "update only at the end, 1 = replies take the cheapest path.",
            ["platform", "bot"],
            registry=r,
        )
        self.api_quota_spent = Gauge(
            "botgate_platform_api_quota_spent",
            "1 while the monthly API budget is spent or the platform said its quota is exhausted.",
            ["platform", "bot"],
            registry=r,
        )
        self.quota_refused = Counter(
            "botgate_quota_refused",
            "Messages refused for a daily quota, by quota (user_tokens|conversation_tokens|user_messages).",
            ["kind"],
            registry=r,
        )
        self.tokens = Counter(
            "botgate_tokens",
            "Tokens counted for usage and quotas, by bot (<platform>/<bot>), agent and source "
            "(reported by the backend | estimated by botgate).",
            ["bot", "agent", "source"],
            registry=r,
        )
        self.http_requests = Counter(
            "botgate_http_requests", "HTTP requests served.", ["route", "status"], registry=r
        )
        self.http_duration = Histogram(
            "botgate_http_request_duration_seconds",
            "HTTP request duration by route template, arrival until the response is ready (for "
            "/chat/ws and /status/events: how long the connection stayed open).",
            ["route"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self.outbox = Counter(
            "botgate_outbox_messages",
            "Proactive messages (send API, schedules, alerts to a conversation) by platform and what "
            "became of them: queued (accepted), sent, failed.",
            ["platform", "state"],
            registry=r,
        )
        self.schedule_runs = Counter(
            "botgate_schedule_runs",
            "Scheduled posts run (by the instance that claimed the due time), by schedule (its configured "
            "name) and result: queued (in the outbox) or failed (the model, or a refused post).",
            ["schedule", "result"],
            registry=r,
        )
        # Labelled children by metric and label values (bounded: every label takes bounded values).
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}
        self._http: dict[tuple[str, int], tuple[Any, Any]] = {}

    def _child(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)`, looked up once: `labels()` validates and locks on every call
        (~2 µs), and an answered message records half a dozen labelled metrics."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    # -- what the core records (Prometheus + status page from one call) ------------------------
    def message_received(self, platform: str, transport: str, kind: str) -> None:
        self._child(self.messages_received, platform, transport, kind).inc()
        self.stats.message_received()

    def http_request(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        children = self._http.get(key)
        if children is None:  # one lookup per request finds both the counter and the histogram
            children = self._http[key] = (
                self.http_requests.labels(route, str(status)),
                self.http_duration.labels(route),
            )
        count, duration = children
        count.inc()
        duration.observe(seconds)

    def reply(self, platform: str, outcome: Outcome) -> None:
        self._child(self.replies, platform, outcome.value).inc()
        self.stats.reply(failed=not outcome.success)

    def model_call(self, seconds: float, error: str | None, settled: bool = True) -> None:
        """One model call: `error` is the failure reason, None for success; `settled` is False
        when the caller abandoned it (then it is neither a success nor a failure)."""
        self.model_duration.observe(seconds)
        if error is not None:
            self.model_errors.labels(error).inc()
        self.stats.model_call(seconds, error, settled)

    def model_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        self._child(self.model_tokens, "prompt").inc(prompt_tokens)
        self._child(self.model_tokens, "completion").inc(completion_tokens)
        self.stats.tokens(prompt_tokens, completion_tokens)

    def gateway_overhead(self, seconds: float) -> None:
        self.overhead.observe(seconds)
        self.stats.gateway_overhead(seconds)

    def agent_answered(self, agent: str) -> None:
        """One answer by `agent` (a configured name: a bounded label)."""
        self._child(self.agent_answers, agent).inc()

    def answer_api_calls(self, platform: str, calls: int) -> None:
        """The billable platform calls one answered message cost."""
        self._child(self.api_calls_per_answer, platform).observe(calls)

    def cache_lookup(self, hit: bool) -> None:
        self._child(self.cache_requests, "hit" if hit else "miss").inc()
        self.stats.cache_lookup(hit)

    def render(self) -> bytes:
        return generate_latest(self.registry)
