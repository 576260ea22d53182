"""`python run.py doctor`: one pass/fail line per check of what users otherwise learn from opaque
errors (credentials, endpoints, identity, clock, API budget, model, store, key age), each failure
with its fix.

The runner knows no platform: each enabled platform contributes its `Check`s from its handler
package (`handlers/<platform>/doctor.py`), built on that adapter's own API client. The model,
store and key-age checks live here. Exit code 0 when nothing failed (warnings allowed), 1 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import shutil
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import date
from email.utils import parsedate_to_datetime
from enum import StrEnum
from urllib.parse import urlsplit

import aiohttp

from . import __version__
from .backends import create_backend, uses_echo
from .config import ENV_PREFIX, AgentConfig, Config, ModelConfig, env_token
from .egress import client_session
from .errors import ModelError, PlatformError, StoreError, StoreInUse
from .keyage import KEY_AGES_FILE, MAX_AGE_DAYS, ages, configured_keys, parse, today, too_old
from .logs import redact
from .metrics import Metrics
from .store import SqliteStore, open_store
from .tokens import TokenCache

CHECK_TIMEOUT = 30.0  # seconds per check; the platform clients time out sooner themselves
CLOCK_WARN = 60.0  # seconds of skew worth fixing before a platform's own limit is reached
LOW_DISK = 100 * 1024 * 1024  # bytes free under the SQLite file before it is worth a warning
TIMEOUT = aiohttp.ClientTimeout(total=15, sock_connect=5)


class Status(StrEnum):
    PASS = "PASS"
    WARN = "WARN"  # works, but something needs attention; does not change the exit code
    FAIL = "FAIL"
    SKIP = "SKIP"  # could not run because an earlier check failed


SUMMARY = {Status.PASS: "passed", Status.WARN: "warnings", Status.FAIL: "failed", Status.SKIP: "skipped"}


@dataclass(frozen=True, slots=True)
class Result:
    status: Status
    detail: str
    fix: str = ""


def passed(detail: str) -> Result:
    return Result(Status.PASS, detail)


def warned(detail: str, fix: str) -> Result:
    return Result(Status.WARN, detail, fix)


def failed(detail: str, fix: str) -> Result:
    return Result(Status.FAIL, detail, fix)


def skipped(detail: str) -> Result:
    return Result(Status.SKIP, detail)


@dataclass(frozen=True, slots=True)
class Check:
    name: str  # e.g. "dingtalk credentials"
    run: Callable[[], Awaitable[Result]]


# What a platform's handler package offers: its checks for this config on this HTTP session.
Contributor = Callable[[Config, aiohttp.ClientSession], list[Check]]


# -- the runner -----------------------------------------------------------------------------------
async def run(
    config: Config, contributors: Iterable[Contributor], write: Callable[[str], None] = print
) -> int:
    """Run every check in order, writing one line each and a summary; returns the exit code."""
    secrets = [s for s in config.secrets() if len(s) >= 4]

    def out(line: str) -> None:
        for secret in secrets:  # no check prints a secret on purpose; this makes sure of it
            line = line.replace(secret, "***")
        write(redact(line))  # and no token, ticket or password inside a URL either

    out(f"botgate {__version__} doctor, config {config.source}")
    counts = dict.fromkeys(Status, 0)
    headers = {"User-Agent": f"botgate/{__version__} doctor"}
    async with client_session(config, headers=headers, timeout=TIMEOUT) as http:  # the proxy too
        checks = [check for contribute in contributors for check in contribute(config, http)]
        checks.append(Check("model", lambda: check_model(config.model, http)))
        for agent in config.agents:  # each listed agent's own backend
            checks.append(Check(f"agent {agent.name} model", agent_check(agent, http)))
        checks.append(Check("store", lambda: check_store(config)))
        checks.append(Check("key age", lambda: check_key_age(config)))
        for check in checks:
            result = await _run_one(check)
            counts[result.status] += 1
            fix = f"  -> fix: {result.fix}" if result.fix else ""
            out(f"{result.status.value:4}  {check.name}: {result.detail}{fix}")
    tally = [(n, SUMMARY[status]) for status, n in counts.items() if n]
    out(", ".join(f"{n} {word if n > 1 else word.removesuffix('s')}" for n, word in tally))
    return 1 if counts[Status.FAIL] else 0


async def _run_one(check: Check) -> Result:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            return await check.run()
    except TimeoutError:
        return failed(f"no answer within {CHECK_TIMEOUT:g} s", "check the network path to that endpoint")
    except Exception as e:  # a bug in a check must not hide the others
        why = f"the check itself crashed: {type(e).__name__}: {e}"
        return failed(why, "report this line as a botgate bug")


# -- helpers the platform checks share ------------------------------------------------------------
async def clock_skew(http: aiohttp.ClientSession, url: str) -> float | None:
    """Seconds the server's clock (its `Date` header) is ahead of ours; None without a Date.

    Any answer carries a Date, so a HEAD of the API's base URL does. The header has whole seconds,
    so the estimate is good to about a second, plenty for limits of a minute or more."""
    before = time.time()
    async with http.head(url, allow_redirects=False) as resp:
        date = resp.headers.get("Date")
    after = time.time()
    if not date:
        return None
    try:
        server = parsedate_to_datetime(date).timestamp() + 0.5  # the middle of the stated second
    except (TypeError, ValueError):
        return None
    return server - (before + after) / 2


async def check_clock(
    http: aiohttp.ClientSession,
    url: str,
    platform: str,
    why: str,
    ahead_limit: float,
    behind_limit: float = math.inf,
) -> Result:
    """Compare our clock with the platform's: WARN past a minute, FAIL where `why` starts to happen:
    our clock more than `ahead_limit` seconds ahead of the platform's, or `behind_limit` behind."""
    try:
        skew = await clock_skew(http, url)
    except (aiohttp.ClientError, TimeoutError) as e:
        return failed(f"cannot reach {url}: {type(e).__name__}: {e}", reach_fix(url))
    if skew is None:
        return warned(f"{url} sent no usable Date header, so the clock could not be compared", "none needed")
    ahead = skew < 0
    limit = ahead_limit if ahead else behind_limit
    detail = f"this host's clock is {abs(skew):.0f} s {'ahead of' if ahead else 'behind'} {platform}'s"
    fix = "enable time sync (timedatectl set-ntp true, or chrony)"
    if abs(skew) > limit:
        return failed(f"{detail}: more than {limit:g} s, so {why}", fix)
    if abs(skew) > CLOCK_WARN:
        return warned(f"{detail}" + (f" (at {limit:g} s, {why})" if limit < math.inf else ""), fix)
    return passed(f"{detail}" if abs(skew) >= 2 else f"in sync with {platform} (within 2 s)")


