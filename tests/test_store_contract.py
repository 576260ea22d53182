"""The store contract, run against every backend: memory, SQLite (a real file), Redis (a real server)."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway.errors import StoreError
from gateway.i18n import Locale
from gateway.messages import Attachment
from gateway.store import (
    FAILED,
    QUEUED,
    SENT,
    CardRecord,
    LeaseStore,
    MemoryStore,
    OutboxEntry,
    RedisStore,
    SqliteStore,
    Store,
    Turn,
    UsageCount,
    lease_store,
)
from tests.helpers import msg

BACKENDS = ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)]


class Backend:
    """Opens stores of one backend over the same data, so a test can close and reopen."""

    def __init__(self, name: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.name = name
        self._path = tmp_path / "state" / "botgate.sqlite3"
        self.redis_url = request.getfixturevalue("redis_url") if name == "redis" else ""
        self._memory = MemoryStore()  # "reopening" memory returns the same (non-durable) object
        self.opened: list[Store] = []

    async def open(self) -> Store:
        store: Store
        if self.name == "memory":
            store = self._memory
        elif self.name == "sqlite":
            store = SqliteStore(self._path)
        else:
            store = RedisStore(self.redis_url)
        await store.open()
        self.opened.append(store)
        return store


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    b = Backend(request.param, tmp_path, request)
    yield b
    for store in b.opened:
        await store.close()


@pytest.fixture
async def store(backend: Backend) -> Store:
    return await backend.open()


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    """Poll `check` until it holds (for TTL expiry, which has no event to await)."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# -- dedup -------------------------------------------------------------------------------------
async def test_claim_once_then_duplicate_until_expiry(store: Store) -> None:
    assert await store.claim("dingtalk:a", 0.3) is True
    assert await store.claim("dingtalk:a", 0.3) is False
    assert await store.claim("dingtalk:b", 0.3) is True
    await eventually(lambda: store.claim("dingtalk:a", 60))
    assert await store.claim("dingtalk:a", 60) is False


async def test_concurrent_claims_of_one_key_admit_exactly_one(store: Store) -> None:
    results = await asyncio.gather(*(store.claim("feishu:same", 60) for _ in range(20)))
    assert results.count(True) == 1


# -- admission: dedup claim and inbox entry in one step ------------------------------------------
async def test_admit_queues_a_message_once_until_its_claim_expires(store: Store) -> None:
    first = msg(1)
    assert await store.admit(first, 0.5) is True
    redelivered = dataclasses.replace(first, transport="webhook", request_id="redelivered")
    assert await store.admit(redelivered, 0.5) is False
    assert await store.claim(first.dedup_key, 60) is False  # admit claims the same key
    assert await store.inbox_pending() == [first]
    await store.inbox_done(first)
    assert await store.admit(redelivered, 0.5) is False  # answered, and still remembered
    assert await store.inbox_pending() == []
    late = dataclasses.replace(first, request_id="late")
    await eventually(lambda: store.admit(late, 60))
    assert await store.inbox_pending() == [late]


async def test_a_claimed_id_is_not_admitted(store: Store) -> None:
    """A message first seen when the queue was full (only claimed) stays a duplicate."""
    assert await store.claim(msg(1).dedup_key, 60) is True
    assert await store.admit(msg(1), 60) is False
    assert await store.inbox_pending() == []


async def test_concurrent_admits_of_one_message_queue_it_once(store: Store) -> None:
    copies = [dataclasses.replace(msg(1), request_id=f"copy{i}") for i in range(20)]
    results = await asyncio.gather(*(store.admit(m, 60) for m in copies))
    assert results.count(True) == 1
    assert [m.request_id for m in await store.inbox_pending()] == [copies[results.index(True)].request_id]


