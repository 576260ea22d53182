"""Usage accounting and daily quotas (docs/chat.md "Usage and quotas").

Every answered message adds one message and its tokens to the day's figures of its user, its
conversation (and its group, in a group), its bot and its agent, in the store (`Store.add_usage`:
SQLite survives restarts, Redis is shared by instances), kept `USAGE_TTL` so a month's figures
exist. Tokens are what the backend reported (prompt + completion; the OpenAI-compatible client asks
for them with `stream_options.include_usage`); when a backend reports none they are estimated
(`estimate_tokens`) and counted as estimated. A day begins at 00:00 in `[quotas] timezone`
(Asia/Shanghai by default: the users are in China).

Steps: `UsageCommand` (`/usage`, `/用量`, answered by the gateway), `Quota` (before the model
call: over a daily quota, a notice saying when it resets, and no model call), `RecordUsage`
(after `Summary`: the figures and `botgate_tokens_total`).
"""

from __future__ import annotations

import math
import unicodedata
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from .config import Config
from .errors import StoreError
from .exchange import Delivery, Exchange, Flow, fields, log
from .i18n import N_, Locale, translator
from .messages import ConversationKind, InboundMessage
from .metrics import Metrics
from .steps import Command
from .store import Store, UsageCount

USAGE_TTL = 40 * 86_400.0  # seconds a day's figures are kept after its last message
NAMES = ("/usage", "/用量")
# Zones shown as "Beijing time" (北京时间) rather than by their IANA name.
CHINA_ZONES = ("Asia/Shanghai", "Asia/Chongqing", "Asia/Harbin", "PRC")

# Estimated tokens per character where a backend reports none, from DeepSeek's published rule of
# thumb (https://api-docs.deepseek.com/quick_start/token_usage): 1 Chinese character ~ 0.6 token,
# 1 English character ~ 0.3 token. Every CJK character counts as Chinese, everything else as English.
CJK_TOKENS = 0.6
OTHER_TOKENS = 0.3

USAGE_TITLE = N_("Your usage")
GROUP_TITLE = N_("This group")
TODAY_LINE = N_("- Today: {messages} messages, {tokens} tokens")
MONTH_LINE = N_("- This month: {messages} messages, {tokens} tokens")
ESTIMATED_NOTE = N_("({estimated} of these tokens are estimated: the model reported no usage.)")
QUOTA_TITLE = N_("Daily quotas")
QUOTA_MESSAGES_LINE = N_("- Your messages: {used} of {limit}")
QUOTA_TOKENS_LINE = N_("- Your tokens: {used} of {limit}")
QUOTA_CONVERSATION_LINE = N_("- This conversation's tokens: {used} of {limit}")
USAGE_UNAVAILABLE = N_("Usage figures are unavailable right now. Please try again later.")
RESETS = N_("tomorrow at {time} ({zone})")
BEIJING_TIME = N_("Beijing time")
# Over a quota (`Quota`): which one, and when it resets.
OVER_USER_MESSAGES = N_("You have reached today's limit of {limit} messages. It resets {reset}.")
OVER_USER_TOKENS = N_("You have used today's quota of {limit} tokens. It resets {reset}.")
OVER_CONVERSATION_TOKENS = N_("This conversation has used today's quota of {limit} tokens. It resets {reset}.")


# -- days --------------------------------------------------------------------------------------------
def zone(cfg: Config) -> ZoneInfo:
    return ZoneInfo(cfg.quotas.timezone)  # validated when the config was loaded


def today(tz: ZoneInfo, now: datetime | None = None) -> date:
    return (now or datetime.now(tz)).astimezone(tz).date()


def month_days(day: date) -> list[str]:
    """Every day of `day`'s month up to `day`, as the store keys days."""
    return [(day.replace(day=1) + timedelta(days=n)).isoformat() for n in range(day.day)]


def resets_at(tz: ZoneInfo, locale: Locale | None) -> str:
    """When a daily quota resets, in words: the next local midnight ("明天 00:00（北京时间）")."""
    t = translator(locale)
    key = str(tz.key)
    name = t(BEIJING_TIME) if key in CHINA_ZONES else key
    midnight = datetime.combine(today(tz) + timedelta(days=1), datetime.min.time(), tz)
    return t(RESETS, time=midnight.strftime("%H:%M"), zone=name)