async def reachable(url: str) -> None:
    """Open (and close) a TCP connection, with TLS for wss/https, to the host of `url`: proves DNS,
    routing, firewall and certificate without speaking the protocol. Raises OSError."""
    parts = urlsplit(url)
    secure = parts.scheme in ("wss", "https")
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    context = ssl.create_default_context() if secure else None
    _, writer = await asyncio.open_connection(host, port, ssl=context)
    writer.close()
    with contextlib.suppress(OSError):  # the connection was made; how it ends does not matter
        await writer.wait_closed()


def reach_fix(url: str) -> str:
    host = urlsplit(url).hostname or url
    return f"make sure this host can reach {host} (DNS, firewall egress rules, HTTPS_PROXY)"


def refused(error: PlatformError, unreachable: str, base_url: str, rejected: str, fix: str) -> Result:
    """A platform call that failed: the network's fault (`unreachable`, retryable errors) or the
    app's setup (`rejected`, with its `fix`)."""
    if error.retryable:
        return failed(f"{unreachable}: {error}", reach_fix(base_url))
    return failed(f"{rejected}: {error}", fix)


async def endpoint_reachable(url: str, got: str, answered: str) -> Result:
    """The long-connection check's last step, once the platform handed out `url`: only a TCP/TLS
    connection, no websocket, since a second client of the app would be handed events meant for
    the running gateway (and never answer them)."""
    try:
        await reachable(url)
    except OSError as e:
        return failed(f"{got}, but cannot connect to it: {e}", reach_fix(url))
    return passed(f"{answered}; {url.split('?')[0]} accepts connections")


