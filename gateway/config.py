"""Configuration: `config.toml` -> frozen dataclasses, `BOTGATE_<SECTION>__<KEY>` env overrides.

Every key has a typed default here; the shipped `config.toml` documents them. Validation happens once
at load time and raises `ConfigError` naming the offending key (and file), never a traceback.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
import typing
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from cronsim import CronSim, CronSimError

from .i18n import BOT_SETTINGS as BOT_LOCALE_SETTINGS
from .i18n import N_
from .i18n import SETTINGS as LOCALE_SETTINGS

ENV_PREFIX = "BOTGATE_"
# The proxy variables outbound calls honour (gateway/egress.py); their credentials are secrets.
PROXY_ENV = tuple(
    case(name) for name in ("https_proxy", "http_proxy", "wss_proxy", "ws_proxy") for case in (str.lower, str.upper)
)
MIN_PASSWORD_CHARS = 12
MIN_API_TOKEN_CHARS = 16
MIN_JWT_SECRET_BYTES = 32


class ConfigError(Exception):
    """A configuration problem a human must fix; the message names the key."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 18789
    max_body_bytes: int = 1_048_576
    tls_cert: str = ""
    tls_key: str = ""
    state_dir: str = ""  # "" = $STATE_DIRECTORY (systemd) or ./state
    keepalive_timeout: float = 75.0  # seconds an idle HTTP connection stays open (gateway/server.py)
    header_timeout: float = 10.0  # seconds from a request's first byte to the end of its headers
    body_timeout: float = 15.0  # seconds from the end of the headers to the end of the body
    trusted_proxies: list[str] = field(default_factory=list)  # CIDRs whose X-Forwarded-For is believed
    proxy: str = ""  # outbound HTTP(S) proxy URL for every call; "" = HTTPS_PROXY / HTTP_PROXY (gateway/egress.py)


# `[model] system_prompt`'s default. Only it is worded in the message's language (`gateway.steps.Prompt`).
DEFAULT_SYSTEM_PROMPT = N_("You are a helpful assistant in a company chat. Answer concisely in Markdown.")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    # auto | openai | echo | dify | coze | fastgpt  (auto = echo unless base_url is set)
    provider: str = "auto"
    base_url: str = ""
    model: str = "gpt-4o-mini"
    api_keys: list[str] = field(default_factory=list)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    vision: bool = False
    # Voice messages (Feishu audio): transcribed with this model at `{base_url}/audio/transcriptions`
    # (OpenAI-compatible, with the agent's api_keys) before they are answered; "" = a notice instead.
    transcription_model: str = ""
    temperature: float = 0.7
    max_tokens: int = 1024
    stream: bool = True
    connect_timeout: float = 5.0
    first_token_timeout: float = 30.0
    total_timeout: float = 120.0
    max_retries: int = 3
    key_cooldown: float = 60.0
    # A reasoning model's thinking: strip (never shown nor kept) | fold (a collapsed panel where the
    # platform has one, a Feishu card; stripped elsewhere) | show (quoted above the answer).
    reasoning: str = "strip"
    bot_id: str = ""  # coze: the bot (智能体) to talk to
    # dify: extra `inputs` of every request; fastgpt: extra `variables` (strings, by name).
    inputs: dict[str, str] = field(default_factory=dict)
    sources: bool = True  # dify: a short list of the knowledge sources under the answer


@dataclass(frozen=True, slots=True)
class DispatcherConfig:
    max_queue: int = 10_000
    max_concurrency: int = 64
    dedup_ttl: float = 600.0
    deadline: float = 180.0
    drain_timeout: float = 20.0
    lease_ttl: float = 15.0  # seconds a dead instance's conversation lease outlives it
    spill_max: int = 2_000  # messages held in memory while the store refuses them; 0 = none


@dataclass(frozen=True, slots=True)
class ContextConfig:
    max_turns: int = 20
    max_chars: int = 12_000
    idle_ttl: float = 86_400.0


@dataclass(frozen=True, slots=True)
class DingTalkConfig:
    enabled: bool = False
    mode: str = "stream"  # stream | webhook | both
    client_id: str = ""
    client_secret: str = ""
    robot_code: str = ""  # "" = client_id (internal-app robots use the AppKey as robot code)
    api_base: str = "https://api.dingtalk.com"
    oapi_base: str = "https://oapi.dingtalk.com"
    card_template_id: str = ""
    stale_after: float = 40.0  # seconds without a frame or pong: the stream is dead (pings every half of it, <= 20 s)
    reconnect_delay: float = 1.0  # first reconnect delay; doubles per failure up to 60 s
    stream_interval: float = 1.0  # seconds between card updates (the first goes out at once)
    max_message_age: float = 600.0  # seconds; older messages (by createAt) are dropped as stale
    monthly_api_budget: int = 0
    api_qps: int = 20  # calls a second to each API, whole app (standard org); 0 = no limit
    card_qps: int = 50  # card streaming calls a second, whole robot; 0 = no limit
    allow_senders: list[str] = field(default_factory=list)
    deny_senders: list[str] = field(default_factory=list)
    allow_conversations: list[str] = field(default_factory=list)
    deny_conversations: list[str] = field(default_factory=list)
    locale: str = ""  # "" = [chat] locale | auto | zh-CN | en


@dataclass(frozen=True, slots=True)
class FeishuConfig:
    enabled: bool = False
    mode: str = "ws"  # ws | webhook | both
    app_id: str = ""
    app_secret: str = ""
    encrypt_key: str = ""
    verification_token: str = ""
    domain: str = "https://open.feishu.cn"
    stream_interval: float = 1.0  # seconds between card updates (the first goes out at once)
    max_message_age: float = 600.0
    stale_after: float = 40.0  # seconds without anything heard: the ws link is dead (as for DingTalk)
    monthly_api_budget: int = 0
    api_qps: int = 50  # calls a second to each API, whole app; 0 = no limit
    api_qpm: int = 1000  # calls a minute to each API, whole app; 0 = no limit
    chat_qps: int = 5  # messages a second into one chat; 0 = no limit
    allow_users: list[str] = field(default_factory=list)
    deny_users: list[str] = field(default_factory=list)
    allow_chats: list[str] = field(default_factory=list)
    deny_chats: list[str] = field(default_factory=list)
    locale: str = ""  # "" = [chat] locale | auto | zh-CN | en


