"""Scenario 11: scale-out on Redis. One and two gateway instances on one redis-server, each
instance pinned to its own core, every message answered (instant model double): answers/s over
DingTalk Stream (the double spreads CALLBACK frames over both instances' connections, as the
platform does) and over the signed webhook behind nginx (round-robin), with every answer counted
per msgId at the sink: an answer given twice or never is a broken gateway (BenchError), not a
slow one. Some messages are delivered twice, the copy over the other connection (to the other
instance), to prove the dedup across instances.

On a 2-core machine two instances take both cores, so Redis, the doubles and the load generator
have none of their own; the rows say how much CPU each side used, and besides the raw ratio the
answers per gateway CPU-second, which is the scaling apart from the missing third core."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import aiohttp
import orjson
import redis as redis_client

from tests.redisd import RedisServer

from .balancer import NO_NGINX, nginx, nginx_path
from .context import BenchError, Context, store_url
from .dingtalk import WEBHOOK_PATH, DingTalkDouble, chatbot_payload
from .doubles import RawServer, Sink, instant_model
from .env import Cores, cpu_seconds, free_port, sched_wait_seconds
from .ingress import PATH, accepted, replies_delivered
from .load import CONVERSATIONS, run_load, signed_headers
from .report import Row, at_least_ratio
from .servers import ServerProcess, dingtalk_section, gateway, gateway_sections
from .stream import pump

S11 = "11. Scale-out on Redis"
TARGET = 1.7
REDELIVER_EVERY = 50  # every 50th Stream message is delivered a second time, over the other connection
REDELIVERED_WEBHOOKS = 20  # webhook messages POSTed twice in a row (round-robin: to both instances)
# Messages sent but not yet answered, at most: users wait for an answer before they write again.
# An open loop (ACK-bounded only) would pile up a backlog of thousands, each conversation's worker
# holding a lease and queueing Redis commands (docs/benchmarks.md, scenario 11). 400, as in
# scenario 12: enough that two instances are kept busy (with 200 they idled ~25 % waiting on
# Redis round trips), not so many that one instance's answers queue for pooled connections.
WINDOW = 400
# The shipped max_concurrency, not the bench's 4096: wrk's open loop queues a backlog, and with
# every queued message answered at once their Redis commands wait for the store's 128 pooled
# connections past its timeout (docs/benchmarks.md, scenario 11). 64 at once keep a core busy.
DISPATCHER = {"max_concurrency": 64}


@dataclass(frozen=True, slots=True)
class CpuSplit:
    """CPU seconds each side used during one measured run of `seconds`."""

    seconds: float
    gateways: tuple[float, ...]
    waited: tuple[float, ...]  # seconds each gateway was runnable but waiting for a CPU
    redis: float
    bench: float  # this process: the doubles (platform, model, sink) and the frame pump
    others: tuple[tuple[str, float], ...] = ()  # wrk, nginx
    redis_commands: int = 0  # commands Redis ran (INFO commandstats), every instance's together

    @property
    def gateway_total(self) -> float:
        return sum(self.gateways)

    def describe(self) -> str:
        def share(cpu: float) -> str:
            return f"{cpu / self.seconds:.0%}"

        cores = " and ".join(share(g) for g in self.gateways)
        waited = " and ".join(share(w) for w in self.waited)
        redis = (("Redis", self.redis),) if self.redis_commands else ()  # none on the SQLite row
        rest = ", ".join(f"{name} {share(cpu)}" for name, cpu in (*redis, *self.others))
        return (
            f"gateway cores busy {cores} (waiting for a CPU {waited} of the time); of a core: "
            + (f"{rest}, " if rest else "")
            + f"doubles + pump (bench process) {share(self.bench)} over {self.seconds:.1f} s"
        )


@dataclass(frozen=True, slots=True)
class Run:
    instances: int
    answered: int
    seconds: float  # first message sent -> last answer at the sink
    cpu: CpuSplit
    duplicates: int
    redelivered: int
    apologies: int  # replies that were not the model's answer (a notice, an apology)
    detail: str  # how the messages were sent and spread

    @property
    def rate(self) -> float:
        return self.answered / self.seconds

    @property
    def per_cpu_second(self) -> float:
        return self.answered / self.cpu.gateway_total


class Meter:
    """CPU of every process of one run, from its start to `stop()`."""

    def __init__(
        self, gateways: Sequence[ServerProcess], redis: RedisServer | None, others: Sequence[ServerProcess] = (),
        wrk: bool = False,
    ) -> None:
        """`redis`: the one the gateways use (None: they do not)."""
        self._pids = [p.pid for p in gateways]
        self._redis = redis.proc.pid if redis is not None and redis.proc is not None else None
        self._others = [(p.name.partition("-")[0], p.pid) for p in others]
        self._redis_port = redis.port if redis is not None else None
        self._rest = [os.getpid(), *(pid for _, pid in self._others)]
        self._commands = self._redis_commands()
        self._started = time.monotonic()
        self._base = self._read()
        self._waited = [sched_wait_seconds(pid) for pid in self._pids]
        self._wrk = wrk  # wrk runs (and exits) during the run: its CPU is this process's children's
        self._children = resource.getrusage(resource.RUSAGE_CHILDREN)

    def _redis_commands(self) -> int:
        if self._redis_port is None:
            return 0
        with redis_client.Redis(port=self._redis_port) as client:
            stats: dict[str, dict[str, int]] = client.info("commandstats")
        return sum(s["calls"] for name, s in stats.items() if name != "cmdstat_info")

    def _read(self) -> list[float]:
        redis = cpu_seconds(self._redis) if self._redis is not None else 0.0
        return [*(cpu_seconds(pid) for pid in self._pids), redis, *(cpu_seconds(pid) for pid in self._rest)]

    def stop(self, until: float | None = None) -> CpuSplit:
        now = self._read()
        used = [b - a for a, b in zip(self._base, now, strict=True)]
        n = len(self._pids)
        others = [(name, used[n + 2 + i]) for i, (name, _) in enumerate(self._others)]
        children = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, once it has exited
        wrk = children.ru_utime + children.ru_stime - self._children.ru_utime - self._children.ru_stime
        if self._wrk:
            others.insert(0, ("wrk", wrk))
        seconds = (until or time.monotonic()) - self._started
        waited = tuple(sched_wait_seconds(pid) - w for pid, w in zip(self._pids, self._waited, strict=True))
        commands = self._redis_commands() - self._commands
        return CpuSplit(seconds, tuple(used[:n]), waited, used[n], used[n + 1], tuple(others), commands)


def instance_cores(cores: Cores, index: int) -> Cores:
    """The first instance on the server core (as every scenario's server), the second on the
    load core: a 2-core machine has no third."""
    return cores if index == 0 else Cores(cores.load, cores.load)


@asynccontextmanager
async def instances(
    ctx: Context, count: int, store: str, model: RawServer, dingtalk: dict[str, object], tag: str
) -> AsyncIterator[list[ServerProcess]]:
    procs = []
    for i in range(count):
        sections = gateway_sections(
            free_port(), model.url + "/v1", store, dingtalk=dingtalk, dispatcher=DISPATCHER
        )
        procs.append(gateway(instance_cores(ctx.cores, i), ctx.workdir, sections, f"gateway-{tag}-{i + 1}of{count}"))
    try:
        await asyncio.gather(*(p.start() for p in procs))
        yield procs
    finally:
        await asyncio.gather(*(p.stop() for p in procs))


async def settled(procs: Sequence[ServerProcess], within: float) -> bool:
    """Every message the instances accepted has its reply (the gateways' own counters)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        taken = sum([await accepted(p) for p in procs])
        answered = sum([await replies_delivered(p, "dingtalk") for p in procs])
        if answered >= taken:
            return True
        await asyncio.sleep(0.1)
    return False


def _check(what: str, duplicates: int, lost: int, answers: Counter[str]) -> None:
    if duplicates or lost:
        twice = [m for m, n in answers.items() if n > 1][:5]
        raise BenchError(f"{what}: {duplicates} duplicate answers (e.g. {twice}), {lost} messages never answered")


REPLIES = r'^botgate_replies_total\{[^}]*outcome="(\w+)"[^}]*\} ([\d.e+]+)$'


async def _outcomes(procs: Sequence[ServerProcess]) -> Counter[str]:
    """botgate_replies_total by outcome, summed over the instances."""
    total: Counter[str] = Counter()
    async with aiohttp.ClientSession() as http:
        for proc in procs:
            async with http.get(proc.url + "/metrics") as resp:
                text = await resp.text()
            for outcome, value in re.findall(REPLIES, text, re.M):
                total[outcome] += int(float(value))
    return total


def _not_ok(before: Counter[str], after: Counter[str]) -> int:
    return sum(after[o] - before[o] for o in after if o != "ok")


# -- DingTalk Stream ---------------------------------------------------------------------------
async def _stream_run(ctx: Context, redis: RedisServer, model: RawServer, n: int, store: str = "") -> Run:
    """`n` instances on `redis` (or, with `store`, one instance on that store instead)."""
    messages, window = ctx.pick(8_000, 300), ctx.pick(WINDOW, 100)
    redis.flush()  # every double numbers its msgIds from 0: the last run's dedup keys would drop them
    double = await DingTalkDouble().start()
    section = dingtalk_section(double.api_base, double.sink.server.url)
    try:
        async with instances(ctx, n, store or redis.url, model, section, f"stream-{n}{store[:6]}") as procs:
            try:
                await double.wait_connections(n)
            except TimeoutError:
                raise BenchError(f"{n} instances opened {double.open_connections} Stream connections") from None
            replies: dict[str, asyncio.Future[float]] = {}
            acks: dict[str, asyncio.Future[float]] = {}

            async def send(i: int, tag: str) -> asyncio.Future[float]:
                frame_id, msg_id, frame = double.callback_frame(f"{tag}{i % CONVERSATIONS}", f"scale {tag} {i}")
                replies[msg_id] = reply = double.expect_reply(msg_id)
                acks[frame_id] = double.expect_ack(frame_id)
                used = await double.push(frame)
                if i % REDELIVER_EVERY == REDELIVER_EVERY - 1:  # the platform's redelivery, other connection
                    again = orjson.loads(frame)
                    again["headers"]["messageId"] = frame_id + "-again"
                    acks[frame_id + "-again"] = double.expect_ack(frame_id + "-again")
                    await double.push(orjson.dumps(again).decode(), via=used + 1)
                return reply

            await pump(lambda i: send(i, "w"), ctx.pick(1000, 50), window, 60.0)  # warm-up
            if not await settled(procs, 60.0):
                raise BenchError(f"{n} instance(s): the warm-up was not all answered")
            replies.clear()
            acks.clear()
            before = Counter(double.frames_per_connection)
            base = await _outcomes(procs)
            meter = Meter(procs, None if store else redis)
            started = time.monotonic()
            with contextlib.suppress(BenchError):  # some never answered: counted below
                await pump(lambda i: send(i, "m"), messages, window, 120.0)
            done = [f.result() for f in replies.values() if f.done()]
            cpu = meter.stop(max(done, default=time.monotonic()))
            lost = len(replies) - len(done)
            await asyncio.wait(acks.values(), timeout=10.0)
            await settled(procs, 5.0)  # a second answer would come in by now
            duplicates = sum(double.replied[m] - 1 for m in replies if double.replied[m] > 1)
            _check(f"Stream, {n} instance(s)", duplicates, lost, double.replied)
            # Answered but not ACKed: the gateway held it in memory (a store command waited longer
            # than the store's timeout); the platform would deliver it again, and it is not lost.
            unacked = sum(not f.done() for f in acks.values())
            if double.bad_acks:
                raise BenchError(f"Stream, {n} instance(s): {double.bad_acks} ACKs without code 200")
            apologies = _not_ok(base, await _outcomes(procs))
            spread = " / ".join(
                f"{double.frames_per_connection[c] - before[c]:,}" for c in sorted(double.frames_per_connection)
                if double.frames_per_connection[c] > before[c]
            )
    finally:
        await double.stop()
    redelivered = messages // REDELIVER_EVERY
    detail = f"<= {window} unanswered at a time; frames per connection {spread}" + (
        f"; {unacked} answered but not ACKed (held in memory: a store command waited past its timeout)"
        if unacked
        else ""
    )
    return Run(n, len(done), max(done) - started, cpu, duplicates, redelivered, apologies, detail)


# -- webhook behind nginx ------------------------------------------------------------------------
class Answers:
    """The webhook scenario's sessionWebhook sink, counting answers per msgId (the `m` query)."""

    def __init__(self) -> None:
        self.sink = Sink({WEBHOOK_PATH.encode(): b'{"errcode":0,"errmsg":"ok"}'}, (WEBHOOK_PATH.encode(),))
        self.sink.on_reply = self._on_reply
        self.per_msg: Counter[str] = Counter()
        self.last_at = 0.0

    def _on_reply(self, path: bytes, body: bytes) -> None:
        self.per_msg[parse_qs(urlsplit(path.decode()).query).get("m", [""])[0]] += 1
        self.last_at = time.monotonic()

    @property
    def hook(self) -> str:
        """The sessionWebhook wrk's bodies carry: load.py appends `?session=<conversation>` to it,
        which lands in a second query field here, so the msgId hole fills `m`."""
        return f"{self.sink.server.url}{WEBHOOK_PATH}?m=@@ID@@&"


async def _post_twice(lb: ServerProcess, answers: Answers, tag: str) -> int:
    """Each of a few messages POSTed twice in a row: nginx sends the copies to both instances;
    both must get 200 (the second as a duplicate) and the message one answer."""
    headers = signed_headers()
    async with aiohttp.ClientSession() as http:
        for i in range(REDELIVERED_WEBHOOKS):
            msg_id = f"{tag}-twice-{i}"
            hook = f"{answers.sink.server.url}{WEBHOOK_PATH}?m={msg_id}"
            body = orjson.dumps(chatbot_payload(msg_id, f"{tag}twice{i}", f"twice {i}", hook))
            for _ in range(2):
                async with http.post(lb.url + PATH, data=body, headers=headers) as resp:
                    if resp.status != 200:
                        raise BenchError(f"{lb.name}: a redelivered webhook got {resp.status}")
    return REDELIVERED_WEBHOOKS


async def _webhook_run(ctx: Context, redis: RedisServer, model: RawServer, n: int) -> Run:
    seconds = ctx.pick(6.0, 1.0)
    redis.flush()  # each run starts on an empty store, as the Stream runs do
    answers = Answers()
    await answers.sink.server.start()
    section = dingtalk_section("http://127.0.0.1:9", answers.sink.server.url, "webhook")
    try:
        async with instances(ctx, n, redis.url, model, section, f"webhook-{n}") as procs:
            lb = nginx(ctx.cores, ctx.workdir, procs, f"nginx-{n}")
            async with lb:
                if not ctx.quick:  # warm-up: pooled connections, the first Lua scripts in Redis
                    await run_load(lb.url, PATH, answers.hook, 1.0, ctx.cores, ctx.workdir)
                if not await settled(procs, 60.0):
                    raise BenchError(f"webhook, {n} instance(s): the warm-up was not all answered")
                taken = sum([await accepted(p) for p in procs])
                base = await _outcomes(procs)
                known = set(answers.per_msg)
                meter = Meter(procs, redis, (lb,), wrk=True)
                started = time.monotonic()
                result = await run_load(lb.url, PATH, answers.hook, seconds, ctx.cores, ctx.workdir)
                await settled(procs, ctx.pick(120.0, 30.0))
                cpu = meter.stop(answers.last_at)
                last = answers.last_at
                redelivered = await _post_twice(lb, answers, f"n{n}")
                await settled(procs, 10.0)
                taken = sum([await accepted(p) for p in procs]) - taken
                apologies = _not_ok(base, await _outcomes(procs))
        if result.non_2xx:
            raise BenchError(f"webhook, {n} instance(s): {result.non_2xx} of {result.requests} requests not 2xx")
        new = [m for m in answers.per_msg if m not in known]
        duplicates = sum(answers.per_msg[m] - 1 for m in new if answers.per_msg[m] > 1)
        lost = max(0, taken - len(new))
        _check(f"webhook, {n} instance(s)", duplicates, lost, answers.per_msg)
        answered = len(new) - redelivered
    finally:
        await answers.sink.server.stop()
    detail = (
        f"wrk {result.requests:,} requests in {result.seconds:.1f} s ({result.rate:,.0f}/s, p50 "
        f"{result.p50_ms or 0:.1f} ms, p99 {result.p99_ms or 0:.1f} ms) through nginx round-robin, "
        "answered by the end of the last"
    )
    return Run(n, answered, last - started, cpu, duplicates, redelivered, apologies, detail)


# -- rows ------------------------------------------------------------------------------------
def _note(run: Run, redelivery: str) -> str:
    return (
        f"{run.answered:,} messages over {CONVERSATIONS:,} conversations, first sent -> last answer "
        f"{run.seconds:.1f} s; {run.detail}; {redelivery}: {run.redelivered} redelivered; duplicates "
        f"{run.duplicates}, lost 0, not the model's answer {run.apologies}; {run.cpu.describe()}; "
        f"{run.per_cpu_second:,.0f} answers per gateway CPU-second"
        + (
            f", {run.cpu.redis_commands / run.answered:.1f} Redis commands per answered message (INFO "
            "commandstats, those a Lua script runs included)"
            if run.cpu.redis_commands
            else ""
        )
    )


def _rows(transport: str, one: Run, two: Run, redelivery: str) -> list[Row]:
    unit = "answers/s"
    ref = f"1 instance, {transport}"
    return [
        Row(S11, ref, one.rate, unit, note=_note(one, redelivery)),
        Row(
            S11, f"2 instances, {transport}", two.rate, unit, ref, one.rate, f">= {TARGET}x 1 instance",
            at_least_ratio(TARGET), note=_note(two, redelivery),
        ),
        Row(
            S11, f"2 instances, {transport}, answers per gateway CPU-second", two.per_cpu_second,
            "answers/CPU-s", "1 instance", one.per_cpu_second,
            note="answers / the gateways' user + system CPU seconds over the run: the scaling apart "
            "from the cores the rest of the machine took",
        ),
    ]


async def run(ctx: Context) -> list[Row]:
    if shutil.which("redis-server") is None:
        raise BenchError("scenario 11 needs redis-server (Debian: apt-get install redis-server)")
    redis = RedisServer(ctx.workdir / "redis")  # inherits this process's pinning: the load core
    redis.start()
    model = await instant_model().start()
    rows: list[Row] = []
    try:
        one, two = await _stream_run(ctx, redis, model, 1), await _stream_run(ctx, redis, model, 2)
        rows += _rows("DingTalk Stream", one, two, f"every {REDELIVER_EVERY}th frame again over the other connection")
        sqlite = await _stream_run(ctx, redis, model, 1, store_url("sqlite"))
        rows.append(
            Row(
                S11, "1 instance, DingTalk Stream, SQLite store (what Redis costs)", sqlite.per_cpu_second,
                "answers/CPU-s", "1 instance on Redis", one.per_cpu_second,
                note=f"{sqlite.rate:,.0f} answers/s, the same load on the shipped default store; "
                + _note(sqlite, "the same redeliveries"),
            )
        )
        if nginx_path() is None:
            for name in ("1 instance", "2 instances"):
                rows.append(Row(S11, f"{name}, webhook behind nginx", skipped=NO_NGINX, optional=True))
        else:
            one, two = await _webhook_run(ctx, redis, model, 1), await _webhook_run(ctx, redis, model, 2)
            rows += _rows("webhook behind nginx", one, two, f"{REDELIVERED_WEBHOOKS} POSTed twice in a row after")
    finally:
        await model.stop()
        with contextlib.suppress(OSError):
            redis.stop()
    return rows