TYPICAL_ANSWER_S = 10.0  # seconds a streamed answer takes, for the cost of a card answer
MIN_ANSWERS_A_MONTH = 1000  # fewer answers than this from a budget is worth a warning


@dataclass(frozen=True, slots=True)
class AnswerCost:
    """What one answer costs in billable API calls, the way this config answers."""

    calls: float
    how: str  # e.g. "an AI card updated every 0.3 s"


Probe = Callable[[], Awaitable[Result]]


def platform_checks(
    platform: str,
    credentials: Probe,
    connection: tuple[str, Probe] | None,
    identity: tuple[str, Probe],
    clock: Probe,
    budget: Probe,
) -> list[Check]:
    """A platform's checks, in the order every platform runs them: credentials first (the later
    ones that need a token are skipped when it fails), the long connection when the mode has one,
    then the app's identity, the clock and the API budget."""
    named = [("credentials", credentials), connection, identity, ("clock", clock), ("api budget", budget)]
    return [Check(f"{platform} {name}", probe) for name, probe in (n for n in named if n is not None)]


def card_answer_cost(card: str, stream_interval: float) -> AnswerCost:
    """A streamed answer in a card: created, delivered, updated every `stream_interval` over a
    typical answer, and finished."""
    updates = math.ceil(TYPICAL_ANSWER_S / max(stream_interval, 0.05))
    return AnswerCost(3 + updates, f"{card} updated every {stream_interval:g} s over a {TYPICAL_ANSWER_S:g} s answer")


def check_budget(platform: str, budget: int, cost: AnswerCost, plan: str, plan_calls: int) -> Result:
    """Is `[platform] monthly_api_budget` set, and does it last a month at `cost` an answer? `plan`
    names the quota it is for ("a standard DingTalk org"), `plan_calls` is that quota."""
    key = f"[{platform}] monthly_api_budget"
    per_answer = f"an answer costs about {cost.calls:.0f} API calls ({cost.how})"
    if budget <= 0:
        return warned(
            f"{key} is not set, so botgate cannot see the platform's quota coming; {per_answer}",
            f"set it to your plan's monthly API calls ({plan}: {plan_calls:,}); botgate then updates cards "
            "only at the end from 80 % and replies the cheapest way at 100 % (a plan without a quota may leave it 0)",
        )
    if cost.calls <= 0:
        return passed(f"{budget:,} calls a month; {per_answer}, so answers do not use it up")
    answers = budget / cost.calls
    detail = f"{budget:,} calls a month; {per_answer}: about {answers:,.0f} answers a month ({answers / 30:,.0f} a day)"
    if answers < MIN_ANSWERS_A_MONTH:
        return warned(
            f"{detail}, then cards update only at the end (80 %) and at 100 % replies take the cheapest path",
            f"update cards less often ([{platform}] stream_interval), answer without cards, or move to a plan "
            "with a larger quota and raise the budget",
        )
    return passed(detail)


class CredentialsCheck:
    """Every platform's first check: can the app get an access token? Later checks that need a
    token ask `needs_token()` and are skipped, not failed again, when it could not."""

    def __init__(self, platform: str, app_id: str, tokens: TokenCache, base_url: str, fix: str, token: str):
        self._platform, self._app_id, self._tokens = platform, app_id, tokens
        self._base_url, self._fix, self._token = base_url, fix, token  # token: "an access token"
        self.ok = False

    async def __call__(self) -> Result:
        try:
            await self._tokens.get()
        except PlatformError as e:
            if e.retryable:
                return failed(f"cannot get {self._token}: {e}", reach_fix(self._base_url))
            return failed(f"{self._platform} refused the app credentials: {e}", self._fix)
        self.ok = True
        return passed(f"{self._token.split(' ', 1)[1]} issued to app {self._app_id}")

    def needs_token(self) -> Result | None:
        return None if self.ok else skipped(f"needs {self._token} (see credentials)")


