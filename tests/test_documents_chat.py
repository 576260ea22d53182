"""Documents in a chat, end to end: a file message on DingTalk and Feishu is downloaded through the
platform's API (the doubles), read by the worker-process extractor, and its text reaches the model
double's request with the question (the file alone: "summarise this file"); a follow-up still has
it in its history; hostile and oversize files get a notice and leave the gateway healthy; video gets
a notice, a sticker nothing."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.config import ConfigError
from gateway.documents import DOCUMENTS, Kind
from gateway.i18n import Locale
from gateway.keys import METRICS
from gateway.messages import Attachment, ConversationKind, InboundMessage
from gateway.upstream import MAX_DOWNLOAD
from tests.conftest import make_config
from tests.documents_gen import PHRASES, docx_bytes, paragraphs_xml, rezip, samples
from tests.doubles.feishu import FeishuDouble
from tests.doubles.feishu_events import message_event
from tests.doubles.openai import OpenAIDouble
from tests.feishu_env import Start, answered
from tests.helpers import DingTalkEnv, start

Client = TestClient[web.Request, web.Application]
SUMMARISE_ZH = "请总结这个文件。"
DOWNLOAD = "/v1.0/robot/messageFiles/download"


def last_user(request: dict[str, Any]) -> str:
    content = request["messages"][-1]
    assert content["role"] == "user"
    assert isinstance(content["content"], str)
    return content["content"]


async def send_file(env: DingTalkEnv, code: str, name: str, data: bytes, conversation: str) -> None:
    env.double.add_file(code, data, "application/octet-stream")
    await env.double.push(
        env.double.message(
            msgtype="file", content={"downloadCode": code, "fileName": name}, conversation_id=conversation
        )
    )


# -- DingTalk --------------------------------------------------------------------------------------
async def test_every_kind_via_dingtalk_reaches_the_model_with_the_summarise_question(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str]
) -> None:
    model, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url)
    files = samples()
    for n, (kind, (name, data)) in enumerate(files.items(), 1):
        await send_file(env, f"dc-{kind}", f"report-{name}", data, f"cid-{kind}")
        answers = await env.answers(n)
        asked = last_user(model.requests[-1])
        assert PHRASES[kind] in asked and asked.endswith(SUMMARISE_ZH), (kind, asked)
        assert f"用户发送了文件《report-{name}》" in asked
        assert PHRASES[kind] in answers[-1]["markdown"]["text"]  # the echo model repeats its request
    assert len(env.double.calls(DOWNLOAD)) == len(files)
    assert {c["downloadCode"] for c in env.double.calls(DOWNLOAD)} == {f"dc-{k}" for k in files}


async def test_a_follow_up_question_still_has_the_document(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str]
) -> None:
    model, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url)
    await send_file(env, "dc-docx", "animals.docx", docx_bytes(), "cid-follow")
    await env.answers(1)
    await env.double.push(env.double.message("which animal is in it?", conversation_id="cid-follow"))
    await env.answers(2)
    follow_up = model.requests[1]["messages"]
    assert follow_up[-1] == {"role": "user", "content": "which animal is in it?"}
    kept = [m["content"] for m in follow_up[1:-1] if m["role"] == "user"]
    assert len(kept) == 1 and PHRASES[Kind.DOCX] in kept[0] and SUMMARISE_ZH in kept[0]


async def test_a_long_document_is_kept_within_the_context_budget(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str]
) -> None:
    model, url = openai_double
    model.answer = "It is a long list of filler lines."  # not an echo of the whole document
    sections = {"context": {"max_chars": 3_000}, "content": {"document_chars": 20_000}}
    env = await start(aiohttp_server, gateway, model_url=url, sections=sections)
    text = "head phrase crimson lynx\n" + "filler line of the long document\n" * 400  # ~13,000 characters
    await send_file(env, "dc-long", "long.txt", text.encode(), "cid-long")
    await env.answers(1)
    assert "filler line" in last_user(model.requests[0]) and len(last_user(model.requests[0])) > 12_000
    await env.double.push(env.double.message("and the first line?", conversation_id="cid-long"))
    await model.wait_requests(2)
    [kept] = [m["content"] for m in model.requests[1]["messages"][1:-1] if m["role"] == "user"]
    assert "head phrase crimson lynx" in kept and "文件的其余部分此处略去" in kept and len(kept) <= 2_000


async def test_a_zip_bomb_gets_a_notice_and_the_gateway_answers_the_next_message(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str]
) -> None:
    model, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url)
    bomb = rezip(docx_bytes(), {"word/document.xml": paragraphs_xml(1_800_000)})
    await send_file(env, "dc-bomb", "totally-fine.docx", bomb, "cid-bomb")
    [notice] = await env.answers(1)
    assert "压缩炸弹" in notice["markdown"]["text"] and model.requests == []
    await env.double.push(env.double.message("still there?", conversation_id="cid-bomb"))
    assert (await env.answers(2))[1]["markdown"]["text"] == "echo: still there?"
    extractor = env.client.app[DOCUMENTS]
    assert extractor.running == 0


async def test_oversize_files_get_a_notice_whether_capped_by_config_or_by_the_download(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str]
) -> None:
    model, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url, sections={"content": {"max_file_bytes": 4096}})
    await send_file(env, "dc-big", "big.txt", b"x" * 5000, "cid-big")
    [notice] = await env.answers(1)
    assert "文件太大了（" in notice["markdown"]["text"] and model.requests == []
    # Over what any download may carry: refused while downloading, never buffered whole.
    await send_file(env, "dc-huge", "huge.txt", b"y" * (MAX_DOWNLOAD + 1), "cid-big")
    notice = (await env.answers(2))[1]
    assert "文件太大了" in notice["markdown"]["text"] and model.requests == []
    await env.double.push(env.double.message("ok, a question then", conversation_id="cid-big"))
    assert (await env.answers(3))[2]["markdown"]["text"] == "echo: ok, a question then"


async def test_a_file_the_platform_will_not_hand_over_gets_a_notice(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str]
) -> None:
    model, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url)
    content = {"downloadCode": "expired-code", "fileName": "a.pdf"}  # never added to the double
    await env.double.push(env.double.message(msgtype="file", content=content, conversation_id="cid-gone"))
    [notice] = await env.answers(1)
    assert notice["markdown"]["text"] == "这个文件我没能下载下来，请稍后重新发送。" and model.requests == []


# -- Feishu ----------------------------------------------------------------------------------------
def file_event(message_id: str, file_key: str, name: str, chat_id: str = "oc_chat") -> dict[str, Any]:
    content = {"file_key": file_key, "file_name": name}
    return message_event(message_id=message_id, message_type="file", content=content, chat_id=chat_id)


async def test_every_kind_via_feishu_reaches_the_model(
    feishu_gateway: Start, feishu: tuple[FeishuDouble, str], openai_double: tuple[OpenAIDouble, str]
) -> None:
    model, _ = openai_double
    double, _ = feishu
    client = await feishu_gateway()
    for kind, (name, data) in samples().items():
        message_id = f"om_{kind}"
        double.resources[(message_id, f"file_{kind}")] = (data, "application/octet-stream")
        await double.push_event(file_event(message_id, f"file_{kind}", name, chat_id=f"oc_{kind}"))
        shown = await answered(client, double, message_id)
        asked = last_user(model.requests[-1])
        assert PHRASES[kind] in asked and asked.endswith(SUMMARISE_ZH) and PHRASES[kind] in shown, kind


async def test_feishu_follow_up_in_english(
    feishu_gateway: Start, feishu: tuple[FeishuDouble, str], openai_double: tuple[OpenAIDouble, str]
) -> None:
    model, _ = openai_double
    double, _ = feishu
    client = await feishu_gateway(chat={"locale": "en"})
    name, data = samples()[Kind.PDF]
    double.resources[("om_pdf", "file_pdf")] = (data, "application/pdf")
    await double.push_event(file_event("om_pdf", "file_pdf", name))
    await answered(client, double, "om_pdf")
    asked = last_user(model.requests[0])
    assert asked.startswith("The user sent the file “a.pdf”:") and asked.endswith("Summarise this file.")
    await double.push_event(message_event("what bird is named?", message_id="om_q"))
    await answered(client, double, "om_q")
    history = model.requests[1]["messages"]
    assert history[-1]["content"] == "what bird is named?" and PHRASES[Kind.PDF] in history[1]["content"]


async def test_feishu_unreadable_file_gets_a_notice_video_a_notice_and_a_sticker_nothing(
    feishu_gateway: Start, feishu: tuple[FeishuDouble, str], openai_double: tuple[OpenAIDouble, str]
) -> None:
    model, _ = openai_double
    double, _ = feishu
    client = await feishu_gateway()
    ole2 = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 600  # the header of Word 97-2003 files
    double.resources[("om_doc", "file_doc")] = (ole2, "application/msword")
    await double.push_event(file_event("om_doc", "file_doc", "old.doc"))
    assert ".docx" in await answered(client, double, "om_doc")  # an old Word file: save it as .docx
    video = message_event(message_id="om_video", message_type="media", content={"file_key": "v", "image_key": "i"})
    await double.push_event(video)
    assert "视频" in await answered(client, double, "om_video")
    await double.push_event(message_event(message_id="om_sticker", message_type="sticker", content={"file_key": "s"}))
    await double.push_event(message_event("and now?", message_id="om_after"))
    assert await answered(client, double, "om_after") == "echo: and now?"
    assert double.answer("om_sticker") is None and double.replies_to("om_sticker") == []
    dropped = client.app[METRICS].registry.get_sample_value(
        "botgate_messages_dropped_total", {"platform": "feishu", "reason": "sticker"}
    )
    assert dropped == 1
    assert [last_user(r) for r in model.requests] == ["and now?"]


# -- the message itself ------------------------------------------------------------------------------
def test_a_file_attachment_round_trips_through_the_store_encoding() -> None:
    message = InboundMessage(
        platform="feishu",
        transport="ws",
        conversation_id="oc_1",
        conversation_kind=ConversationKind.DM,
        sender_id="ou_1",
        sender_name="",
        text="",
        mentioned=True,
        message_id="om_1",
        attachments=(Attachment("file", "file_v3_abc", "季度报告.xlsx"),),
        locale=Locale.EN,
    )
    assert InboundMessage.from_dict(message.to_dict()) == message


def test_content_limits_are_checked() -> None:
    cfg = make_config()
    assert (cfg.content.max_file_bytes, cfg.content.document_chars) == (20 * 1024 * 1024, 20_000)
    with pytest.raises(ConfigError, match=r"content\.max_file_bytes: must be between 1 and 20971520"):
        make_config(content={"max_file_bytes": MAX_DOWNLOAD + 1})
    with pytest.raises(ConfigError, match=r"content\.document_chars: must be at least 100"):
        make_config(content={"document_chars": 10})