async def test_a_message_keeps_its_locale_in_the_inbox_and_in_card_records(backend: Backend) -> None:
    """The language a message is answered in is chosen at intake: a resumed message (after a
    restart: a store opened anew) and a card closed after a crash still have it."""
    store = await backend.open()
    english = dataclasses.replace(msg(1), locale=Locale.EN)
    undecided = msg(2)  # as stored before messages carried a locale: answered in the default
    assert await store.admit(english, 60) and await store.admit(undecided, 60)
    await store.card_open(CardRecord("feishu", "default", "card-1", english))
    if backend.name != "memory":
        await store.close()
        store = await backend.open()
    assert [(m.message_id, m.locale) for m in await store.inbox_pending()] == [("m1", Locale.EN), ("m2", None)]
    assert [r.message.locale for r in await store.cards_open()] == [Locale.EN]


@asynccontextmanager
async def refusing_writes(backend: Backend, store: Store) -> AsyncIterator[None]:
    """Make the real backend refuse a large write: SQLite's file capped at its size (a full
    disk), Redis over its `maxmemory` (OOM with noeviction)."""
    if isinstance(store, SqliteStore):
        pages = await store.db.write(lambda conn, now: conn.execute("PRAGMA page_count").fetchone()[0])
        await store.db.write(lambda conn, now: conn.execute(f"PRAGMA max_page_count = {pages}"))
        try:
            yield
        finally:
            await store.db.write(lambda conn, now: conn.execute("PRAGMA max_page_count = 1073741823"))
    elif isinstance(store, RedisStore):
        admin = aioredis.Redis.from_url(backend.redis_url)
        try:
            await admin.config_set("maxmemory-policy", "noeviction")
            await admin.config_set("maxmemory", 1)
            try:
                yield
            finally:
                await admin.config_set("maxmemory", 0)
        finally:
            await admin.aclose()
    else:
        pytest.skip("memory:// cannot fail")


async def test_a_failed_admit_leaves_no_claim_behind(backend: Backend) -> None:
    """Otherwise the platform's redelivery would be dropped as a duplicate of a message that
    never reached the inbox: acknowledged by nobody, answered by nobody."""
    store = await backend.open()
    big = msg(1, reply_handle={"blob": "x" * 20_000})
    async with refusing_writes(backend, store):
        with pytest.raises(StoreError):
            await store.admit(big, 60)
    assert await store.inbox_pending() == []
    assert await store.admit(big, 60) is True
    assert await store.inbox_pending() == [big]


# -- inbox -------------------------------------------------------------------------------------
async def test_inbox_keeps_order_and_forgets_done(store: Store) -> None:
    messages = [msg(1), msg(2, "c2"), msg(3), msg(4)]
    for m in messages:
        await store.admit(m, 60)
    assert await store.inbox_pending() == messages
    assert await store.inbox_pending("dingtalk:c1") == [messages[0], messages[2], messages[3]]
    await store.inbox_done(messages[2])
    await store.inbox_done(messages[2])  # idempotent
    assert await store.inbox_pending() == [messages[0], messages[1], messages[3]]
    assert await store.inbox_pending("dingtalk:c2") == [messages[1]]
    assert await store.inbox_pending("dingtalk:nobody") == []


async def test_inbox_survives_reopen_with_every_field(backend: Backend) -> None:
    if backend.name == "memory":
        pytest.skip("memory:// is not durable by design")
    store = await backend.open()
    rich = msg(
        1,
        reply_handle={"session_webhook": "https://x/y", "expires": 1234567890123, "nested": [1, "a"]},
        attachments=(Attachment("image", "code-1", "cat.png"),),
    )
    others = [msg(2), msg(3, "c9")]
    for m in [rich, *others]:
        await store.admit(m, 60)
    await store.inbox_done(others[0])
    await store.close()
    backend.opened.remove(store)

    reopened = await backend.open()
    pending = await reopened.inbox_pending()
    assert pending == [rich, others[1]]
    assert pending[0].reply_handle["nested"] == [1, "a"]
    assert pending[0].attachments[0].name == "cat.png"