# -- model ----------------------------------------------------------------------------------------
MODEL_FIXES = {
    "auth": "check [model] api_keys (BOTGATE_MODEL__API_KEYS): the endpoint refused the key",
    "rate_limited": "the key works but is rate limited or out of quota: check the provider account",
    "server_error": "the provider reports an error on its side: retry later or use another base_url",
    "bad_request": 'check [model] model (the model name) and base_url (usually ending in "/v1")',
    "bad_response": "[model] base_url does not point at an OpenAI-compatible /chat/completions API",
    "timeout": "the endpoint is too slow: check its load, or raise [model] first_token_timeout",
    "first_token_timeout": "the endpoint is too slow: check its load, or raise [model] first_token_timeout",
    "read_timeout": "the endpoint stalls mid-answer: check its load and the network path",
    # "<provider>:<reason>" wins over "<reason>" for that provider.
    "coze:auth": "check [model] api_keys (BOTGATE_MODEL__API_KEYS): a pat_ token of the site base_url names "
    "(api.coze.cn and api.coze.com have separate accounts) with the chat and createConversation permissions",
    "coze:server_error": "check [model] bot_id (the number after /bot/ in the bot's URL): Coze answers a wrong "
    "one with 5000; otherwise retry later",
    "coze:bad_request": "check [model] bot_id, and base_url: the host only, https://api.coze.cn or https://api.coze.com",
    "coze:bad_response": "[model] base_url is not Coze's API: https://api.coze.cn or https://api.coze.com",
    "dify:auth": "check [model] api_keys (BOTGATE_MODEL__API_KEYS): the app's key (app-…) from its API Access page",
    "dify:bad_request": "check [model] base_url (the app API's, e.g. https://api.dify.ai/v1) and [model] inputs "
    "(every input the app requires)",
    "dify:bad_response": "[model] base_url is not Dify's app API: https://api.dify.ai/v1 or http(s)://<host>/v1",
    "fastgpt:auth": "check [model] api_keys (BOTGATE_MODEL__API_KEYS): the app's own key (fastgpt-…, "
    "from the app's API access page), not an account key",
    "fastgpt:bad_request": 'check [model] base_url: FastGPT\'s API with "/api/v1", e.g. http://<host>:3000/api/v1',
    "fastgpt:bad_response": "[model] base_url is not a FastGPT chat app's API: http(s)://<host>/api/v1",
}


def agent_check(agent: AgentConfig, http: aiohttp.ClientSession) -> Callable[[], Awaitable[Result]]:
    """`check_model` of an `[[agents]]` entry, its fix naming the agent's keys, not `[model]`'s."""

    async def checked() -> Result:
        result = await check_model(agent.model, http)
        fix = result.fix.replace("[model]", f"[[agents]] {agent.name}")
        fix = fix.replace(f"{ENV_PREFIX}MODEL__", f"{ENV_PREFIX}AGENTS__{env_token(agent.name)}__")
        return dataclasses.replace(result, fix=fix)

    return checked


