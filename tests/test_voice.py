"""Feishu voice messages end to end: the opus file is downloaded from the Feishu double and
transcribed by the OpenAI double's `/audio/transcriptions` when `[model] transcription_model` is
set; without it the user gets a notice."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.i18n import Locale, translator
from gateway.keys import DISPATCHER
from gateway.transcribe import NO_TRANSCRIPTION
from tests.doubles import feishu as fd
from tests.doubles.feishu import FeishuDouble
from tests.doubles.feishu_events import message_event
from tests.doubles.openai import OpenAIDouble

OPUS = b"OggS\x00\x02" + b"\x03" * 40

Client = TestClient[web.Request, web.Application]
Start = Callable[..., Any]


@pytest.fixture
async def feishu(aiohttp_server: Callable[..., Any]) -> tuple[FeishuDouble, str]:
    return await fd.start(aiohttp_server)


@pytest.fixture
def start(feishu: tuple[FeishuDouble, str], openai_double: tuple[OpenAIDouble, str], gateway: Start) -> Start:
    async def run(**sections: dict[str, Any]) -> Client:
        double, domain = feishu
        client: Client = await gateway(fd.config(domain, openai_double[1], **sections))
        await double.wait_for(lambda: double.pings >= 1)
        return client

    return run


async def answered(client: Client, double: FeishuDouble, message_id: str) -> str:
    await double.wait_for(lambda: double.answer(message_id) is not None)
    await client.app[DISPATCHER].wait_idle()
    return double.answer(message_id) or ""


def voice(message_id: str = "om_voice") -> dict[str, Any]:
    return message_event(message_id=message_id, message_type="audio", content={"file_key": "file_v", "duration": 2000})


async def test_voice_is_transcribed_and_answered(start: Start, feishu: Any, openai_double: Any) -> None:
    double, _ = feishu
    model, _ = openai_double
    model.transcript = "when is the next release"
    double.resources[("om_voice", "file_v")] = (OPUS, "audio/ogg")
    client = await start(model={"transcription_model": "whisper-1", "api_keys": ["sk-voice"]})
    await double.push_event(voice())
    assert await answered(client, double, "om_voice") == "echo: when is the next release"
    assert model.requests[-1]["messages"][-1]["content"] == "when is the next release"
    [upload] = model.uploads
    assert upload == {"model": "whisper-1", "file": OPUS, "auth": "Bearer sk-voice"}


async def test_voice_without_a_transcription_model_gets_a_notice(start: Start, feishu: Any, openai_double: Any) -> None:
    double, _ = feishu
    model, _ = openai_double
    client = await start()
    await double.push_event(voice())
    notice = await answered(client, double, "om_voice")
    assert notice == translator(Locale.ZH_CN)(NO_TRANSCRIPTION) == "暂时无法识别语音，请发送文字。"  # Feishu: Chinese
    assert model.requests == [] and model.uploads == []