# -- context -----------------------------------------------------------------------------------
async def test_context_appends_trims_and_resets(store: Store) -> None:
    assert await store.context("web:s") == []
    for i in range(4):
        turns = [Turn("user", f"q{i}"), Turn("assistant", f"a{i}")]
        await store.append_turns("web:s", turns, max_turns=4, max_chars=1000, idle_ttl=60)
    assert [t.content for t in await store.context("web:s")] == ["q2", "a2", "q3", "a3"]
    await store.append_turns("web:s", [Turn("user", "x" * 30)], max_turns=4, max_chars=33, idle_ttl=60)
    assert [t.content for t in await store.context("web:s")] == ["a3", "x" * 30]
    await store.reset("web:s")
    assert await store.context("web:s") == []


async def test_context_expires_when_idle(store: Store) -> None:
    await store.append_turns("web:idle", [Turn("user", "hi")], 10, 1000, idle_ttl=0.3)
    assert await store.context("web:idle") == [Turn("user", "hi")]

    async def forgotten() -> bool:
        return await store.context("web:idle") == []

    await eventually(forgotten)


# -- backend sessions: the backend's conversation id per context key ---------------------------------
GROUP = "dingtalk:cidTEAM"
MEMBER = f"{GROUP}:user:staff1"  # a per_user agent's context key in that group


async def test_backend_session_is_kept_per_context_key(store: Store) -> None:
    assert await store.backend_session(GROUP) is None
    await store.set_backend_session(GROUP, "conv-group", ttl=60)
    await store.set_backend_session(MEMBER, "conv-member", ttl=60)
    await store.set_backend_session("feishu:oc_1", "会话-✓", ttl=60)
    assert await store.backend_session(GROUP) == "conv-group"
    assert await store.backend_session(MEMBER) == "conv-member"
    assert await store.backend_session("feishu:oc_1") == "会话-✓"
    assert await store.backend_session("dingtalk:cidOTHER") is None
    await store.set_backend_session(GROUP, "conv-group-2", ttl=60)  # the backend gave a new one
    assert await store.backend_session(GROUP) == "conv-group-2"
    assert await store.backend_session(MEMBER) == "conv-member"


async def test_backend_session_expires_when_idle_unless_stored_again(store: Store) -> None:
    await store.set_backend_session("web:kept", "conv-kept", ttl=0.4)  # first: never expires later
    await store.set_backend_session("web:idle", "conv-idle", ttl=0.4)
    deadline = time.monotonic() + 5.0
    while await store.backend_session("web:idle") is not None:
        assert time.monotonic() < deadline, "the idle session never expired"
        await store.set_backend_session("web:kept", "conv-kept", ttl=0.4)  # in use: refreshed
        await asyncio.sleep(0.02)
    assert await store.backend_session("web:kept") == "conv-kept"

    async def forgotten() -> bool:
        return await store.backend_session("web:kept") is None

    await eventually(forgotten)


async def test_reset_forgets_the_backend_session_of_that_key_only(store: Store) -> None:
    for key in (GROUP, MEMBER):
        await store.append_turns(key, [Turn("user", "hi")], 10, 1000, idle_ttl=60)
        await store.set_backend_session(key, f"conv-{key}", ttl=60)
    await store.reset(GROUP)
    assert await store.backend_session(GROUP) is None
    assert await store.context(GROUP) == []
    assert await store.backend_session(MEMBER) == f"conv-{MEMBER}"  # another member's own
    await store.reset(MEMBER)
    assert await store.backend_session(MEMBER) is None
    await store.reset(MEMBER)  # twice is harmless
    await store.set_backend_session(GROUP, "conv-fresh", ttl=60)  # the next answer starts anew
    assert await store.backend_session(GROUP) == "conv-fresh"


async def test_backend_session_survives_reopen(backend: Backend) -> None:
    if backend.name == "memory":
        pytest.skip("memory:// is not durable by design")
    store = await backend.open()
    await store.set_backend_session(MEMBER, "conv-member", ttl=60)
    await store.set_backend_session(GROUP, "conv-gone", ttl=60)
    await store.reset(GROUP)
    await store.close()
    backend.opened.remove(store)

    reopened = await backend.open()
    assert await reopened.backend_session(MEMBER) == "conv-member"
    assert await reopened.backend_session(GROUP) is None