@dataclass(frozen=True, slots=True)
class WeComConfig:
    """One WeCom (企业微信) AI bot (智能机器人): its long connection and/or its callback URL (docs/wecom.md)."""

    enabled: bool = False
    mode: str = "ws"  # ws | webhook | both
    bot_id: str = ""  # the bot's BotID (long connection; also checks a callback's aibotid)
    secret: str = ""  # the long connection's Secret
    ws_url: str = "wss://openws.work.weixin.qq.com"  # a privately deployed WeCom shows its own
    token: str = ""  # callback mode: the Token of "接收消息" settings
    encoding_aes_key: str = ""  # callback mode: the 43-character EncodingAESKey
    api_base: str = "https://qyapi.weixin.qq.com"  # where response_url replies may go; the doctor's clock
    bot_name: str = ""  # the bot's display name, stripped from "@name" in group texts; "" = the first @word
    ping_interval: float = 30.0  # seconds between heartbeats; two unanswered = the link is dead
    reconnect_delay: float = 1.0  # first reconnect delay; doubles per failure up to reconnect_cap
    reconnect_cap: float = 30.0  # subscribe is rate-limited: never retried faster than this at length
    kicked_retry: float = 300.0  # seconds before subscribing again after another connection took over
    connection_lease: float = 10.0  # shared store: the lease on the bot's one connection (takeover time)
    stream_life: float = 360.0  # seconds a reply stream may be refreshed, from its first frame
    stream_interval: float = 1.0  # seconds between stream refreshes (the first goes out at once)
    replies_per_minute: int = 30  # messages (replies + pushes) into one conversation a minute; 0 = no limit
    replies_per_hour: int = 1000  # ... an hour; 0 = no limit
    max_message_age: float = 600.0  # seconds; older messages (by create_time, when given) are dropped
    monthly_api_budget: int = 0
    allow_users: list[str] = field(default_factory=list)
    deny_users: list[str] = field(default_factory=list)
    allow_chats: list[str] = field(default_factory=list)
    deny_chats: list[str] = field(default_factory=list)
    locale: str = ""  # "" = [chat] locale | auto | zh-CN | en


WECOM_AES_KEY_CHARS = 43  # an EncodingAESKey: base64 of 32 bytes without its "="
WECOM_STREAM_LIFE = 360.0  # seconds WeCom takes refreshes of a reply stream, from its first frame


def wecom_problems(s: WeComConfig) -> list[tuple[str, str]]:
    """(key, why) for each problem of a WeCom bot's settings (its section's or a listed bot's)."""
    out: list[tuple[str, str]] = []
    if not s.ws_url.startswith(("ws://", "wss://")):
        out.append(("ws_url", f"must be a ws:// or wss:// URL, got {s.ws_url!r}"))
    if not s.api_base.startswith(("http://", "https://")):
        out.append(("api_base", f"must be an http(s) URL, got {s.api_base!r}"))
    for key in ("ping_interval", "reconnect_delay", "kicked_retry", "connection_lease", "stream_life",
                "stream_interval", "max_message_age"):
        if getattr(s, key) <= 0:
            out.append((key, "must be positive"))
    if s.stream_life > WECOM_STREAM_LIFE:
        out.append(("stream_life", f"must be at most {WECOM_STREAM_LIFE:g} seconds (WeCom ends a stream then)"))
    if s.reconnect_cap < s.reconnect_delay:
        out.append(("reconnect_cap", f"must be at least reconnect_delay ({s.reconnect_delay:g} s)"))
    for key in ("replies_per_minute", "replies_per_hour", "monthly_api_budget"):
        if getattr(s, key) < 0:
            out.append((key, "must be 0 (no limit) or more"))
    if not s.enabled:
        return out
    for key in ("bot_id", "secret") if s.mode != "webhook" else ("bot_id",):
        if not getattr(s, key):
            out.append((key, f"is required when the bot is enabled with mode = {s.mode!r}"))
    if s.mode != "ws":
        if not s.token:
            out.append(("token", "is required when mode is webhook or both (it signs each callback)"))
        key = s.encoding_aes_key
        if len(key) != WECOM_AES_KEY_CHARS or not key.isascii() or not all(c.isalnum() or c in "+/" for c in key):
            # The value is a secret: only its length is said.
            out.append((
                "encoding_aes_key",
                f"must be the {WECOM_AES_KEY_CHARS}-character EncodingAESKey when mode is webhook or both "
                f"(got {len(key)} characters)",
            ))
    return out


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: str = "sqlite:///botgate.sqlite3"  # relative to the state directory
    # SQLite only (docs/state.md): "power" = every commit on disk before the platform's ACK
    # (synchronous=FULL), "process" = safe from a killed process, not from a power cut (NORMAL).
    durability: str = "power"


@dataclass(frozen=True, slots=True)
class CacheConfig:
    enabled: bool = True
    ttl: float = 300.0


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    per_user_per_minute: int = 20  # 0 = unlimited
    per_conversation_per_minute: int = 30  # 0 = unlimited
    max_message_chars: int = 8000  # longer messages are cut (with a note); 0 = no cap


@dataclass(frozen=True, slots=True)
class QuotasConfig:
    """Daily quotas (gateway/usage.py); 0 = unlimited. Days begin at 00:00 in `timezone`."""

    user_daily_tokens: int = 0  # tokens a user may use a day, over every bot and conversation
    conversation_daily_tokens: int = 0  # tokens a conversation (a group, a DM) may use a day
    user_daily_messages: int = 0  # answered messages a user may send a day
    timezone: str = "Asia/Shanghai"  # IANA name: where a day begins (usage figures and quotas)


@dataclass(frozen=True, slots=True)
class ChatConfig:
    admins: list[str] = field(default_factory=list)  # sender ids allowed to /reset a group
    locale: str = "auto"  # auto | zh-CN | en: the language of notices and help (gateway/i18n.py)
    # Seconds after which an answer made without a card gets one "still working" notice; 0 = never.
    long_task_notice: float = 15.0


@dataclass(frozen=True, slots=True)
class ContentConfig:
    image_hosts: list[str] = field(default_factory=list)  # hosts whose images answers may show
    max_file_bytes: int = 20 * 1024 * 1024  # a document users send, at most (bigger: a notice)
    document_chars: int = 20_000  # characters of a document's text the model gets, at most


@dataclass(frozen=True, slots=True)
class AdminConfig:
    password: str = ""
    jwt_secret: str = ""
    token_ttl: float = 43_200.0
    metrics_token: str = ""


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """The send API (`/api/v1/...`, docs/api.md): bearer tokens, none = the API is off."""

    tokens: list[str] = field(default_factory=list)
    rate_per_minute: int = 60  # calls per token per minute (429 beyond)
    retry_for: float = 3600.0  # a message not delivered within this long is given up (failed)
    keep_for: float = 7 * 86400.0  # a delivered or failed message's state, and its idempotency key