# -- tokens ------------------------------------------------------------------------------------------
def is_cjk(char: str) -> bool:
    return unicodedata.east_asian_width(char) in ("W", "F")


def estimate_tokens(text: str) -> int:
    """A rough token count of `text` (see `CJK_TOKENS`): for a backend that reports none."""
    cjk = sum(1 for c in text if is_cjk(c))
    return math.ceil(cjk * CJK_TOKENS + (len(text) - cjk) * OTHER_TOKENS)


def _prompt_text(exchange: Exchange) -> str:
    if exchange.model.keeps_history:
        return exchange.user_turn(exchange.question)
    texts: list[str] = []
    for message in exchange.prompt:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"]
    return "\n".join(texts)


def counted_tokens(exchange: Exchange) -> tuple[int, bool]:
    """The tokens an answered message cost and whether they are estimated: the backend's report
    (prompt + completion), else an estimate of the prompt and the answer; a cached answer none."""
    if exchange.cached:
        return 0, False
    usage = exchange.completion.usage
    reported = usage.prompt_tokens + usage.completion_tokens
    if reported > 0:
        return reported, False
    return estimate_tokens(_prompt_text(exchange)) + estimate_tokens(exchange.answer or ""), True


def subjects(message: InboundMessage, agent: str) -> list[tuple[str, str]]:
    """What an answered message counts for: its user (the person, over every bot), conversation,
    group (in a group), bot and agent."""
    out = [("user", message.user_key), ("conversation", message.conversation_key)]
    if message.conversation_kind is ConversationKind.GROUP:
        out.append(("group", message.conversation_key))
    return [*out, ("bot", message.channel_key), ("agent", agent)]


# -- steps -------------------------------------------------------------------------------------------
class UsageCommand(Command):
    """`/usage` (`/用量`): the asker's figures today and this month, in a group the group's too,
    and the daily quotas there are."""

    name = NAMES[0]

    def __init__(self, delivery: Delivery, store: Store) -> None:
        super().__init__(delivery)
        self._store = store

    async def __call__(self, exchange: Exchange) -> Flow:
        if exchange.command not in NAMES:
            return Flow.CONTINUE
        await self._delivery.notify(exchange.message, await self.run(exchange))
        return Flow.DONE

    async def run(self, exchange: Exchange) -> str:
        message, quotas = exchange.message, exchange.cfg.quotas
        t = translator(message.locale)
        day = today(zone(exchange.cfg))
        month = month_days(day)
        try:
            user = await self._store.usage([day.isoformat()], "user", message.user_key)
            user_month = await self._store.usage(month, "user", message.user_key)
            sections = [(t(USAGE_TITLE), user, user_month)]
            if message.conversation_kind is ConversationKind.GROUP:
                group = await self._store.usage([day.isoformat()], "group", message.conversation_key)
                group_month = await self._store.usage(month, "group", message.conversation_key)
                sections.append((t(GROUP_TITLE), group, group_month))
            conversation = await self._store.usage([day.isoformat()], "conversation", message.conversation_key)
        except StoreError as e:
            log.warning("usage figures unavailable: %s", e, extra=fields(message))
            return t(USAGE_UNAVAILABLE)
        parts = []
        for title, figures_today, figures_month in sections:
            lines = [
                f"**{title}**",
                "",
                t(TODAY_LINE, messages=figures_today.messages, tokens=figures_today.tokens),
                t(MONTH_LINE, messages=figures_month.messages, tokens=figures_month.tokens),
            ]
            if figures_month.estimated:
                lines += ["", t(ESTIMATED_NOTE, estimated=figures_month.estimated)]
            parts.append("\n".join(lines))
        quota_lines = []
        if quotas.user_daily_messages:
            quota_lines.append(t(QUOTA_MESSAGES_LINE, used=user.messages, limit=quotas.user_daily_messages))
        if quotas.user_daily_tokens:
            quota_lines.append(t(QUOTA_TOKENS_LINE, used=user.tokens, limit=quotas.user_daily_tokens))
        if quotas.conversation_daily_tokens:
            quota_lines.append(
                t(QUOTA_CONVERSATION_LINE, used=conversation.tokens, limit=quotas.conversation_daily_tokens)
            )
        if quota_lines:
            parts.append("\n".join([f"**{t(QUOTA_TITLE)}**", "", *quota_lines]))
        return "\n\n".join(parts)