async def test_a_failed_backend_session_write_raises_and_keeps_the_previous(backend: Backend) -> None:
    store = await backend.open()
    await store.set_backend_session(GROUP, "conv-1", ttl=60)
    async with refusing_writes(backend, store):
        with pytest.raises(StoreError):
            await store.set_backend_session(GROUP, "x" * 20_000, ttl=60)
    assert await store.backend_session(GROUP) == "conv-1"


# -- cache ---------------------------------------------------------------------------------------
async def test_cache_hit_until_ttl(store: Store) -> None:
    assert await store.cache_get("cache:k") is None
    await store.cache_put("cache:k", "answer ✓", ttl=0.3)
    assert await store.cache_get("cache:k") == "answer ✓"

    async def expired() -> bool:
        return await store.cache_get("cache:k") is None

    await eventually(expired)


# -- rate limit ----------------------------------------------------------------------------------
async def test_token_bucket_caps_a_burst(store: Store) -> None:
    results = await asyncio.gather(*(store.take_token("rate:u1", 3) for _ in range(6)))
    assert results.count(True) == 3
    assert await store.take_token("rate:u2", 3) is True  # buckets are per user


async def test_token_bucket_refills(store: Store) -> None:
    # 600 a minute = one token every 0.1 s.
    results = await asyncio.gather(*(store.take_token("rate:fast", 600) for _ in range(650)))
    assert 600 <= results.count(True) < 650  # a few may have refilled during the burst
    for _ in range(100):
        if not await store.take_token("rate:fast", 600):
            break
    else:
        pytest.fail("the bucket never ran empty")
    await eventually(lambda: store.take_token("rate:fast", 600))


# -- open streaming cards ----------------------------------------------------------------------------
async def test_open_cards_are_kept_updated_and_forgotten_when_done(backend: Backend) -> None:
    store = await backend.open()
    first = CardRecord("feishu", "default", "card_1", msg(1), sequence=100, opened_at=10.0)
    second = CardRecord("dingtalk", "default", "track-2", msg(2, "c2"), opened_at=20.0)
    await store.card_open(second)
    await store.card_open(first)
    assert await store.cards_open() == [first, second]  # oldest first
    moved = dataclasses.replace(first, sequence=200, text="the complete answer")
    await store.card_update(moved)
    await store.card_done(second.key)
    await store.card_update(dataclasses.replace(second, text="too late"))  # done: stays gone
    if backend.name != "memory":  # what a restart finds
        await store.close()
        store = await backend.open()
    assert await store.cards_open() == [moved]
    [found] = await store.cards_open()
    assert found.message.request_id == first.message.request_id and found.key == "feishu:default:card_1"
    await store.card_done(moved.key)
    await store.card_done(moved.key)  # twice is harmless
    assert await store.cards_open() == []


# -- leases: shared stores only ------------------------------------------------------------------
def leases(store: Store) -> LeaseStore:
    shared = lease_store(store)
    if shared is None:
        pytest.skip(f"{store.backend}:// is used by one process only: no leases")
    return shared


async def test_lease_is_exclusive_renewable_and_released_by_owner_only(store: Store) -> None:
    shared = leases(store)
    assert await shared.acquire_lease("dingtalk:c", "a", 30) is True
    assert await shared.acquire_lease("dingtalk:c", "b", 30) is False
    assert await shared.acquire_lease("dingtalk:c", "a", 30) is True  # renewal
    await shared.release_lease("dingtalk:c", "b")  # not b's to release
    assert await shared.acquire_lease("dingtalk:c", "b", 30) is False
    assert await shared.acquire_lease("dingtalk:other", "b", 30) is True
    await shared.release_lease("dingtalk:c", "a")
    assert await shared.acquire_lease("dingtalk:c", "b", 30) is True


async def test_lease_of_a_dead_holder_expires(store: Store) -> None:
    shared = leases(store)
    assert await shared.acquire_lease("feishu:c", "dead", 0.3) is True
    assert await shared.acquire_lease("feishu:c", "alive", 30) is False
    await eventually(lambda: shared.acquire_lease("feishu:c", "alive", 30))