@dataclass(frozen=True, slots=True)
class AlertsConfig:
    dingtalk_webhook: str = ""
    dingtalk_secret: str = ""
    feishu_webhook: str = ""
    feishu_secret: str = ""
    wecom_webhook: str = ""  # a WeCom group robot: https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=...
    channel_down_after: float = 120.0
    error_ratio: float = 0.05
    model_failures: int = 5
    min_interval: float = 600.0
    # Alertmanager alerts (POST /api/v1/alertmanager) also go to this conversation or user of a bot:
    platform: str = ""
    bot: str = "default"
    conversation: str = ""
    user: str = ""
    timezone: str = "Asia/Shanghai"  # the times an alert message shows
    locale: str = ""  # "" = zh-CN (the robots' groups are Chinese-speaking), or "en"


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "INFO"


DEFAULT_NAME = "default"  # the agent of [model]; the bot of a single-app [dingtalk] / [feishu] section
GROUP_CONTEXTS = ("shared", "per_user")
PLATFORM_SECTIONS = ("dingtalk", "feishu", "wecom")
# Credentials are a bot's own: a listed bot never inherits them from its platform's section.
BOT_CREDENTIALS = {
    "dingtalk": ("client_id", "client_secret"),
    "feishu": ("app_id", "app_secret"),
    "wecom": ("bot_id", "secret"),
}
BOT_SECRETS = {
    "dingtalk": ("client_secret",),
    "feishu": ("app_secret", "encrypt_key", "verification_token"),
    "wecom": ("secret", "token", "encoding_aes_key"),
}


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """What answers: a persona and a model backend. `[model]` is the agent named "default"."""

    name: str
    model: ModelConfig
    group_context: str = "shared"  # shared: one context per group | per_user: one per (group, user)


@dataclass(frozen=True, slots=True)
class BotConfig:
    """One app (robot) of a platform: its platform section with the bot's own keys applied."""

    platform: str  # "dingtalk" | "feishu" | "wecom"
    name: str
    agent: str
    settings: DingTalkConfig | FeishuConfig | WeComConfig

    @property
    def key(self) -> str:
        return f"{self.platform}/{self.name}"

    @property
    def enabled(self) -> bool:
        return self.settings.enabled


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """A `[[routes]]` entry: messages it matches go to `agent` (first match wins)."""

    agent: str
    platform: str = ""
    bot: str = ""
    conversation: str = ""

    def matches(self, platform: str, bot: str, conversation: str) -> bool:
        return (
            (not self.platform or self.platform == platform)
            and (not self.bot or self.bot == bot)
            and (not self.conversation or self.conversation == conversation)
        )