async def check_model(cfg: ModelConfig, http: aiohttp.ClientSession) -> Result:
    """A one-token request per configured key, so a dead key in the rotation shows up too."""
    if uses_echo(cfg):
        return warned(
            "no model configured: every answer is an echo of the question",
            "set [model] base_url (BOTGATE_MODEL__BASE_URL) to an OpenAI-compatible endpoint",
        )
    keys: list[str | None] = list(cfg.api_keys) or [None]
    for n, key in enumerate(keys, 1):
        probe = dataclasses.replace(
            cfg,
            api_keys=[key] if key else [],
            max_tokens=1,
            max_retries=0,
            total_timeout=min(cfg.total_timeout, 20.0),
        )
        backend = create_backend(probe, http, Metrics())  # its name: the model, or e.g. a Coze bot
        try:
            proved = await backend.probe()
        except ModelError as e:
            which = f" (key {n} of {len(keys)})" if len(keys) > 1 else ""
            fix = MODEL_FIXES.get(f"{cfg.provider}:{e.reason}") or MODEL_FIXES.get(e.reason, reach_fix(cfg.base_url))
            if e.reason == "connection":
                fix = f"check [model] base_url; {reach_fix(cfg.base_url)}"
            return failed(f"{backend.name} at {cfg.base_url}{which}: {e}", fix)
    keys_note = f" with each of the {len(keys)} keys" if len(keys) > 1 else ""
    return passed(f"{backend.name} at {cfg.base_url} {proved}{keys_note}")


# -- store ----------------------------------------------------------------------------------------
async def check_store(config: Config) -> Result:
    """Open the store, claim a throw-away key, ping, close: what accepting a message needs."""
    url = config.store.url
    fix = f"check [store] url ({url.split('@')[-1]}) and that the state directory is writable by this user"
    try:
        store = open_store(url, config.state_dir)
        await store.open()
    except StoreInUse as e:
        return warned(
            f"{e}: doctor cannot open it while the gateway runs",
            "none needed if the gateway is up: `curl localhost:18789/readyz` shows whether the store works",
        )
    except StoreError as e:
        return failed(str(e), fix)
    try:
        if not await store.claim(f"doctor:{uuid.uuid4().hex}", 60.0):
            return failed("a fresh key could not be claimed", fix)
        await store.ping()
    except StoreError as e:
        return failed(str(e), fix)
    finally:
        await store.close()
    if isinstance(store, SqliteStore):
        free = shutil.disk_usage(store.path.parent).free
        detail = f"sqlite {store.path} writable, {free / 2**20:.0f} MiB free"
        if free < LOW_DISK:
            return warned(detail, "free disk space: when the disk is full, messages are refused")
        return passed(detail)
    return passed(f"{store.backend} store writable")


# -- key age --------------------------------------------------------------------------------------
ROTATE_FIX = (
    "rotate each: make a new key (the model provider's account, the platform's developer console, or a new "
    "random value for an admin secret), set it, reload (systemctl reload botgate), then revoke the old one"
)
STATE_FIX = "run doctor as the service user, with its state directory (docs/deploy.md)"


async def check_key_age(config: Config, on: date | None = None) -> Result:
    """How long ago the gateway first saw each configured secret (`gateway.keyage`, read from the
    state directory, never written here): WARN for every one older than `MAX_AGE_DAYS`."""
    on = on or today()
    names = configured_keys(config)
    if not names:
        return passed("no secrets configured")
    if config.store.url.startswith("memory://"):
        return passed(f"{len(names)} keys; store.url is memory://, so their first-seen dates last one run only")
    path = config.state_dir / KEY_AGES_FILE
    try:
        text = await asyncio.to_thread(path.read_text, encoding="utf-8")
    except FileNotFoundError:
        return passed(f"{len(names)} keys; no first-seen dates yet (the gateway records them at start)")
    except OSError as e:
        return warned(f"cannot read {path}: {e.strerror or e}", STATE_FIX)
    try:
        keys = ages(config, parse(text))
    except ValueError as e:
        return warned(f"{path} is unreadable ({e})", "remove it: the gateway records the dates afresh at start")
    old = too_old(keys, on)
    if old:
        return warned(f"older than {MAX_AGE_DAYS} days: " + "; ".join(k.describe(on) for k in old), ROTATE_FIX)
    unseen = sum(k.first_seen is None for k in keys)
    oldest = max(k.days(on) for k in keys)
    detail = f"{len(keys)} keys, the oldest first seen {oldest} days ago (a warning after {MAX_AGE_DAYS})"
    return passed(detail + (f"; {unseen} not seen by the gateway yet" if unseen else ""))