def test_a_shared_store_without_leases_is_refused() -> None:
    class Unleased(MemoryStore):
        shared = True

    with pytest.raises(TypeError, match="shared but has no leases"):
        lease_store(Unleased())


# -- availability ----------------------------------------------------------------------------------
async def test_ping_ok_while_open_and_fails_after_close(backend: Backend) -> None:
    store = await backend.open()
    await store.ping()
    if backend.name == "memory":
        return
    await store.close()
    with pytest.raises(StoreError):
        await store.ping()
    with pytest.raises(StoreError):
        await store.claim("x", 1)
    with pytest.raises(StoreError):
        await store.backend_session("x")
    with pytest.raises(StoreError):
        await store.set_backend_session("x", "conv", 60)
    with pytest.raises(StoreError):
        await store.outbox_add(outgoing(1), 60)
    with pytest.raises(StoreError):
        await store.outbox_get("o1")
    with pytest.raises(StoreError):
        await store.outbox_update(outgoing(1), 60)
    with pytest.raises(StoreError):
        await store.outbox_queued()


# -- usage accounting ----------------------------------------------------------------------------
DAY, NEXT = "2026-12-01", "2026-12-02"
ALICE = [
    ("user", "dingtalk:alice"),
    ("conversation", "dingtalk:g1"),
    ("group", "dingtalk:g1"),
    ("bot", "dingtalk/default"),
    ("agent", "default"),
]


async def test_usage_adds_messages_and_tokens_per_subject_and_day(store: Store) -> None:
    await store.add_usage(DAY, ALICE, 120, False, 3600)
    await store.add_usage(DAY, ALICE, 30, True, 3600)
    await store.add_usage(NEXT, ALICE[:1], 5, False, 3600)
    assert await store.usage([DAY], "user", "dingtalk:alice") == UsageCount(2, 150, 30)
    assert await store.usage([DAY], "group", "dingtalk:g1") == UsageCount(2, 150, 30)
    assert await store.usage([DAY, NEXT], "user", "dingtalk:alice") == UsageCount(3, 155, 30)
    assert await store.usage([NEXT], "group", "dingtalk:g1") == UsageCount()
    assert await store.usage([DAY], "user", "dingtalk:bob") == UsageCount()
    assert await store.usage([], "user", "dingtalk:alice") == UsageCount()


async def test_usage_top_ranks_by_tokens_then_messages(store: Store) -> None:
    await store.add_usage(DAY, [("user", "a")], 10, False, 3600)
    for _ in range(3):
        await store.add_usage(DAY, [("user", "b")], 10, False, 3600)
    await store.add_usage(DAY, [("user", "c")], 30, False, 3600)
    await store.add_usage(DAY, [("user", "d")], 5, False, 3600)
    await store.add_usage(NEXT, [("user", "e")], 999, False, 3600)
    top = await store.usage_top(DAY, "user", 3)
    # b and c both have 30 tokens: b sent more messages
    assert top == [("b", UsageCount(3, 30, 0)), ("c", UsageCount(1, 30, 0)), ("a", UsageCount(1, 10, 0))]
    assert await store.usage_top(DAY, "bot", 3) == []


async def test_usage_expires_after_its_ttl(store: Store) -> None:
    await store.add_usage(DAY, [("user", "a")], 10, False, 0.2)
    assert (await store.usage([DAY], "user", "a")).messages == 1

    async def gone() -> bool:
        return (await store.usage([DAY], "user", "a")).messages == 0

    await eventually(gone)
    assert await store.usage_top(DAY, "user", 5) == []


async def test_usage_survives_reopen_and_is_shared(backend: Backend) -> None:
    first = await backend.open()
    await first.add_usage(DAY, ALICE, 42, False, 3600)
    if backend.name == "sqlite":
        await first.close()
        backend.opened.remove(first)
    second = await backend.open()  # redis: a second instance on the same server
    await second.add_usage(DAY, ALICE, 8, True, 3600)
    assert await second.usage([DAY], "user", "dingtalk:alice") == UsageCount(2, 50, 8)
    if backend.name != "sqlite":
        assert await first.usage([DAY], "bot", "dingtalk/default") == UsageCount(2, 50, 8)


