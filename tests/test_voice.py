"""Feishu voice messages end to end: the opus file is downloaded from the Feishu double and
transcribed by the OpenAI double's `/audio/transcriptions` when `[model] transcription_model` is
set; without it the user gets a notice."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.i18n import Locale, translator
from gateway.transcribe import NO_TRANSCRIPTION
from tests.doubles.feishu_events import message_event
from tests.feishu_env import answered

OPUS = b"OggS\x00\x02" + b"\x03" * 40

Client = TestClient[web.Request, web.Application]
Start = Callable[..., Any]


def voice(message_id: str = "om_voice") -> dict[str, Any]:
    return message_event(message_id=message_id, message_type="audio", content={"file_key": "file_v", "duration": 2000})


async def test_voice_is_transcribed_and_answered(feishu_gateway: Start, feishu: Any, openai_double: Any) -> None:
    double, _ = feishu
    model, _ = openai_double
    model.transcript = "when is the next release"
    double.resources[("om_voice", "file_v")] = (OPUS, "audio/ogg")
    client = await feishu_gateway(model={"transcription_model": "whisper-1", "api_keys": ["sk-voice"]})
    await double.push_event(voice())
    assert await answered(client, double, "om_voice") == "echo: when is the next release"
    assert model.requests[-1]["messages"][-1]["content"] == "when is the next release"
    [upload] = model.uploads
    assert upload == {"model": "whisper-1", "file": OPUS, "auth": "Bearer sk-voice"}


async def test_voice_without_a_transcription_model_gets_a_notice(
    feishu_gateway: Start, feishu: Any, openai_double: Any
) -> None:
    double, _ = feishu
    model, _ = openai_double
    client = await feishu_gateway()
    await double.push_event(voice())
    notice = await answered(client, double, "om_voice")
    assert notice == translator(Locale.ZH_CN)(NO_TRANSCRIPTION) == "暂时无法识别语音，请发送文字。"  # Feishu: Chinese
    assert model.requests == [] and model.uploads == []
