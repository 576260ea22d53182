"""botgate_http_request_duration_seconds: every response timed by route template, in seconds, in
buckets with a bound at the latency SLO's 0.5 s (deploy/alerts.yml)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_config
from tests.helpers import chat

FAMILY = "botgate_http_request_duration_seconds"


async def samples(client: Any) -> dict[tuple[str, str, str], float]:
    """(sample name, route, le) -> value for the duration family and the request counter."""
    text = await (await client.get("/metrics")).text()
    out: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if family.name in (FAMILY, "botgate_http_requests"):
                key = (s.name, s.labels["route"], s.labels.get("le", s.labels.get("status", "")))
                out[key] = out.get(key, 0.0) + s.value
    return out


async def test_each_response_is_timed_by_route_template(gateway: Any) -> None:
    client = await gateway(make_config())
    for n in range(3):
        assert (await client.get(f"/no/such/page/{n}")).status == 404
    assert (await client.get("/healthz")).status == 200
    async with client.ws_connect("/chat/ws?session=timedsession01") as ws:
        opened = time.monotonic()
        await ws.receive()
        frames = await chat(client, ws, "time this socket", "m1")
        assert frames[-1]["type"] == "done"
        await ws.close()
        held = time.monotonic() - opened  # the server's handler ran at least this long
    for _ in range(50):  # the socket's handler may finish just after the client saw the close
        got = await samples(client)
        if (f"{FAMILY}_count", "/chat/ws", "") in got:
            break

    bounds = sorted(float(le) for name, route, le in got if name == f"{FAMILY}_bucket" and route == "/healthz")
    assert 0.5 in bounds and bounds[-1] == float("inf")
    # One observation per response, under the template (never the path), matching the counter.
    assert got[(f"{FAMILY}_count", "unmatched", "")] == 3 == got[("botgate_http_requests_total", "unmatched", "404")]
    assert got[(f"{FAMILY}_count", "/healthz", "")] == 1
    assert got[(f"{FAMILY}_bucket", "/healthz", "0.5")] == 1  # a health check is fast
    assert not any("/no/such" in route for _, route, _ in got)
    # The websocket's duration is how long it was open: at least what the client saw, in seconds.
    assert got[(f"{FAMILY}_count", "/chat/ws", "")] == 1
    assert held <= got[(f"{FAMILY}_sum", "/chat/ws", "")] < held + 5