async def test_a_file_from_before_usage_opens_and_counts(tmp_path: Path) -> None:
    """An existing SQLite file without the usage table gets it when opened."""
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE context (conversation TEXT PRIMARY KEY, turns BLOB NOT NULL, expires REAL NOT NULL);"
        "PRAGMA user_version = 1;"
    )
    conn.close()
    store = SqliteStore(path)
    await store.open()
    try:
        await store.add_usage(DAY, [("user", "a")], 3, False, 3600)
        assert await store.usage([DAY], "user", "a") == UsageCount(1, 3, 0)
    finally:
        await store.close()


# -- outbox: proactive messages from acceptance until delivered or given up -------------------------
def outgoing(i: int, key: str = "", created_at: float | None = None, text: str = "") -> OutboxEntry:
    return OutboxEntry(
        id=f"o{i}",
        platform="feishu",
        bot="default",
        to_kind="conversation",
        to="oc_team",
        text=text or f"notice {i} ✓",
        markdown=True,
        origin="token:ops",
        created_at=1_900_000_000.0 + i if created_at is None else created_at,
        idempotency_key=key,
    )


def sent(entry: OutboxEntry) -> OutboxEntry:
    return dataclasses.replace(entry, state=SENT, attempts=entry.attempts + 1, done_at=time.time())


async def test_outbox_entry_round_trips_and_unknown_ids_are_none(store: Store) -> None:
    entry = dataclasses.replace(outgoing(1, "token:ops:k1"), reason="throttled", attempts=2, next_at=12.5)
    assert await store.outbox_add(entry, 60) == entry
    assert await store.outbox_get("o1") == entry
    assert await store.outbox_get("o2") is None


async def test_outbox_queued_is_oldest_first_and_limited(store: Store) -> None:
    entries = [outgoing(i, created_at=t) for i, t in ((1, 30.0), (2, 10.0), (3, 20.0), (4, 40.0))]
    for entry in entries:
        await store.outbox_add(entry, 60)
    assert [e.id for e in await store.outbox_queued()] == ["o2", "o3", "o1", "o4"]
    assert [e.id for e in await store.outbox_queued(limit=2)] == ["o2", "o3"]
    assert await store.outbox_queued(limit=0) == []


async def test_outbox_idempotency_key_returns_the_first_entry(store: Store) -> None:
    first = outgoing(1, "token:ops:k1")
    assert await store.outbox_add(first, 60) == first
    again = outgoing(2, "token:ops:k1", text="a retried request")
    assert await store.outbox_add(again, 60) == first  # nothing written: the first is returned
    assert await store.outbox_get("o2") is None
    other = outgoing(3, "token:ops:k2")
    assert await store.outbox_add(other, 60) == other
    unkeyed = [outgoing(4), outgoing(5)]  # no key: never a duplicate of anything
    for entry in unkeyed:
        assert await store.outbox_add(entry, 60) == entry
    assert [e.id for e in await store.outbox_queued()] == ["o1", "o3", "o4", "o5"]


async def test_outbox_adding_the_same_entry_twice_keeps_one(store: Store) -> None:
    """An add retried after its reply was lost finds itself instead of queueing a second copy."""
    entry = outgoing(1)
    assert await store.outbox_add(entry, 60) == entry
    assert await store.outbox_add(dataclasses.replace(entry, text="changed"), 60) == entry
    assert await store.outbox_queued() == [entry]


async def test_outbox_key_dedups_while_a_done_entry_is_kept(store: Store) -> None:
    first = outgoing(1, "schedule:daily:2026-12-01")
    await store.outbox_add(first, 60)
    delivered = sent(first)
    await store.outbox_update(delivered, 60)
    assert await store.outbox_get("o1") == delivered
    assert await store.outbox_queued() == []  # done: out of the queue
    assert await store.outbox_add(outgoing(2, "schedule:daily:2026-12-01"), 60) == delivered
    assert await store.outbox_queued() == []


