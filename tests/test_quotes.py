"""Quoted replies end to end: DingTalk `text.repliedMsg` and Feishu `parent_id` (fetched through the
message API of the Feishu double) reach the OpenAI double's request marked as quoted; pictures in
quotes and posts reach a vision model as images."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.documents_gen import docx_bytes
from tests.doubles.feishu_events import APP_ID, message_event
from tests.doubles.openai import OpenAIDouble
from tests.feishu_env import answered
from tests.helpers import start as start_dingtalk

PNG = b"\x89PNG\r\n\x1a\n" + b"\x01" * 32
JPEG = b"\xff\xd8\xff\xe0" + b"\x02" * 32
ROBOT = "$:LWCP_v1:$robot"  # the DingTalk double's chatbotUserId

Client = TestClient[web.Request, web.Application]
Start = Callable[..., Any]


def question(model: OpenAIDouble) -> str:
    """The text of the last user turn the model was asked."""
    content = model.requests[-1]["messages"][-1]["content"]
    return content if isinstance(content, str) else content[0]["text"]


def images(model: OpenAIDouble) -> list[str]:
    content = model.requests[-1]["messages"][-1]["content"]
    return [p["image_url"]["url"] for p in content if isinstance(p, dict) and p.get("type") == "image_url"]


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# -- DingTalk --------------------------------------------------------------------------------------
async def test_dingtalk_quoted_text_reaches_the_model(aiohttp_server: Any, gateway: Any, openai_double: Any) -> None:
    model, url = openai_double
    env = await start_dingtalk(aiohttp_server, gateway, model_url=url)
    body = env.double.message("what does this mean?")
    body["text"].update(
        isReplyMsg=True,
        repliedMsg={
            "msgType": "text",
            "msgId": "m0",
            "senderId": ROBOT,
            "content": {"text": "Deploy window: Friday 22:00"},
        },
    )
    await env.double.push(body)
    await env.answers(1)
    assert question(model) == ("> [quoted message from you]\n> Deploy window: Friday 22:00\n\nwhat does this mean?")


async def test_dingtalk_quoted_picture_goes_to_a_vision_model(
    aiohttp_server: Any, gateway: Any, openai_double: Any
) -> None:
    model, url = openai_double
    env = await start_dingtalk(aiohttp_server, gateway, model_url=url, sections={"model": {"vision": True}})
    env.double.add_file("dc-quoted", PNG, "image/png")
    body = env.double.message("what is wrong here?")
    replied = {
        "msgType": "picture",
        "msgId": "m1",
        "senderId": "$:LWCP_v1:$bob",
        "content": {"downloadCode": "dc-quoted"},
    }
    body["text"].update(isReplyMsg=True, repliedMsg=replied)
    await env.double.push(body)
    await env.answers(1)
    assert question(model).startswith("> [quoted message]\n> [picture, attached below]\n\nwhat is wrong here?")
    assert images(model) == [data_url("image/png", PNG)]


async def test_dingtalk_rich_text_pictures_all_reach_the_vision_model(
    aiohttp_server: Any, gateway: Any, openai_double: Any
) -> None:
    model, url = openai_double
    env = await start_dingtalk(aiohttp_server, gateway, model_url=url, sections={"model": {"vision": True}})
    env.double.add_file("dc-a", PNG, "image/png")
    env.double.add_file("dc-b", JPEG, "image/jpeg")
    rich = [
        {"text": "compare"},
        {"type": "picture", "downloadCode": "dc-a"},
        {"type": "picture", "downloadCode": "dc-b"},
    ]
    await env.double.push(env.double.message(msgtype="richText", content={"richText": rich}))
    await env.answers(1)
    assert images(model) == [data_url("image/png", PNG), data_url("image/jpeg", JPEG)]


# -- Feishu ----------------------------------------------------------------------------------------
def reply_to(parent_id: str, text: str, message_id: str = "om_reply") -> dict[str, Any]:
    event = message_event(text, message_id=message_id)
    event["event"]["message"]["parent_id"] = parent_id
    return event


def stored(msg_type: str, content: dict[str, Any], sender: str = "ou_other", **extra: Any) -> dict[str, Any]:
    """A message as `GET /open-apis/im/v1/messages/{id}` returns it."""
    sender_type = "app" if sender.startswith("cli_") else "user"
    return {
        "msg_type": msg_type,
        "body": {"content": orjson.dumps(content).decode()},
        "sender": {
            "id": sender,
            "id_type": "app_id" if sender_type == "app" else "open_id",
            "sender_type": sender_type,
        },
        "chat_id": "oc_chat",
        **extra,
    }


async def test_feishu_parent_text_is_fetched_and_quoted(feishu_gateway: Start, feishu: Any, openai_double: Any) -> None:
    double, _ = feishu
    model, _ = openai_double
    double.messages["om_parent"] = stored("text", {"text": "the build is red since 9:00"}, sender="ou_user")
    client = await feishu_gateway()
    await double.push_event(reply_to("om_parent", "why?"))
    await answered(client, double, "om_reply")
    assert double.message_gets == ["om_parent"]
    assert question(model) == "> [quoted message from the user]\n> the build is red since 9:00\n\nwhy?"


async def test_feishu_quoted_card_it_cannot_read_is_said_plainly(
    feishu_gateway: Start, feishu: Any, openai_double: Any
) -> None:
    double, _ = feishu
    model, _ = openai_double
    card = {"title": "", "elements": [[{"tag": "text", "text": "请升级至最新版本客户端，以查看内容"}]]}
    double.messages["om_card"] = stored("interactive", card, sender=APP_ID)
    client = await feishu_gateway()
    await double.push_event(reply_to("om_card", "explain this"))
    await answered(client, double, "om_reply")
    assert question(model) == "> [quoted a card the bot cannot read]\n\nexplain this"


async def test_feishu_nested_quote_one_level_deep(feishu_gateway: Start, feishu: Any, openai_double: Any) -> None:
    double, _ = feishu
    model, _ = openai_double
    double.messages["om_a"] = stored("text", {"text": "original"}, parent_id="om_root")
    double.messages["om_b"] = stored("text", {"text": "a reply to it"}, sender=APP_ID, parent_id="om_a")
    double.messages["om_root"] = stored("text", {"text": "never fetched"})
    client = await feishu_gateway()
    await double.push_event(reply_to("om_b", "and now?"))
    await answered(client, double, "om_reply")
    assert double.message_gets == ["om_b", "om_a"]  # not om_root: one level deep
    assert question(model) == (
        "> [quoted message from you]\n> a reply to it\n> > [quoted message]\n> > original\n\nand now?"
    )


async def test_feishu_quote_fetch_failure_still_answers(feishu_gateway: Start, feishu: Any, openai_double: Any) -> None:
    double, _ = feishu
    model, _ = openai_double
    client = await feishu_gateway()
    await double.push_event(reply_to("om_gone", "still there?"))
    assert (await answered(client, double, "om_reply")).endswith("still there?")  # answered, not lost
    assert question(model) == "> [quoted a message the bot could not fetch]\n\nstill there?"


async def test_feishu_quoted_picture_is_downloaded_under_its_own_message(
    feishu_gateway: Start, feishu: Any, openai_double: Any
) -> None:
    double, _ = feishu
    model, _ = openai_double
    double.messages["om_pic"] = stored("image", {"image_key": "img_q"})
    double.resources[("om_pic", "img_q")] = (PNG, "image/png")
    client = await feishu_gateway(model={"vision": True})
    await double.push_event(reply_to("om_pic", "what is this?"))
    await answered(client, double, "om_reply")
    assert images(model) == [data_url("image/png", PNG)]


async def test_feishu_post_image_reaches_the_vision_model(
    feishu_gateway: Start, feishu: Any, openai_double: Any
) -> None:
    double, _ = feishu
    model, _ = openai_double
    double.resources[("om_post", "img_p")] = (JPEG, "image/jpeg")
    client = await feishu_gateway(model={"vision": True})
    content = {"title": "", "content": [[{"tag": "text", "text": "see"}, {"tag": "img", "image_key": "img_p"}]]}
    await double.push_event(message_event(message_id="om_post", message_type="post", content=content))
    await answered(client, double, "om_post")
    assert question(model) == "see"
    assert images(model) == [data_url("image/jpeg", JPEG)]


async def test_dingtalk_quoted_file_is_read_and_an_unreadable_one_noted(
    aiohttp_server: Any, gateway: Any, openai_double: Any
) -> None:
    model, url = openai_double
    env = await start_dingtalk(aiohttp_server, gateway, model_url=url)
    env.double.add_file("dc-doc", docx_bytes("报销上限是每月五千元"), "application/octet-stream")

    def quoting(code: str, name: str) -> dict[str, Any]:
        body = env.double.message("这份文件里报销上限是多少？")
        replied = {"msgType": "file", "msgId": f"m-{code}", "content": {"downloadCode": code, "fileName": name}}
        body["text"].update(isReplyMsg=True, repliedMsg=replied)
        return body

    await env.double.push(quoting("dc-doc", "policy.docx"))
    await env.answers(1)
    asked = question(model)
    assert "报销上限是每月五千元" in asked and asked.endswith("这份文件里报销上限是多少？")
    # A quoted file the platform no longer hands over: the question is still answered, with a note.
    await env.double.push(quoting("dc-gone", "old.docx"))
    await env.answers(2)
    asked = question(model)
    assert "old.docx" in asked and asked.endswith("这份文件里报销上限是多少？")
    assert len(model.requests) == 2
