"""Redis store (`redis://`, `rediss://`, `unix://`): state shared by several gateway instances.

Every key starts with `botgate:`. Multi-key steps run as Lua scripts (atomic, one round trip), and
so do hot steps of several commands: each round trip costs the gateway ~0.1-0.2 ms of CPU in
redis-py, 11 of them per answered message (docs/state.md, "Round trips per answer"). The inbox and
dedup keys share the `{inbox}` hash tag, the outbox's keys `{outbox}`; the lease read with the
pending inbox and the usage figures span hash slots, so the store is for one Redis server (with
replicas), not a Redis Cluster (whose client it does not use either). Dedup claims (and
admissions, which claim) and lease changes are idempotent under redis-py's retry of a command whose
reply was lost: a claim stores a per-call token, so a retried claim recognises its own earlier
success instead of calling the message a duplicate (which would ACK and drop it); an outbox add
finds the entry it wrote itself; a context swap finds the turns it wrote.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from urllib.parse import urlsplit

import orjson
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from ..errors import StoreError
from ..messages import InboundMessage
from .base import (
    CardRecord,
    OutboxEntry,
    Turn,
    UsageCount,
    decode_cards,
    decode_kept,
    decode_messages,
    decode_outbox,
    encode_message,
    top_usage,
    trim_turns,
)

log = logging.getLogger(__name__)

PREFIX = "botgate:"
INBOX = PREFIX + "{inbox}"  # hash: request_id -> message JSON
INBOX_SEQ = INBOX + ":seq"  # counter giving the global arrival order
INBOX_ORDER = INBOX + ":order"  # sorted set: request_id by seq
DEDUP = INBOX + ":dedup:"  # + key: a claim's token, with the dedup TTL
CARDS = PREFIX + "cards"  # hash: card key -> record JSON (streaming cards still open)
OUTBOX = PREFIX + "{outbox}:"  # + id: an entry's JSON; once done, with its keep time as TTL
OUTBOX_KEY = OUTBOX + "key:"  # + idempotency key: the id of the entry kept under it, same TTL
OUTBOX_QUEUE = OUTBOX + "queue"  # sorted set: queued entry ids by created_at
CONTEXT = PREFIX + "ctx:"  # + context key: its turns JSON, with the idle TTL
SESSION = PREFIX + "backend:"  # + context key: the backend's conversation id, with the idle TTL
USAGE = PREFIX + "usage:"  # + "<day>:<kind>": hash m:/t:/e:<subject> -> messages/tokens/estimated
# ... + ":top": sorted set of the day's subjects of that kind by tokens * TOP_SCALE + messages
TOP_SCALE = 1_000_000  # exact in a double up to ~9e9 tokens a day per subject
CHUNK = 500  # ids per HMGET when reading the inbox
# Seconds a command may wait for a free pooled connection. Under a backlog (thousands of messages
# answered at once on 128 connections, the CPU saturated) that wait passes the 5 s command timeout
# on a healthy Redis; counted as an outage it held messages unACKed and sent apologies. A down Redis
# still shows: each command ahead fails within the command timeout and frees its connection.
POOL_WAIT = 120.0
# Conversations whose turns, as `context` last read them, are kept for the append after the answer:
# 8x the default answers at once; a miss costs one more round trip, never a lost turn.
READ_KEPT = 512

_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
return 0
"""
# Claim and inbox entry in one script: Redis runs it whole, so there is never a claim without its
# entry (a redelivery dropped as a duplicate of a message nobody will answer).
_ADMIT = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
end
if redis.call('HSETNX', KEYS[2], ARGV[3], ARGV[4]) == 1 then
  local seq = redis.call('INCR', KEYS[3])
  redis.call('ZADD', KEYS[4], seq, ARGV[3])
  redis.call('ZADD', KEYS[5], seq, ARGV[3])