async def test_outbox_done_entry_and_its_key_are_forgotten_after_keep(store: Store) -> None:
    first = outgoing(1, "alertmanager:fp1")
    await store.outbox_add(first, 0.05)
    await store.outbox_update(dataclasses.replace(first, state=FAILED, reason="bot removed"), keep=0.05)
    kept = sent(outgoing(3, "alertmanager:fp3"))  # done, with a long keep: stays
    await store.outbox_add(outgoing(3, "alertmanager:fp3"), 60)
    await store.outbox_update(kept, keep=60)

    async def forgotten() -> bool:
        return await store.outbox_get("o1") is None

    await eventually(forgotten)
    fresh = outgoing(2, "alertmanager:fp1")
    assert await store.outbox_add(fresh, 60) == fresh  # the key went with its entry
    assert await store.outbox_queued() == [fresh]
    assert await store.outbox_add(outgoing(4, "alertmanager:fp3"), 60) == kept
    assert await store.outbox_get("o3") == kept


async def test_outbox_update_replaces_a_kept_entry_only(store: Store) -> None:
    first, second = outgoing(1, "token:ops:k1"), outgoing(2)
    for entry in (first, second):
        await store.outbox_add(entry, 60)
    retrying = dataclasses.replace(first, attempts=1, next_at=1_900_000_100.0, reason="HTTP 429")
    await store.outbox_update(retrying, 60)  # still queued: stays in the queue, in its place
    assert await store.outbox_queued() == [retrying, second]
    await store.outbox_update(outgoing(9), 60)  # never added: nothing written
    assert await store.outbox_get("o9") is None
    assert [e.id for e in await store.outbox_queued()] == ["o1", "o2"]
    gone = dataclasses.replace(second, state=FAILED, reason="bot removed from the chat")
    await store.outbox_update(gone, keep=0.05)

    async def forgotten() -> bool:
        return await store.outbox_get("o2") is None

    await eventually(forgotten)
    await store.outbox_update(dataclasses.replace(gone, state=QUEUED), 60)  # too late: stays forgotten
    assert await store.outbox_get("o2") is None
    assert await store.outbox_queued() == [retrying]


async def test_concurrent_outbox_adds_with_one_key_write_one_entry(backend: Backend) -> None:
    """Two instances (on Redis: two connections) accept the same request at once: one message."""
    stores = [await backend.open() for _ in range(2)] if backend.name == "redis" else [await backend.open()]
    offers = [outgoing(i, "token:ops:same") for i in range(20)]
    results = await asyncio.gather(*(stores[i % len(stores)].outbox_add(e, 60) for i, e in enumerate(offers)))
    assert len({r.id for r in results}) == 1
    for store in stores:
        assert await store.outbox_queued() == [results[0]]


async def test_a_failed_outbox_add_leaves_no_key_behind(backend: Backend) -> None:
    """A refused write is refused whole: the caller's retry with the same key is queued."""
    store = await backend.open()
    big = outgoing(1, "token:ops:big", text="x" * 20_000)
    async with refusing_writes(backend, store):
        with pytest.raises(StoreError):
            await store.outbox_add(big, 60)
    assert await store.outbox_get("o1") is None
    assert await store.outbox_add(big, 60) == big
    assert await store.outbox_queued() == [big]


async def test_outbox_survives_reopen_and_is_shared(backend: Backend) -> None:
    if backend.name == "memory":
        pytest.skip("memory:// is not durable by design")
    first = await backend.open()
    queued, done = outgoing(1, "token:ops:k1"), sent(outgoing(2, "token:ops:k2"))
    await first.outbox_add(queued, 60)
    await first.outbox_add(outgoing(2, "token:ops:k2"), 60)
    await first.outbox_update(done, 600)
    await first.close()
    backend.opened.remove(first)

    reopened = await backend.open()  # a restart (redis: or another instance)
    assert await reopened.outbox_queued() == [queued]
    assert await reopened.outbox_get("o2") == done
    assert await reopened.outbox_add(outgoing(3, "token:ops:k2"), 60) == done