class Quota:
    """`[quotas]`: a user over their daily messages or tokens, or a conversation over its daily
    tokens, gets a notice saying when the quota resets, and no model call. The message that
    crosses a token quota is still answered (its cost is known only afterwards). A store that
    cannot tell lets the message through: a quota is not worth refusing everyone for."""

    def __init__(self, delivery: Delivery, store: Store, metrics: Metrics) -> None:
        self._delivery = delivery
        self._store = store
        self._metrics = metrics

    async def __call__(self, exchange: Exchange) -> Flow:
        quotas, message = exchange.cfg.quotas, exchange.message
        if not (quotas.user_daily_messages or quotas.user_daily_tokens or quotas.conversation_daily_tokens):
            return Flow.CONTINUE
        tz = zone(exchange.cfg)
        days = [today(tz).isoformat()]
        try:
            over = await self._over(days, message, exchange.cfg)
        except StoreError as e:
            log.warning("quota not checked: %s", e, extra=fields(message))
            return Flow.CONTINUE
        if over is None:
            return Flow.CONTINUE
        kind, notice, limit = over
        log.info("over a daily quota", extra={**fields(message), "quota": kind})
        self._metrics.quota_refused.labels(kind).inc()
        t = translator(message.locale)
        await self._delivery.notify(message, t(notice, limit=limit, reset=resets_at(tz, message.locale)))
        return Flow.DONE

    async def _over(self, days: list[str], message: InboundMessage, cfg: Config) -> tuple[str, str, int] | None:
        quotas = cfg.quotas
        user = UsageCount()
        if quotas.user_daily_messages or quotas.user_daily_tokens:
            user = await self._store.usage(days, "user", message.user_key)
        if quotas.user_daily_messages and user.messages >= quotas.user_daily_messages:
            return "user_messages", OVER_USER_MESSAGES, quotas.user_daily_messages
        if quotas.user_daily_tokens and user.tokens >= quotas.user_daily_tokens:
            return "user_tokens", OVER_USER_TOKENS, quotas.user_daily_tokens
        if quotas.conversation_daily_tokens:
            conversation = await self._store.usage(days, "conversation", message.conversation_key)
            if conversation.tokens >= quotas.conversation_daily_tokens:
                return "conversation_tokens", OVER_CONVERSATION_TOKENS, quotas.conversation_daily_tokens
        return None


class RecordUsage:
    """After `Summary`: the answered message's tokens and one message, on today's figures of its
    user, conversation, group, bot and agent, and in `botgate_tokens_total` (per bot and agent,
    never per user). The user has the answer: a store failure is logged, never apologised for."""

    def __init__(self, store: Store, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics

    async def __call__(self, exchange: Exchange) -> Flow:
        message = exchange.message
        tokens, estimated = counted_tokens(exchange)
        source = "estimated" if estimated else "reported"
        self._metrics.tokens.labels(message.channel_key, exchange.agent, source).inc(tokens)
        day = today(zone(exchange.cfg)).isoformat()
        try:
            await self._store.add_usage(day, subjects(message, exchange.agent), tokens, estimated, USAGE_TTL)
        except StoreError as e:
            log.warning("usage not recorded: %s", e, extra=fields(message))
        return Flow.CONTINUE


# -- reports (admin API, status page) ------------------------------------------------------------------
REPORT_KINDS = {"users": "user", "groups": "group", "bots": "bot", "agents": "agent"}


async def report(store: Store, day: str, limit: int) -> dict[str, list[dict[str, object]]]:
    """The top `limit` users, groups, bots and agents of `day` by tokens."""
    out: dict[str, list[dict[str, object]]] = {}
    for name, kind in REPORT_KINDS.items():
        out[name] = [
            {"key": key, "messages": c.messages, "tokens": c.tokens, "estimated_tokens": c.estimated}
            for key, c in await store.usage_top(day, kind, limit)
        ]
    return out