end
return 1
"""
_INBOX_DONE = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"""
# Continuous refill at capacity/minute, timed by the server's clock so instances need no sync.
_TAKE_TOKEN = """
local capacity = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or capacity
local ts = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - ts) * capacity / 60000)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], 60000)
return allowed
"""
# KEYS: per subject its kind's figures and top; ARGV: tokens, "1" if estimated, TTL ms, top score
# increment, then the subjects. One round trip of one command for the client (~0.13 ms of its CPU,
# against ~0.6 ms for the same 20 commands pipelined).
_ADD_USAGE = """
local tokens, estimated, ttl, score = ARGV[1], ARGV[2] == '1', ARGV[3], ARGV[4]
for i = 5, #ARGV do
  local figures, top, subject = KEYS[2 * i - 9], KEYS[2 * i - 8], ARGV[i]
  redis.call('HINCRBY', figures, 'm:' .. subject, 1)
  redis.call('HINCRBY', figures, 't:' .. subject, tokens)
  if estimated then redis.call('HINCRBY', figures, 'e:' .. subject, tokens) end
  redis.call('ZINCRBY', top, score, subject)
  redis.call('PEXPIRE', figures, ttl)
  redis.call('PEXPIRE', top, ttl)
end
return 1
"""
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
# KEYS: lease, the conversation's inbox order, inbox. The lease taken (or renewed) and, with it, the
# conversation's pending entries oldest first: what its holder answers. Nothing while another owner
# holds it. An id without a body is not returned (`inbox_pending` skips it the same way).
_LEASE_PENDING = """
local holder = redis.call('GET', KEYS[1])
if holder ~= false and holder ~= ARGV[1] then return false end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local ids = redis.call('ZRANGE', KEYS[2], 0, -1)
local bodies = {}
for start = 1, #ids, CHUNK do
  local rows = redis.call('HMGET', KEYS[3], unpack(ids, start, math.min(start + CHUNK - 1, #ids)))
  for _, body in ipairs(rows) do
    if body then bodies[#bodies + 1] = body end
  end
end
return bodies
""".replace("CHUNK", str(CHUNK))
# KEYS: context; ARGV: the turns as last read ("": none; stored turns are never empty, a JSON
# list), the new turns, idle TTL ms. Written only over what was read, else it returns the turns
# there now (in a list: "" for none) to retry on; a retry of a swap that was done finds its turns.
_CONTEXT_SWAP = """
local now = redis.call('GET', KEYS[1]) or ''
if now ~= ARGV[1] and now ~= ARGV[2] then return {now} end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return false
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Only a card still recorded is updated: a late update never brings back a finished card.
_CARD_UPDATE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""

# KEYS: entry, queue[, idempotency key]. The key is looked at and taken with the entry written, so
# two instances adding under one key at once write one entry. Returns the id of an entry already
# kept under the key (or with this id: a retry of an add whose reply was lost), else nothing.
_OUTBOX_ADD = """
if KEYS[3] then
  local kept = redis.call('GET', KEYS[3])
  if kept then return kept end
end
if not redis.call('SET', KEYS[1], ARGV[2], 'NX') then return ARGV[1] end
if KEYS[3] then redis.call('SET', KEYS[3], ARGV[1]) end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return false
"""
# KEYS: entry, queue[, idempotency key]; ARGV: id, entry, created_at, keep ms ("" while queued).
# Only an entry still kept is replaced: a late update never brings back a forgotten one (a done
# entry kept for keep_for may still be listed by a racing outbox_queued: the courier re-reads it).
_OUTBOX_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local mine = KEYS[3] and redis.call('GET', KEYS[3]) == ARGV[1]
if ARGV[4] == '' then
  redis.call('SET', KEYS[1], ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
  if mine then redis.call('PERSIST', KEYS[3]) end
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[4])
  redis.call('ZREM', KEYS[2], ARGV[1])
  if mine then redis.call('PEXPIRE', KEYS[3], ARGV[4]) end
end
return 1
"""

_SCRIPTS = {
    "claim": _CLAIM,
    "admit": _ADMIT,
    "inbox_done": _INBOX_DONE,
    "take_token": _TAKE_TOKEN,
    "add_usage": _ADD_USAGE,
    "acquire": _ACQUIRE,
    "lease_pending": _LEASE_PENDING,
    "release": _RELEASE,
    "context_swap": _CONTEXT_SWAP,
    "card_update": _CARD_UPDATE,
    "outbox_add": _OUTBOX_ADD,
    "outbox_update": _OUTBOX_UPDATE,
}


