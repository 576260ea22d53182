"""WeCom's `python run.py doctor` checks: the long connection's subscribe with the configured
credentials, the callback mode's Token/EncodingAESKey, and the clock."""

from __future__ import annotations

import asyncio

import aiohttp

from gateway import doctor
from gateway.config import Config, WeComConfig
from gateway.errors import PlatformError

from . import frame as wf
from .crypto import CallbackCrypto, CryptoError
from .parse import PLATFORM
from .ws import CONNECT_TIMEOUT, SUBSCRIBE_TIMEOUT, Link

CREDENTIALS_FIX = (
    "set [wecom] bot_id and secret to the bot's BotID and long-connection Secret (admin console > "
    "智能机器人 > the bot > API 模式: 长连接; env BOTGATE_WECOM__BOT_ID, BOTGATE_WECOM__SECRET)"
)
CALLBACK_FIX = (
    "set [wecom] token and encoding_aes_key to the Token and EncodingAESKey of the bot's "
    "接收消息 settings (env BOTGATE_WECOM__TOKEN, BOTGATE_WECOM__ENCODING_AES_KEY)"
)
TAKEOVER = (
    "WeCom keeps one connection per bot: this check's subscribe took it from a running gateway for a "
    "moment (it reconnects after [wecom] kicked_retry, or at once on the status page's Reconnect)"
)


async def subscribe(http: aiohttp.ClientSession, cfg: WeComConfig) -> doctor.Result:
    """Open the long connection, subscribe, close: proves the URL, TLS and the credentials."""
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            ws = await http.ws_connect(cfg.ws_url, heartbeat=None)
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        return doctor.failed(f"cannot open {cfg.ws_url}: {type(e).__name__}: {e}", doctor.reach_fix(cfg.ws_url))
    async with ws:
        link = Link(ws)
        reader = asyncio.create_task(_answers(ws, link))
        try:
            await link.request(wf.subscribe(cfg.bot_id, cfg.secret), timeout=SUBSCRIBE_TIMEOUT)
        except PlatformError as e:
            if "no answer" in str(e) or "gone" in str(e):
                return doctor.failed(f"subscribe: {e}", doctor.reach_fix(cfg.ws_url))
            return doctor.failed(f"WeCom refused the subscription: {e}", CREDENTIALS_FIX)
        finally:
            reader.cancel()
    return doctor.warned(f"bot {cfg.bot_id} subscribed at {cfg.ws_url}", TAKEOVER)


async def _answers(ws: aiohttp.ClientWebSocketResponse, link: Link) -> None:
    async for msg in ws:
        if msg.type is aiohttp.WSMsgType.TEXT:
            try:
                frame = wf.decode(msg.data)
            except wf.FrameError:
                continue
            if frame.is_ack:
                link.answered(frame)
    link.close("closed")


def checks(config: Config, http: aiohttp.ClientSession) -> list[doctor.Check]:
    cfg = config.wecom

    async def credentials() -> doctor.Result:
        if cfg.mode == "webhook":
            return doctor.skipped("callback mode only: no long connection to subscribe")
        return await subscribe(http, cfg)

    async def callback() -> doctor.Result:
        if cfg.mode == "ws":
            return doctor.skipped("long connection only: no callback URL")
        try:
            CallbackCrypto.create(cfg.token, cfg.encoding_aes_key)
        except CryptoError as e:
            return doctor.failed(str(e), CALLBACK_FIX)
        return doctor.passed("Token and EncodingAESKey usable; WeCom checks the URL when it is saved")

    async def clock() -> doctor.Result:
        why = "callbacks look older than [wecom] max_message_age and are refused as replays"
        return await doctor.check_clock(http, cfg.api_base, "WeCom", why, ahead_limit=cfg.max_message_age)

    async def api_budget() -> doctor.Result:
        return doctor.passed("replies go over the long connection or the callback: no billable API calls")

    return doctor.platform_checks(PLATFORM, credentials, None, ("callback keys", callback), clock, api_budget)