@dataclass(frozen=True, slots=True)
class ScheduleConfig:
    """A `[[schedules]]` entry: at every `cron` time, post `text` (as is) or the answer of the bot's
    agent to `prompt`, to a conversation or a user of a bot."""

    name: str
    cron: str  # "m h dom mon dow"
    platform: str
    bot: str = DEFAULT_NAME
    conversation: str = ""
    user: str = ""
    text: str = ""
    prompt: str = ""
    timezone: str = "Asia/Shanghai"
    catch_up: bool = True  # after downtime: the last missed run once (false: none)

    @property
    def target(self) -> tuple[str, str]:
        """("conversation" | "user", id)."""
        return ("conversation", self.conversation) if self.conversation else ("user", self.user)


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dispatcher: DispatcherConfig = field(default_factory=DispatcherConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    dingtalk: DingTalkConfig = field(default_factory=DingTalkConfig)
    feishu: FeishuConfig = field(default_factory=FeishuConfig)
    wecom: WeComConfig = field(default_factory=WeComConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    quotas: QuotasConfig = field(default_factory=QuotasConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    content: ContentConfig = field(default_factory=ContentConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # `[[agents]]` (without the default one), every bot (the sections' own "default" bot when
    # enabled, then `[[dingtalk.bots]]`, `[[feishu.bots]]`; disabled ones too), `[[routes]]`.
    agents: tuple[AgentConfig, ...] = ()
    bots: tuple[BotConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    schedules: tuple[ScheduleConfig, ...] = ()
    source: str = "<defaults>"  # the file it came from, for messages

    def agent(self, name: str) -> AgentConfig:
        """The agent called `name`; "default" (or an unknown name) is `[model]`."""
        for agent in self.agents:
            if agent.name == name:
                return agent
        return AgentConfig(DEFAULT_NAME, self.model)

    def enabled_bots(self, platform: str | None = None) -> list[BotConfig]:
        return [b for b in self.bots if b.enabled and (platform is None or b.platform == platform)]

    def agent_for(self, platform: str, bot: str, conversation: str) -> str:
        """Which agent answers a message: the first matching `[[routes]]` entry, else its bot's."""
        for route in self.routes:
            if route.matches(platform, bot, conversation):
                return route.agent
        for b in self.bots:
            if b.platform == platform and b.name == bot:
                return b.agent
        return DEFAULT_NAME

    def secrets(self) -> list[str]:
        """Every configured secret value, so logs and dumps can mask them."""
        values: list[str] = []
        for key in sorted(SECRET_KEYS):
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            values += value if isinstance(value, list) else [value]
        for bot in self.bots:
            if bot.settings is not getattr(self, bot.platform):  # a section's own bot: counted above
                values += [getattr(bot.settings, key) for key in BOT_SECRETS[bot.platform]]
        for agent in self.agents:
            values += agent.model.api_keys
            values.append(url_password(agent.model.base_url))
        values.append(urlsplit(self.store.url).password or "")
        # Credentials inside URL settings: Redis' `?password=`, userinfo in the model's base_url.
        values += [v for k, v in parse_qsl(urlsplit(self.store.url).query) if k == "password"]
        values.append(url_password(self.model.base_url))
        # A proxy's credentials, from [server] proxy or the proxy variables (gateway/egress.py).
        for url in (self.server.proxy, *(os.environ.get(name, "") for name in PROXY_ENV)):
            password = url_password(url)
            values += [password, unquote(password)]
        return [v for v in values if v]

    @property
    def state_dir(self) -> Path:
        return Path(self.server.state_dir or os.environ.get("STATE_DIRECTORY", "") or "state")


def url_password(url: str) -> str:
    """The password in a URL's user info ("" if none, or if the URL does not parse)."""
    try:
        return urlsplit(url).password or ""
    except ValueError:
        return ""


def is_proxy_url(url: str) -> bool:
    """An outbound proxy botgate can use: plain http:// to the proxy (CONNECT inside for https)."""
    try:
        parts = urlsplit(url)
        return parts.scheme == "http" and bool(parts.hostname) and (parts.port or 1) > 0
    except ValueError:  # a bad port or IPv6 literal
        return False


SECRET_KEYS = frozenset(
    {
        "model.api_keys",
        "dingtalk.client_secret",
        "feishu.app_secret",
        "feishu.encrypt_key",
        "feishu.verification_token",
        "wecom.secret",
        "wecom.token",
        "wecom.encoding_aes_key",
        "admin.password",
        "admin.jwt_secret",
        "admin.metrics_token",
        "alerts.dingtalk_webhook",
        "alerts.dingtalk_secret",
        "alerts.feishu_webhook",
        "alerts.feishu_secret",
        "alerts.wecom_webhook",
        "api.tokens",
    }
)

REASONING_MODES = ("strip", "fold", "show")
DURABILITY = ("power", "process")  # [store] durability (gateway/store/sqlfile.py SYNCHRONOUS)
_CHOICES: dict[str, tuple[str, ...]] = {
    "model.provider": ("auto", "openai", "echo", "dify", "coze", "fastgpt"),
    "model.reasoning": REASONING_MODES,
    "dingtalk.mode": ("stream", "webhook", "both"),
    "feishu.mode": ("ws", "webhook", "both"),
    "wecom.mode": ("ws", "webhook", "both"),
    "log.level": ("DEBUG", "INFO", "WARNING", "ERROR"),
    "chat.locale": LOCALE_SETTINGS,
    "dingtalk.locale": BOT_LOCALE_SETTINGS,
    "feishu.locale": BOT_LOCALE_SETTINGS,
    "wecom.locale": BOT_LOCALE_SETTINGS,
    "alerts.locale": ("", "zh-CN", "en"),
    "store.durability": DURABILITY,
}


def _one_of(allowed: tuple[str, ...]) -> str:
    return ", ".join(a or '""' for a in allowed)  # "" (inherit) must show


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    lists = ("agents", "bots", "routes", "schedules", "source")
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if f.name not in lists}


def _describe(tp: Any) -> str:
    if tp == dict[str, str]:
        return "a table of strings"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, "a list of strings"
    )


def _coerce(value: Any, tp: Any, where: str, secret: bool = False) -> Any:
    """Check a TOML value against the field's type; floats accept integers. A secret's wrong value
    is not echoed: error messages end up in terminals and logs."""
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
        or (tp == list[str] and isinstance(value, list) and all(isinstance(v, str) for v in value))
        or (tp == dict[str, str] and isinstance(value, dict) and all(isinstance(v, str) for v in value.values()))
    )
    if not ok:
        shown = "(value hidden)" if secret else repr(value)
        raise ConfigError(f"{where}: expected {_describe(tp)}, got {type(value).__name__} {shown}")
    return float(value) if tp is float else value


def _parse_env(raw: str, tp: Any, where: str) -> Any:
    """Environment values are strings; type them by the key they override."""
    text = raw.strip()
    if tp is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {raw!r}")
    if tp is int or tp is float:
        try:
            return tp(text)
        except ValueError:
            raise ConfigError(f"{where}: expected {_describe(tp)}, got {raw!r}") from None
    if tp is str:
        return raw
    parts = [part.strip() for part in raw.split(",") if part.strip()]
    if tp == dict[str, str]:  # name=value,name=value
        pairs = [part.partition("=") for part in parts]
        if any(not sep or not name.strip() for name, sep, _ in pairs):
            raise ConfigError(f"{where}: expected name=value pairs separated by commas, got {raw!r}")
        return {name.strip(): value.strip() for name, _, value in pairs}
    return parts


def env_token(name: str) -> str:
    """A bot's or agent's name as it appears in an environment variable's name."""
    return name.upper().replace("-", "_")


def _listed_env(env: Mapping[str, str]) -> dict[tuple[str, str], dict[str, str]]:
    """`BOTGATE_AGENTS__<NAME>__<KEY>` and `BOTGATE_<PLATFORM>__BOTS__<NAME>__<KEY>`:
    ("agents" or "dingtalk.bots", NAME) -> {key: raw value}."""
    out: dict[tuple[str, str], dict[str, str]] = {}
    for name, raw in env.items():
        parts = name[len(ENV_PREFIX) :].split("__") if name.startswith(ENV_PREFIX) else []
        if len(parts) == 3 and parts[0] == "AGENTS":
            out.setdefault(("agents", parts[1]), {})[parts[2].lower()] = raw
        elif len(parts) == 4 and parts[1] == "BOTS" and parts[0].lower() in PLATFORM_SECTIONS:
            out.setdefault((f"{parts[0].lower()}.bots", parts[2]), {})[parts[3].lower()] = raw
    return out


def _is_listed(name: str) -> bool:
    parts = name[len(ENV_PREFIX) :].split("__")
    return (parts[0] == "AGENTS") or (len(parts) > 1 and parts[1] == "BOTS")


def _env_overrides(env: Mapping[str, str], sections: dict[str, type]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or _is_listed(name):
            continue
        section, sep, key = name[len(ENV_PREFIX) :].lower().partition("__")
        if not sep:
            raise ConfigError(
                f"environment variable {name}: expected {ENV_PREFIX}<SECTION>__<KEY>, "
                f"e.g. {ENV_PREFIX}SERVER__PORT"
            )
        if section not in sections:
            raise ConfigError(f"environment variable {name}: unknown section [{section}]")
        hints = typing.get_type_hints(sections[section])
        if key not in hints:
            raise ConfigError(f"environment variable {name}: unknown key {section}.{key}")
        out.setdefault(section, {})[key] = _parse_env(raw, hints[key], f"environment variable {name}")
    return out


def _env_name(key: str) -> str:
    section, name = key.split(".")
    return f"{ENV_PREFIX}{section.upper()}__{name.upper()}"


def _validate(cfg: Config, from_env: frozenset[str] = frozenset()) -> None:
    """Cross-field and range checks; the message names where the bad value came from."""

    def fail(key: str, why: str) -> None:
        if key in from_env:
            raise ConfigError(f"environment variable {_env_name(key)}: {key}: {why}")
        raise ConfigError(f"{cfg.source}: {key}: {why}")

    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            fail(key, f"must be one of {_one_of(allowed)}, got {value!r}")
    if not 0 < cfg.server.port < 65536:
        fail("server.port", f"must be between 1 and 65535, got {cfg.server.port}")
    if bool(cfg.server.tls_cert) != bool(cfg.server.tls_key):
        fail("server.tls_cert", "tls_cert and tls_key must be set together")
    for key in ("keepalive_timeout", "header_timeout", "body_timeout"):
        if not 0 < getattr(cfg.server, key) <= 3600:
            fail(f"server.{key}", "must be between 0 and 3600 seconds")
    for key in ("max_queue", "max_concurrency"):
        if getattr(cfg.dispatcher, key) < 1:
            fail(f"dispatcher.{key}", "must be at least 1")
    for key in ("deadline", "drain_timeout", "dedup_ttl", "lease_ttl"):
        if getattr(cfg.dispatcher, key) <= 0:
            fail(f"dispatcher.{key}", "must be positive")
    for key in ("connect_timeout", "first_token_timeout", "total_timeout"):
        if getattr(cfg.model, key) <= 0:
            fail(f"model.{key}", "must be positive")
    if cfg.model.max_retries < 0:
        fail("model.max_retries", "must be 0 or more")
    if cfg.dispatcher.spill_max < 0:
        fail("dispatcher.spill_max", "must be 0 or more")
    if not 0 < cfg.content.max_file_bytes <= 20 * 1024 * 1024:
        fail("content.max_file_bytes", "must be between 1 and 20971520 (20 MiB, what a download may carry)")
    if cfg.content.document_chars < 100:
        fail("content.document_chars", "must be at least 100")
    if cfg.server.proxy and not is_proxy_url(cfg.server.proxy):
        # The value may hold credentials: it is not echoed.
        fail("server.proxy", "must be an http:// URL with a host, e.g. http://proxy.example.com:3128")
    if not 0 < cfg.dingtalk.reconnect_delay <= 60:
        fail("dingtalk.reconnect_delay", f"must be between 0 and 60 seconds, got {cfg.dingtalk.reconnect_delay}")
    if cfg.dingtalk.stale_after <= 0:
        fail("dingtalk.stale_after", "must be positive")
    if cfg.feishu.stale_after <= 0:
        fail("feishu.stale_after", "must be positive")
    for key in (
        "dingtalk.monthly_api_budget",
        "dingtalk.api_qps",
        "dingtalk.card_qps",
        "feishu.monthly_api_budget",
        "feishu.api_qps",
        "feishu.api_qpm",
        "feishu.chat_qps",
        "chat.long_task_notice",
    ):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 0:
            fail(key, "must be 0 (none) or more")
    for key, why in model_problems(cfg.model):
        fail(f"model.{key}", why)
    for key in ("model.base_url", "dingtalk.api_base", "dingtalk.oapi_base", "feishu.domain"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value and not value.startswith(("http://", "https://")):
            fail(key, f"must be an http(s) URL, got {value!r}")
    if cfg.dingtalk.enabled:
        for key in ("client_id", "client_secret"):
            if not getattr(cfg.dingtalk, key):
                fail(
                    f"dingtalk.{key}",
                    f"is required when dingtalk.enabled = true (set {_env_name('dingtalk.' + key)})",
                )
    if cfg.feishu.enabled:
        for key in ("app_id", "app_secret"):
            if not getattr(cfg.feishu, key):
                fail(
                    f"feishu.{key}",
                    f"is required when feishu.enabled = true (set {_env_name('feishu.' + key)})",
                )
    if cfg.feishu.enabled and cfg.feishu.mode != "ws" and not cfg.feishu.verification_token:
        # Without it anyone who finds the URL could inject events (docs/protocols/feishu.md §C.1).
        fail("feishu.verification_token", "is required when feishu.mode is webhook or both")
    if cfg.feishu.enabled and cfg.feishu.mode != "ws" and not cfg.feishu.encrypt_key:
        # The token is the same in every delivery: alone it authenticates nothing (docs/security.md).
        fail("feishu.encrypt_key", "is required when feishu.mode is webhook or both (it signs each delivery)")
    for key, why in wecom_problems(cfg.wecom):
        fail(f"wecom.{key}", why)
    for key in ("dingtalk.max_message_age", "feishu.max_message_age", "wecom.max_message_age"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) <= 0:
            fail(key, "must be positive")
        # A replayed webhook request is refused as a duplicate until it is refused as stale.
        platform = getattr(cfg, section)
        webhook = platform.enabled and platform.mode in ("webhook", "both")
        if webhook and cfg.dispatcher.dedup_ttl < platform.max_message_age:
            fail(
                "dispatcher.dedup_ttl",
                f"must be at least {key} ({platform.max_message_age:g} s) when {section}.mode is webhook or both",
            )
    for key in ("per_user_per_minute", "per_conversation_per_minute", "max_message_chars"):
        if getattr(cfg.limits, key) < 0:
            fail(f"limits.{key}", "must be 0 (no limit) or more")
    for key in ("user_daily_tokens", "conversation_daily_tokens", "user_daily_messages"):
        if getattr(cfg.quotas, key) < 0:
            fail(f"quotas.{key}", "must be 0 (unlimited) or more")
    for key in ("quotas.timezone", "alerts.timezone"):
        section, name = key.split(".")
        zone = getattr(getattr(cfg, section), name)
        if not valid_timezone(zone):
            fail(key, f"must be an IANA time zone such as Asia/Shanghai, got {zone!r}")
    for i, token in enumerate(cfg.api.tokens, 1):
        if len(token) < MIN_API_TOKEN_CHARS:  # a guessable token is refused (and never echoed)
            fail("api.tokens", f"token {i} must be at least {MIN_API_TOKEN_CHARS} characters (openssl rand -hex 24)")
    if len(set(cfg.api.tokens)) != len(cfg.api.tokens):
        fail("api.tokens", "the same token is listed twice")
    for key in ("rate_per_minute", "retry_for", "keep_for"):
        if getattr(cfg.api, key) <= 0:
            fail(f"api.{key}", "must be more than 0")
    if cfg.alerts.conversation and cfg.alerts.user:
        fail("alerts.user", "set conversation or user, not both")
    if (cfg.alerts.conversation or cfg.alerts.user) and not cfg.alerts.platform:
        fail("alerts.platform", "is required with alerts.conversation / alerts.user (dingtalk, feishu or wecom)")
    for cidr in cfg.server.trusted_proxies:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            fail("server.trusted_proxies", f"not an IP address or CIDR: {cidr!r}")
    # Guessable admin credentials are refused outright (the value itself is never echoed).
    if cfg.admin.password and len(cfg.admin.password) < MIN_PASSWORD_CHARS:
        fail("admin.password", f"must be at least {MIN_PASSWORD_CHARS} characters")
    if cfg.admin.jwt_secret and len(cfg.admin.jwt_secret.encode("utf-8")) < MIN_JWT_SECRET_BYTES:
        fail(
            "admin.jwt_secret",
            f"must be at least {MIN_JWT_SECRET_BYTES} bytes (e.g. openssl rand -hex 32)",
        )
    if not cfg.store.url.startswith(("memory://", "sqlite://", "redis://", "rediss://", "unix://")):
        fail("store.url", f"must start with memory://, sqlite:/// or redis://, got {cfg.store.url!r}")


def build(data: Mapping[str, Any], env: Mapping[str, str], source: str = "<defaults>") -> Config:
    """Merge file data and env overrides onto the defaults, type-check and validate."""
    sections = _sections()
    data = dict(data)
    listed: dict[str, Any] = {key: data.pop(key, []) for key in ("agents", "routes", "schedules")}
    for platform in PLATFORM_SECTIONS:
        if isinstance(data.get(platform), dict) and "bots" in data[platform]:
            data[platform] = dict(data[platform])
            listed[f"{platform}.bots"] = data[platform].pop("bots")
    merged: dict[str, dict[str, Any]] = {}
    for section, values in data.items():
        if section not in sections:
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: unknown key {section!r} (keys belong in a [section])")
            raise ConfigError(f"{source}: unknown section [{section}]")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table, got {section} = {values!r}")
        merged[section] = dict(values)
    from_env: set[str] = set()
    for section, values in _env_overrides(env, sections).items():
        merged.setdefault(section, {}).update(values)
        from_env.update(f"{section}.{key}" for key in values)

    kwargs: dict[str, Any] = {}
    for section, cls in sections.items():
        hints = typing.get_type_hints(cls)
        values = merged.get(section, {})
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"{source}: unknown key {section}.{key}")
            where = f"{section}.{key}"
            values[key] = _coerce(value, hints[key], f"{source}: {where}", where in SECRET_KEYS)
        kwargs[section] = cls(**values)
    cfg = Config(**kwargs, source=source)
    _validate(cfg, frozenset(from_env))
    cfg = _with_listed(cfg, listed, _listed_env(env))
    _validate_listed(cfg)
    return cfg


def _tables(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"{where}: must be an array of tables ([[{where.split(': ')[-1]}]])")
    return [dict(v) for v in value]


def _entry_name(values: dict[str, Any], where: str) -> str:
    name = values.pop("name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: name: is required (a unique name)")
    if not name.replace("-", "").replace("_", "").isalnum() or not name.isascii():
        raise ConfigError(f"{where}: name: must be letters, digits, - and _, got {name!r}")
    return name


def _apply_env(
    values: dict[str, Any], env_values: dict[str, str], hints: dict[str, Any], prefix: str, where: str
) -> None:
    for key, raw in env_values.items():
        if key not in hints or key == "name":
            raise ConfigError(f"environment variable {prefix}{key.upper()}: unknown key {where}.{key}")
        values[key] = _parse_env(raw, hints[key], f"environment variable {prefix}{key.upper()}")


def _with_listed(cfg: Config, listed: dict[str, Any], env: dict[tuple[str, str], dict[str, str]]) -> Config:
    """`cfg` with its agents, bots and routes: each entry's keys on top of its section's."""
    source, seen_env = cfg.source, set()
    agents: list[AgentConfig] = []
    model_hints = typing.get_type_hints(ModelConfig)
    agent_hints = {**model_hints, "group_context": str}
    for values in _tables(listed["agents"], f"{source}: agents"):
        where = f"agents[{values.get('name', '?')}]"
        name = _entry_name(values, f"{source}: {where}")
        token = env_token(name)
        seen_env.add(("agents", token))
        _apply_env(values, env.get(("agents", token), {}), agent_hints, f"{ENV_PREFIX}AGENTS__{token}__", where)
        for key, value in values.items():
            if key not in agent_hints:
                raise ConfigError(f"{source}: {where}: unknown key {key}")
            secret = key == "api_keys"
            values[key] = _coerce(value, agent_hints[key], f"{source}: {where}.{key}", secret)
        group_context = values.pop("group_context", "shared")
        agents.append(AgentConfig(name, dataclasses.replace(cfg.model, **values), group_context))
    bots: list[BotConfig] = [
        BotConfig(platform, DEFAULT_NAME, DEFAULT_NAME, getattr(cfg, platform))
        for platform in PLATFORM_SECTIONS
        if getattr(cfg, platform).enabled
    ]
    for platform in PLATFORM_SECTIONS:
        section = f"{platform}.bots"
        hints = typing.get_type_hints(type(getattr(cfg, platform)))
        bot_hints = {**hints, "agent": str}
        for values in _tables(listed.get(section, []), f"{source}: {section}"):
            where = f"{section}[{values.get('name', '?')}]"
            name = _entry_name(values, f"{source}: {where}")
            token = env_token(name)
            seen_env.add((section, token))
            prefix = f"{ENV_PREFIX}{platform.upper()}__BOTS__{token}__"
            _apply_env(values, env.get((section, token), {}), bot_hints, prefix, where)
            for key, value in values.items():
                if key not in bot_hints:
                    raise ConfigError(f"{source}: {where}: unknown key {key}")
                secret = key in BOT_SECRETS[platform]
                values[key] = _coerce(value, bot_hints[key], f"{source}: {where}.{key}", secret)
            agent = values.pop("agent", DEFAULT_NAME)
            own = {key: values.pop(key, "") for key in BOT_CREDENTIALS[platform]}
            settings = dataclasses.replace(getattr(cfg, platform), **{"enabled": True, **values, **own})
            bots.append(BotConfig(platform, name, agent, settings))
    for kind, token in sorted(set(env) - seen_env):
        names = kind if kind == "agents" else f"{kind.split('.')[0]}.bots"
        variable = next(iter(env[(kind, token)]))
        raise ConfigError(
            f"environment variable {ENV_PREFIX}{kind.replace('.', '__').upper()}__{token}__{variable.upper()}: "
            f"no [[{names}]] entry named {token.lower()!r} in {source}"
        )
    routes: list[RouteConfig] = []
    for i, values in enumerate(_tables(listed["routes"], f"{source}: routes"), 1):
        where = f"{source}: routes[{i}]"
        for key, value in values.items():
            if key not in ("agent", "platform", "bot", "conversation"):
                raise ConfigError(f"{where}: unknown key {key}")
            _coerce(value, str, f"{where}.{key}")
        if not values.get("agent"):
            raise ConfigError(f"{where}: agent: is required")
        routes.append(RouteConfig(**values))
    schedules = _schedules(listed["schedules"], source)
    return dataclasses.replace(
        cfg, agents=tuple(agents), bots=tuple(bots), routes=tuple(routes), schedules=schedules
    )


def _schedules(tables: Any, source: str) -> tuple[ScheduleConfig, ...]:
    """`[[schedules]]` entries, each complete and its cron and time zone understood."""
    hints = typing.get_type_hints(ScheduleConfig)
    out: list[ScheduleConfig] = []
    for values in _tables(tables, f"{source}: schedules"):
        where = f"{source}: schedules[{values.get('name', '?')}]"
        name = _entry_name(values, where)
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"{where}: unknown key {key}")
            values[key] = _coerce(value, hints[key], f"{where}.{key}")
        for key in ("cron", "platform"):
            if not values.get(key):
                raise ConfigError(f"{where}: {key}: is required")
        entry = ScheduleConfig(name, **values)
        if bool(entry.conversation) == bool(entry.user):
            raise ConfigError(f"{where}: set exactly one of conversation and user")
        if bool(entry.text.strip()) == bool(entry.prompt.strip()):
            raise ConfigError(f"{where}: set exactly one of text (posted as is) and prompt (answered by the agent)")
        why = cron_problem(entry.cron)
        if why:
            raise ConfigError(f"{where}: cron: {why}")
        if not valid_timezone(entry.timezone):
            raise ConfigError(f"{where}: timezone: unknown time zone {entry.timezone!r} (e.g. Asia/Shanghai)")
        if any(other.name == name for other in out):
            raise ConfigError(f"{where}: name: duplicate schedule name {name!r}")
        out.append(entry)
    return tuple(out)


def cron_problem(expression: str) -> str:
    """Why `expression` is not a five-field cron expression ("m h dom mon dow"), or ""."""
    if len(expression.split()) != 5:
        return f'expected five fields "minute hour day-of-month month day-of-week", got {expression!r}'
    try:
        CronSim(expression, datetime(2026, 1, 1))
    except CronSimError as e:
        return f"{e} in {expression!r}"
    return ""


def valid_timezone(name: str) -> bool:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _validate_listed(cfg: Config) -> None:
    """Names unique and known, each bot's own settings as strict as its section's."""
    source = cfg.source

    def fail(where: str, why: str) -> None:
        raise ConfigError(f"{source}: {where}: {why}")

    names = [DEFAULT_NAME]
    for agent in cfg.agents:
        where = f"agents[{agent.name}]"
        if agent.name in names:
            taken = " (that is [model]'s name)" if agent.name == DEFAULT_NAME else ""
            fail(f"{where}.name", f"duplicate agent name {agent.name!r}{taken}")
        _unique_token(names, agent.name, f"{where}.name", "AGENTS", fail)
        names.append(agent.name)
        if agent.group_context not in GROUP_CONTEXTS:
            fail(f"{where}.group_context", f"must be one of {', '.join(GROUP_CONTEXTS)}, got {agent.group_context!r}")
        model = agent.model
        if model.provider not in _CHOICES["model.provider"]:
            fail(f"{where}.provider", f"must be one of {', '.join(_CHOICES['model.provider'])}, got {model.provider!r}")
        if model.reasoning not in REASONING_MODES:
            fail(f"{where}.reasoning", f"must be one of {', '.join(REASONING_MODES)}, got {model.reasoning!r}")
        for key, why in model_problems(model):
            fail(f"{where}.{key}", why)
        if model.base_url and not model.base_url.startswith(("http://", "https://")):
            fail(f"{where}.base_url", f"must be an http(s) URL, got {model.base_url!r}")
        for key in ("connect_timeout", "first_token_timeout", "total_timeout"):
            if getattr(model, key) <= 0:
                fail(f"{where}.{key}", "must be positive")
        if model.max_retries < 0:
            fail(f"{where}.max_retries", "must be 0 or more")
    known = ", ".join(names)
    seen: set[str] = set()
    for bot in cfg.bots:
        where = f"{bot.platform}.bots[{bot.name}]"
        if bot.key in seen:
            taken = f" (the [{bot.platform}] section's bot is named so)" if bot.name == DEFAULT_NAME else ""
            fail(f"{where}.name", f"duplicate {bot.platform} bot name {bot.name!r}{taken}")
        same_platform = [key.split("/", 1)[1] for key in seen if key.startswith(f"{bot.platform}/")]
        _unique_token(same_platform, bot.name, f"{where}.name", f"{bot.platform.upper()}__BOTS", fail)
        seen.add(bot.key)
        if bot.agent not in names:
            fail(f"{where}.agent", f"no agent named {bot.agent!r} (agents: {known})")
        if bot.name != DEFAULT_NAME or bot.settings is not getattr(cfg, bot.platform):
            _validate_bot(cfg, bot, where)
    for i, route in enumerate(cfg.routes, 1):
        where = f"routes[{i}]"
        if route.agent not in names:
            fail(f"{where}.agent", f"no agent named {route.agent!r} (agents: {known})")
        if route.platform and route.platform not in PLATFORM_SECTIONS:
            fail(f"{where}.platform", f"must be one of {', '.join(PLATFORM_SECTIONS)}, got {route.platform!r}")
        bots = [
            b
            for b in cfg.enabled_bots()
            if (not route.platform or route.platform == b.platform) and (not route.bot or route.bot == b.name)
        ]
        if not bots:
            what = " ".join(f"{k} = {v!r}" for k, v in (("platform", route.platform), ("bot", route.bot)) if v)
            fail(where, f"matches no enabled bot ({what or 'no bot is enabled'})")
    targets = [(f"schedules[{s.name}]", s.platform, s.bot) for s in cfg.schedules]
    if cfg.alerts.conversation or cfg.alerts.user:
        targets.append(("alerts", cfg.alerts.platform, cfg.alerts.bot))
    for where, platform, name in targets:
        if platform not in PLATFORM_SECTIONS:
            fail(f"{where}.platform", f"must be one of {', '.join(PLATFORM_SECTIONS)}, got {platform!r}")
        if not any(b.platform == platform and b.name == name for b in cfg.enabled_bots()):
            fail(f"{where}.bot", f"no enabled {platform} bot named {name!r}")


# What a remote backend cannot do without, beyond base_url.
BACKEND_NEEDS = {"dify": ("api_keys",), "coze": ("api_keys", "bot_id"), "fastgpt": ("api_keys",)}


def model_problems(model: ModelConfig) -> list[tuple[str, str]]:
    """(key, why) for every setting a `[model]` / `[[agents]]` entry's provider requires but lacks."""
    provider = model.provider
    if provider in ("auto", "echo"):
        return []
    needed = ("base_url", *BACKEND_NEEDS.get(provider, ()))
    return [(key, f'is required when provider = "{provider}"') for key in needed if not getattr(model, key)]


def _unique_token(taken: list[str], name: str, where: str, kind: str, fail: Callable[[str, str], None]) -> None:
    """Two names that differ only in case or `-` / `_` would read the same environment variables."""
    for other in taken:
        if other != name and env_token(other) == env_token(name):
            fail(where, f"{name!r} and {other!r} share the environment name {ENV_PREFIX}{kind}__{env_token(name)}__…")


def _validate_bot(cfg: Config, bot: BotConfig, where: str) -> None:
    """A listed bot's settings: the checks of its platform section, named by the bot."""
    s, platform = bot.settings, bot.platform

    def fail(key: str, why: str) -> None:
        raise ConfigError(f"{cfg.source}: {where}.{key}: {why}")

    def env(key: str) -> str:
        return f"{ENV_PREFIX}{platform.upper()}__BOTS__{env_token(bot.name)}__{key.upper()}"

    allowed = _CHOICES[f"{platform}.mode"]
    if s.mode not in allowed:
        fail("mode", f"must be one of {', '.join(allowed)}, got {s.mode!r}")
    if s.locale not in BOT_LOCALE_SETTINGS:
        fail("locale", f"must be one of {_one_of(BOT_LOCALE_SETTINGS)}, got {s.locale!r}")
    if not s.enabled:
        return
    for key in BOT_CREDENTIALS[platform] if not isinstance(s, WeComConfig) else ():  # wecom_problems
        if not getattr(s, key):
            fail(key, f"is required for {platform} bot {bot.name!r} (set {env(key)})")
    if isinstance(s, WeComConfig):
        for key, why in wecom_problems(s):
            fail(key, why)
    else:
        urls = ("api_base", "oapi_base") if platform == "dingtalk" else ("domain",)
        for key in urls:
            value = getattr(s, key)
            if not value.startswith(("http://", "https://")):
                fail(key, f"must be an http(s) URL, got {value!r}")
        for key in ("stale_after", "max_message_age"):
            if getattr(s, key) <= 0:
                fail(key, "must be positive")
    if isinstance(s, DingTalkConfig) and not 0 < s.reconnect_delay <= 60:
        fail("reconnect_delay", f"must be between 0 and 60 seconds, got {s.reconnect_delay}")
    for key in ("monthly_api_budget", "api_qps", "card_qps", "api_qpm", "chat_qps"):
        if getattr(s, key, 0) < 0:
            fail(key, "must be 0 (none) or more")
    if isinstance(s, FeishuConfig) and s.mode != "ws":
        for key in ("verification_token", "encrypt_key"):
            if not getattr(s, key):
                fail(key, f"is required when mode is webhook or both (set {env(key)})")
    if s.mode in ("webhook", "both") and cfg.dispatcher.dedup_ttl < s.max_message_age:
        fail("mode", f"webhook needs dispatcher.dedup_ttl at least max_message_age ({s.max_message_age:g} s)")


def with_credentials(env: Mapping[str, str]) -> Mapping[str, str]:
    """`env` plus systemd's credentials (`LoadCredential=`, docs/deploy.md): each file in
    `$CREDENTIALS_DIRECTORY` named like a variable, e.g. `BOTGATE_MODEL__API_KEYS`, supplies that
    variable (one trailing newline dropped). Other files are left alone; a name that is also set in
    the environment is an error, so it is never a guess which one is in force."""
    directory = env.get("CREDENTIALS_DIRECTORY", "")
    if not directory:
        return env
    try:
        files = sorted(p for p in Path(directory).iterdir() if p.name.startswith(ENV_PREFIX))
    except OSError as e:
        raise ConfigError(f"$CREDENTIALS_DIRECTORY {directory}: cannot read: {e.strerror or e}") from None
    merged = dict(env)
    for path in files:
        if path.name in env:
            raise ConfigError(f"credential {path.name}: also set in the environment; keep only one")
        try:
            value = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not UTF-8"
            raise ConfigError(f"credential {path.name}: cannot read: {why or e}") from None
        merged[path.name] = value.removesuffix("\n").removesuffix("\r")
    return merged


def load(path: str | Path | None, env: Mapping[str, str] | None = None) -> Config:
    """Load `path` (None = defaults only) with overrides from `env` (default: os.environ) and from
    the credential files of `$CREDENTIALS_DIRECTORY`."""
    env = with_credentials(os.environ if env is None else env)
    if path is None:
        return build({}, env)
    source = str(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found") from None
    except PermissionError:
        raise ConfigError(f"{source}: permission denied") from None
    except OSError as e:  # a directory, an unreadable device, ...
        raise ConfigError(f"{source}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: invalid TOML: the file is not UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML: {e}") from None
    return build(data, env, source)


def _masked_url(url: str) -> str:
    """`url` with the password of its user info and of a `?password=` replaced by "***"."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    passwords = [parts.password or ""]
    for pair in parts.query.split("&"):
        key, _, value = pair.partition("=")
        if unquote(key) == "password":
            passwords.append(value)
    for password in sorted(filter(None, passwords), key=len, reverse=True):
        url = url.replace(password, "***")
    return url


def masked(cfg: Config) -> dict[str, Any]:
    """The config as plain data with every secret replaced by a marker (for dumps and the status
    page): a table per section, then `agents`, `bots` (every bot with its settings in force) and
    `routes` as lists of tables."""
    out: dict[str, Any] = {}
    for section in _sections():
        values = dataclasses.asdict(getattr(cfg, section))
        for key, value in values.items():
            if f"{section}.{key}" in SECRET_KEYS and value:
                values[key] = "***"
        out[section] = values
    out["store"]["url"] = _masked_url(cfg.store.url)
    out["server"]["proxy"] = _masked_url(cfg.server.proxy)
    out["model"]["base_url"] = _masked_url(cfg.model.base_url)
    agents = []
    for agent in cfg.agents:
        model = dataclasses.asdict(agent.model)
        model["api_keys"] = "***" if agent.model.api_keys else []
        model["base_url"] = _masked_url(agent.model.base_url)
        agents.append({"name": agent.name, "group_context": agent.group_context, **model})
    out["agents"] = agents
    bots = []
    for bot in cfg.bots:
        settings = dataclasses.asdict(bot.settings)
        for key in BOT_SECRETS[bot.platform]:
            if settings[key]:
                settings[key] = "***"
        for key in ("api_base", "oapi_base", "domain"):
            if key in settings:
                settings[key] = _masked_url(settings[key])
        bots.append({"platform": bot.platform, "name": bot.name, "agent": bot.agent, **settings})
    out["bots"] = bots
    out["routes"] = [dataclasses.asdict(route) for route in cfg.routes]
    return out