def safe_url(url: str) -> str:
    """The URL without credentials, for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return f"{parts.scheme}://{netloc}{parts.path}"


class RedisStore:
    backend = "redis"
    shared = True

    def __init__(
        self,
        url: str,
        connect_timeout: float = 2.0,
        timeout: float = 5.0,
        max_connections: int = 128,
        pool_wait: float = POOL_WAIT,
    ) -> None:
        self.url = url
        self._max_connections = max_connections
        self._pool_wait = pool_wait
        self._where = safe_url(url)
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._redis: Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        # Per conversation, its turns as `context` last read them: what the append after the
        # answer writes over, without reading them again (the swap checks they are still there).
        self._read: dict[str, bytes] = {}

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except RedisError as e:
            raise StoreError(f"redis {self._where}: {what}: {e}") from e

    @property
    def _r(self) -> Redis:
        if self._redis is None:
            raise StoreError("store is closed")
        return self._redis

    async def _script(self, name: str, keys: list[str], args: list[str | int | bytes]) -> int:
        return int(await self._scripts[name](keys, args, client=self._r))

    # -- lifecycle ----------------------------------------------------------------------------
    async def open(self) -> None:
        # Few, fast retries: they cover a pooled connection that died with a Redis restart;
        # a real outage must surface within a fraction of a second (readiness, no ACK).
        retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.2), 2, (RedisConnectionError,))
        try:
            # Blocking pool: a burst waits for a free connection instead of failing with "Too many
            # connections" (the default pool's behaviour past its limit). That wait is the load's
            # queue, not an outage: it has its own, longer bound (`POOL_WAIT`), while `timeout`
            # bounds each command on its connection, which is what fails when Redis is down.
            pool = BlockingConnectionPool.from_url(
                self.url,
                max_connections=self._max_connections,
                timeout=self._pool_wait,
                socket_connect_timeout=self._connect_timeout,
                socket_timeout=self._timeout,
                retry=retry,
            )
        except ValueError as e:
            raise StoreError(f"redis {self._where}: bad store url: {e}") from e
        redis = Redis.from_pool(pool)
        try:
            with self._errors("unreachable"):
                await redis.ping()
        except StoreError:
            await redis.aclose()
            raise
        self._redis = redis
        # EVALSHA, re-loading the script by itself after a Redis restart flushed it.
        self._scripts = {name: redis.register_script(source) for name, source in _SCRIPTS.items()}
        log.info("store opened", extra={"backend": "redis", "store_url": self._where})

    async def close(self) -> None:
        if self._redis is not None:
            redis, self._redis = self._redis, None
            await redis.aclose()

    async def ping(self) -> None:
        with self._errors("unreachable"):
            await self._r.ping()

    # -- dedup --------------------------------------------------------------------------------
    async def claim(self, key: str, ttl: float) -> bool:
        with self._errors("claim"):
            token = uuid.uuid4().hex
            return bool(await self._script("claim", [DEDUP + key], [token, _ms(ttl)]))

    # -- inbox --------------------------------------------------------------------------------
    async def admit(self, message: InboundMessage, ttl: float) -> bool:
        keys = [
            DEDUP + message.dedup_key,
            INBOX,
            INBOX_SEQ,
            INBOX_ORDER,
            _conversation_order(message.conversation_key),
        ]
        args: list[str | int | bytes] = [
            uuid.uuid4().hex, _ms(ttl), message.request_id, encode_message(message)
        ]
        with self._errors("inbox add"):
            return bool(await self._script("admit", keys, args))

    async def inbox_done(self, message: InboundMessage) -> None:
        keys = [INBOX, INBOX_ORDER, _conversation_order(message.conversation_key)]
        with self._errors("inbox done"):
            await self._script("inbox_done", keys, [message.request_id])

    async def inbox_pending(self, conversation: str | None = None) -> list[InboundMessage]:
        order = INBOX_ORDER if conversation is None else _conversation_order(conversation)
        with self._errors("inbox read"):
            ids: list[bytes] = list(await self._r.zrange(order, 0, -1))  # type: ignore[arg-type]
            if not ids:
                return []
            async with self._r.pipeline(transaction=False) as pipe:
                for start in range(0, len(ids), CHUNK):
                    pipe.hmget(INBOX, ids[start : start + CHUNK])
                chunks = await pipe.execute()
        # An id without a body was answered between the two reads.
        return decode_messages([raw for chunk in chunks for raw in chunk if raw is not None])

    # -- context ------------------------------------------------------------------------------
    async def context(self, conversation: str) -> list[Turn]:
        with self._errors("context read"):
            raw = await self._r.get(CONTEXT + conversation)
        self._read.pop(conversation, None)  # newest read last: the oldest go first past READ_KEPT
        self._read[conversation] = _bytes(raw or b"")
        if len(self._read) > READ_KEPT:
            del self._read[next(iter(self._read))]
        return _turns(raw) if raw else []

    async def append_turns(
        self, conversation: str, turns: list[Turn], max_turns: int, max_chars: int, idle_ttl: float
    ) -> None:
        key = CONTEXT + conversation
        with self._errors("context write"):
            # The lease already serialises writers of one conversation; the swap (written only over
            # the turns read, else it hands back the turns there now) guards the rest. One round
            # trip after `context` read the turns, else two; not WATCH's three.
            raw = self._read.pop(conversation, None)
            if raw is None:
                raw = _bytes(await self._r.get(key) or b"")
            for _ in range(5):
                kept = trim_turns((_turns(raw) if raw else []) + turns, max_turns, max_chars)
                value = orjson.dumps([[t.role, t.content] for t in kept])
                found = await self._scripts["context_swap"]([key], [raw, value, _ms(idle_ttl)], client=self._r)
                if found is None:
                    return
                raw = _bytes(found[0])
        raise StoreError(f"redis {self._where}: context write: too much contention on {conversation}")

    async def reset(self, conversation: str) -> None:
        self._read.pop(conversation, None)
        with self._errors("context reset"):
            # Two single-key DELs in one round trip (no multi-key command across hash slots).
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.delete(CONTEXT + conversation)
                pipe.delete(SESSION + conversation)
                await pipe.execute()

    # -- backend sessions -------------------------------------------------------------------------
    async def backend_session(self, key: str) -> str | None:
        with self._errors("backend session read"):
            raw = await self._r.get(SESSION + key)
        return raw.decode() if isinstance(raw, bytes) else raw

    async def set_backend_session(self, key: str, session: str, ttl: float) -> None:
        with self._errors("backend session write"):
            await self._r.set(SESSION + key, session, px=_ms(ttl))

    # -- model cache ----------------------------------------------------------------------------
    async def cache_get(self, key: str) -> str | None:
        with self._errors("cache read"):
            raw = await self._r.get(f"{PREFIX}cache:{key}")
        return raw.decode() if isinstance(raw, bytes) else raw

    async def cache_put(self, key: str, value: str, ttl: float) -> None:
        with self._errors("cache write"):
            await self._r.set(f"{PREFIX}cache:{key}", value, px=_ms(ttl))

    # -- rate limit -----------------------------------------------------------------------------
    async def take_token(self, bucket: str, per_minute: int) -> bool:
        with self._errors("rate limit"):
            return bool(await self._script("take_token", [f"{PREFIX}bucket:{bucket}"], [per_minute]))

    # -- usage accounting -------------------------------------------------------------------------
    async def add_usage(
        self, day: str, subjects: Sequence[tuple[str, str]], tokens: int, estimated: bool, ttl: float
    ) -> None:
        # One script: every instance adds to the same counters. (A script retried after a lost
        # reply may count a message twice: figures, not a ledger.)
        if not subjects:
            return
        keys = [key for kind, _ in subjects for key in (f"{USAGE}{day}:{kind}", f"{USAGE}{day}:{kind}:top")]
        args: list[str | int | bytes] = [
            tokens, "1" if estimated else "0", _ms(ttl), tokens * TOP_SCALE + 1, *(s for _, s in subjects)
        ]
        with self._errors("usage write"):
            await self._script("add_usage", keys, args)

    async def usage(self, days: Sequence[str], kind: str, subject: str) -> UsageCount:
        fields = ["m:" + subject, "t:" + subject, "e:" + subject]
        with self._errors("usage read"):
            async with self._r.pipeline(transaction=False) as pipe:
                for day in days:
                    pipe.hmget(f"{USAGE}{day}:{kind}", fields)
                rows = await pipe.execute()
        total = UsageCount()
        for row in rows:
            total += UsageCount(*(int(v or 0) for v in row))
        return total

    async def usage_top(self, day: str, kind: str, limit: int) -> list[tuple[str, UsageCount]]:
        if limit <= 0:
            return []
        figures = f"{USAGE}{day}:{kind}"
        with self._errors("usage read"):
            raw = await self._r.zrevrange(figures + ":top", 0, limit - 1)
            if not raw:
                return []
            names = [r.decode() if isinstance(r, bytes) else str(r) for r in raw]
            values = await self._r.hmget(figures, [f"{f}:{n}" for n in names for f in "mte"])
        rows = [
            (name, UsageCount(*(int(v or 0) for v in values[3 * i : 3 * i + 3])))
            for i, name in enumerate(names)
        ]
        return top_usage(rows, limit)

    # -- leases -----------------------------------------------------------------------------------
    async def acquire_lease(self, conversation: str, owner: str, ttl: float) -> bool:
        with self._errors("lease"):
            return bool(await self._script("acquire", [f"{PREFIX}lease:{conversation}"], [owner, _ms(ttl)]))

    async def lease_pending(self, conversation: str, owner: str, ttl: float) -> list[InboundMessage] | None:
        keys = [f"{PREFIX}lease:{conversation}", _conversation_order(conversation), INBOX]
        with self._errors("lease"):
            rows = await self._scripts["lease_pending"](keys, [owner, _ms(ttl)], client=self._r)
        return None if rows is None else decode_messages([_bytes(raw) for raw in rows])

    async def release_lease(self, conversation: str, owner: str) -> None:
        with self._errors("lease release"):
            await self._script("release", [f"{PREFIX}lease:{conversation}"], [owner])

    # -- outbox -----------------------------------------------------------------------------------
    async def outbox_add(self, entry: OutboxEntry, keep: float) -> OutboxEntry:
        args: list[str | int | bytes] = [entry.id, entry.encode(), repr(entry.created_at)]
        with self._errors("outbox add"):
            for _ in range(3):
                kept = await self._scripts["outbox_add"](_outbox_keys(entry), args, client=self._r)
                if kept is None:
                    return entry
                raw = await self._r.get(OUTBOX + _text(kept))
                if raw is not None:
                    return decode_kept(_bytes(raw), entry)
                # Forgotten (its keep time passed) between the two calls: the key is free now.
        raise StoreError(f"redis {self._where}: outbox add: the entry kept for {entry.id!r} keeps vanishing")

    async def outbox_get(self, entry_id: str) -> OutboxEntry | None:
        with self._errors("outbox read"):
            raw = await self._r.get(OUTBOX + entry_id)
        found = decode_outbox([_bytes(raw)]) if raw is not None else []
        return found[0] if found else None

    async def outbox_update(self, entry: OutboxEntry, keep: float) -> None:
        args: list[str | int | bytes] = [
            entry.id, entry.encode(), repr(entry.created_at), _ms(keep) if entry.done else ""
        ]
        with self._errors("outbox update"):
            await self._script("outbox_update", _outbox_keys(entry), args)

    async def outbox_queued(self, limit: int = 1000) -> list[OutboxEntry]:
        if limit <= 0:
            return []
        with self._errors("outbox read"):
            ids: list[bytes] = list(await self._r.zrange(OUTBOX_QUEUE, 0, limit - 1))  # type: ignore[arg-type]
            if not ids:
                return []
            rows = await self._r.mget([OUTBOX + _text(i) for i in ids])
        # An id without an entry was done (and forgotten) between the two reads.
        return decode_outbox([_bytes(raw) for raw in rows if raw is not None])

    # -- open streaming cards -----------------------------------------------------------------------
    async def card_open(self, record: CardRecord) -> None:
        with self._errors("card record"):
            await self._r.hset(CARDS, record.key, record.encode())

    async def card_update(self, record: CardRecord) -> None:
        with self._errors("card record"):
            await self._script("card_update", [CARDS], [record.key, record.encode()])

    async def card_done(self, key: str) -> None:
        with self._errors("card record"):
            await self._r.hdel(CARDS, key)

    async def cards_open(self) -> list[CardRecord]:
        with self._errors("card records"):
            rows = await self._r.hvals(CARDS)
        return decode_cards([row if isinstance(row, bytes) else row.encode() for row in rows])


def _conversation_order(conversation: str) -> str:
    return f"{INBOX}:conv:{conversation}"


def _outbox_keys(entry: OutboxEntry) -> list[str]:
    keys = [OUTBOX + entry.id, OUTBOX_QUEUE]
    return [*keys, OUTBOX_KEY + entry.idempotency_key] if entry.idempotency_key else keys


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _bytes(raw: bytes | str) -> bytes:
    return raw if isinstance(raw, bytes) else raw.encode()


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _turns(raw: bytes | str) -> list[Turn]:
    return [Turn(role, content) for role, content in orjson.loads(raw)]
