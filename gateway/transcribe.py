"""Voice messages: a platform that sends audio without its own recognition (Feishu, opus) gets it
transcribed through an OpenAI-compatible `POST {base_url}/audio/transcriptions` (multipart `file`,
`model`; answer `{"text": ...}`) when the agent's `[model] transcription_model` is set; the
transcript is then answered like typed text. Without one, or when transcription fails, the user
gets a notice asking for text. (DingTalk's audio arrives with its recognition text already.)
"""

from __future__ import annotations

import aiohttp

from .egress import client_session
from .errors import PlatformError
from .exchange import Delivery, Exchange, Flow, fields, log
from .i18n import N_, translator
from .messages import Attachment

NO_TRANSCRIPTION = N_("I can't listen to voice messages yet; please type your question.")
NOT_UNDERSTOOD = N_("Sorry, I couldn't make out that voice message. Please type your question.")
TRANSCRIPT_CHARS = 8_000


class TranscriptionError(Exception):
    pass


async def transcribe(exchange: Exchange, audio: bytes, mime: str, name: str) -> str:
    """The transcript of `audio`, through the agent's endpoint and first API key."""
    model = exchange.cfg.model
    url = model.base_url.rstrip("/") + "/audio/transcriptions"
    form = aiohttp.FormData()
    form.add_field("model", model.transcription_model)
    form.add_field("file", audio, filename=name or "voice.opus", content_type=mime or "audio/ogg")
    headers = {"Authorization": f"Bearer {model.api_keys[0]}"} if model.api_keys else {}
    timeout = aiohttp.ClientTimeout(total=model.total_timeout, sock_connect=model.connect_timeout)
    try:
        async with (
            client_session(exchange.cfg) as http,
            http.post(url, data=form, headers=headers, timeout=timeout) as resp,
        ):
            if resp.status != 200:
                raise TranscriptionError(f"HTTP {resp.status}")
            data = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        raise TranscriptionError(f"{type(e).__name__}: {e}") from e
    text = data.get("text") if isinstance(data, dict) else None
    if not isinstance(text, str):
        raise TranscriptionError("answer without text")
    return text.strip()[:TRANSCRIPT_CHARS]


class Transcribe:
    """A voice message without text: its transcript becomes the text, or the user gets a notice."""

    def __init__(self, delivery: Delivery) -> None:
        self._delivery = delivery

    async def __call__(self, exchange: Exchange) -> Flow:
        message = exchange.message
        audio = next((a for a in message.attachments if a.kind == "audio"), None)
        if audio is None or exchange.text:
            return Flow.CONTINUE
        _ = translator(message.locale)
        if not exchange.cfg.model.transcription_model or not exchange.cfg.model.base_url:
            await self._delivery.notify(message, _(NO_TRANSCRIPTION))
            return Flow.DONE
        text = await self._transcript(exchange, audio)
        if not text:
            await self._delivery.notify(message, _(NOT_UNDERSTOOD))
            return Flow.DONE
        exchange.text = exchange.question = text
        return Flow.CONTINUE

    async def _transcript(self, exchange: Exchange, audio: Attachment) -> str:
        message = exchange.message
        try:
            data, mime = await self._delivery.channel(message).fetch(message, audio)
            return await transcribe(exchange, data, mime, audio.name)
        except (PlatformError, TranscriptionError) as e:
            log.warning("voice message not transcribed: %s", e, extra=fields(message))
            return ""
