"""Images and files in answers (issue 16, "Images and files out"): an allowed image is downloaded,
uploaded and shown natively; a disallowed host stays a plain link and gets no request; a data URL is
uploaded and never shown in the text; a Dify agent's generated file arrives as a file message."""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.i18n import Locale, translator
from gateway.images_out import IMAGE_MARK_ALT, IMAGE_WORD, displayed
from gateway.keys import DISPATCHER
from tests.doubles import feishu as fd
from tests.doubles.dify import XLSX_BODY, DifyDouble
from tests.doubles.feishu import FeishuDouble
from tests.doubles.feishu_events import message_event
from tests.doubles.openai import OpenAIDouble
from tests.helpers import DingTalkEnv
from tests.helpers import start as dingtalk_start

Client = TestClient[web.Request, web.Application]
Start = Callable[..., Any]


def png() -> bytes:
    """A 1x1 PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0\0\0\0"))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


class ImageHost:
    """A web server serving /chart.png (and a redirect to `redirect_to`), recording every request."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.redirect_to = ""

    def app(self) -> web.Application:
        async def record(request: web.Request) -> web.StreamResponse:
            self.requests.append(request.path)
            if request.path == "/chart.png":
                return web.Response(body=png(), content_type="image/png")
            if request.path == "/moved.png" and self.redirect_to:
                raise web.HTTPFound(self.redirect_to)
            return web.Response(status=404)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
        return app


async def image_host(aiohttp_server: Callable[..., Any]) -> tuple[ImageHost, str]:
    host = ImageHost()
    server = await aiohttp_server(host.app(), host="127.0.0.1")
    return host, f"127.0.0.1:{server.port}"


@pytest.fixture
async def feishu(aiohttp_server: Callable[..., Any]) -> tuple[FeishuDouble, str]:
    return await fd.start(aiohttp_server)


@pytest.fixture
def start(feishu: tuple[FeishuDouble, str], openai_double: tuple[OpenAIDouble, str], gateway: Start) -> Start:
    async def run(image_hosts: list[str]) -> Client:
        double, domain = feishu
        client: Client = await gateway(fd.config(domain, openai_double[1], content={"image_hosts": image_hosts}))
        await double.wait_for(lambda: double.pings >= 1)
        return client

    return run


async def answered(client: Client, double: FeishuDouble, text: str, message_id: str) -> str:
    await double.push_event(message_event(text, message_id=message_id))
    await double.wait_for(lambda: double.answer(message_id) is not None)
    await client.app[DISPATCHER].wait_idle()
    shown = double.answer(message_id)
    assert shown is not None
    return shown


async def test_feishu_allowed_image_uploaded_and_shown(
    start: Start, feishu: Any, openai_double: Any, aiohttp_server: Callable[..., Any]
) -> None:
    double, _ = feishu
    model, _ = openai_double
    host, netloc = await image_host(aiohttp_server)
    model.answer = f"Here is the chart:\n\n![chart](http://{netloc}/chart.png)"
    client = await start([netloc.split(":")[0]])
    await answered(client, double, "draw", "om_1")
    assert host.requests == ["/chart.png"]
    ((key, (data, mime)),) = double.images.items()
    assert data == png() and mime == "image/png"
    # Shown inside the answer's card, after its text (appended through CardKit), no image message.
    (reply,) = double.replies_to("om_1")
    card = double.card_of(reply)
    img = {"tag": "img", "element_id": "answer_img_0", "img_key": key, "alt": {"tag": "plain_text", "content": "chart"}}
    assert card.appended == [img] and card.closed
    assert double.rejected == []
    # A Feishu card cannot show an image by URL: the text keeps it as a link.
    shown = double.answer("om_1") or ""
    assert f"[chart](http://{netloc}/chart.png)" in shown and "![chart]" not in shown


async def test_feishu_image_shown_in_a_post(
    start: Start, feishu: Any, openai_double: Any, aiohttp_server: Callable[..., Any]
) -> None:
    double, _ = feishu
    model, _ = openai_double
    _host, netloc = await image_host(aiohttp_server)
    tables = "\n\n".join(f"| t{i} |\n|---|\n| {i} |" for i in range(6))  # more than 5 tables: a post
    model.answer = f"{tables}\n\n![chart](http://{netloc}/chart.png)"
    client = await start([netloc.split(":")[0]])
    await answered(client, double, "draw", "om_p")
    ((key, _),) = double.images.items()
    posts = [r for r in double.replies_to("om_p") if r.msg_type == "post"]
    assert posts and posts[-1].content["zh_cn"]["content"][-1] == [{"tag": "img", "image_key": key}]
    assert all(r.msg_type != "image" for r in double.replies_to("om_p"))


async def test_feishu_card_refusing_the_image_gets_it_as_an_image_message(
    start: Start, feishu: Any, openai_double: Any, aiohttp_server: Callable[..., Any]
) -> None:
    double, _ = feishu
    model, _ = openai_double
    _host, netloc = await image_host(aiohttp_server)
    double.card_faults = {"elements": ["refused"]}
    model.answer = f"Chart: ![chart](http://{netloc}/chart.png)"
    client = await start([netloc.split(":")[0]])
    shown = await answered(client, double, "draw", "om_r")
    ((key, _),) = double.images.items()  # uploaded once
    card_reply, image_reply = double.replies_to("om_r")
    assert double.card_of(card_reply).appended == [] and shown.startswith("Chart:")
    assert image_reply.msg_type == "image" and image_reply.content == {"image_key": key}


async def test_feishu_disallowed_host_stays_a_link_and_gets_no_request(
    start: Start, feishu: Any, openai_double: Any, aiohttp_server: Callable[..., Any]
) -> None:
    double, _ = feishu
    model, _ = openai_double
    other, other_netloc = await image_host(aiohttp_server)
    model.answer = f"See ![leak](http://{other_netloc}/chart.png?d=secret)"
    client = await start(["images.example.com"])
    shown = await answered(client, double, "draw", "om_2")
    assert f"[leak](http://{other_netloc}/chart.png?d=secret)" in shown and "![leak]" not in shown
    assert other.requests == [] and double.images == {}
    assert all(r.msg_type != "image" for r in double.replies_to("om_2"))


async def test_feishu_redirect_to_another_host_not_followed(
    start: Start, feishu: Any, openai_double: Any, aiohttp_server: Callable[..., Any]
) -> None:
    double, _ = feishu
    model, _ = openai_double
    allowed, netloc = await image_host(aiohttp_server)
    other, other_netloc = await image_host(aiohttp_server)
    allowed.redirect_to = f"http://localhost:{other_netloc.split(':')[1]}/chart.png"
    model.answer = f"![chart](http://{netloc}/moved.png)"
    client = await start(["127.0.0.1"])
    await answered(client, double, "draw", "om_3")
    assert allowed.requests == ["/moved.png"] and other.requests == []
    assert double.images == {}
    shown = double.answer("om_3") or ""  # Feishu cannot show an image by URL: a link
    assert f"[chart](http://{netloc}/moved.png)" in shown and "![chart]" not in shown


async def test_feishu_data_url_uploaded(start: Start, feishu: Any, openai_double: Any) -> None:
    double, _ = feishu
    model, _ = openai_double
    model.answer = "A dot: ![dot](data:image/png;base64," + base64.b64encode(png()).decode() + ")"
    client = await start([])
    shown = await answered(client, double, "draw", "om_4")
    ((key, (data, mime)),) = double.images.items()
    assert data == png() and mime == "image/png"
    (reply,) = double.replies_to("om_4")  # no image message: the card shows it
    assert [e["img_key"] for e in double.card_of(reply).appended] == [key]
    # The text names the image instead of carrying its data URL (a card is at most 30 KB).
    assert shown.startswith("A dot: " + translator(Locale.ZH_CN)(IMAGE_MARK_ALT, alt="dot") + "\n"), shown
    assert "data:" not in shown


async def test_feishu_failed_upload_still_delivers_the_answer(
    start: Start, feishu: Any, openai_double: Any, aiohttp_server: Callable[..., Any]
) -> None:
    double, _ = feishu
    model, _ = openai_double
    host, netloc = await image_host(aiohttp_server)
    model.answer = f"Chart: ![chart](http://{netloc}/missing.png)"
    client = await start(["127.0.0.1"])
    shown = await answered(client, double, "draw", "om_5")
    assert shown.startswith("Chart:") and f"http://{netloc}/missing.png" in shown
    assert host.requests == ["/missing.png"] and double.images == {}
    (reply,) = double.replies_to("om_5")
    assert double.card_of(reply).appended == []


# -- DingTalk: allowed URLs stay Markdown images (the client fetches them); data URLs are uploaded --
async def dingtalk_answer(env: DingTalkEnv, text: str) -> str:
    await env.double.push(env.double.message(text))
    [answer] = await env.answers(1)
    await env.client.app[DISPATCHER].wait_idle()
    return str(answer["markdown"]["text"])


async def test_dingtalk_data_url_uploaded_and_sent_as_an_image_message(
    aiohttp_server: Any, gateway: Any, openai_double: Any
) -> None:
    model, url = openai_double
    model.answer = "A dot: ![dot](data:image/png;base64," + base64.b64encode(png()).decode() + ")"
    env = await dingtalk_start(aiohttp_server, gateway, model_url=url)
    text = await dingtalk_answer(env, "draw")
    assert text == "A dot: " + translator(Locale.ZH_CN)(IMAGE_MARK_ALT, alt="dot"), text
    ((media_id, (data, mime)),) = env.double.media.items()
    assert data == png() and mime == "image/png"
    sends = [body for _, path, body in env.double.api_calls if path.endswith("/batchSend")]
    assert [(s["msgKey"], orjson.loads(s["msgParam"])) for s in sends] == [("sampleImageMsg", {"photoURL": media_id})]


async def test_dingtalk_allowed_image_stays_an_image_and_a_disallowed_one_a_link(
    aiohttp_server: Any, gateway: Any, openai_double: Any
) -> None:
    model, url = openai_double
    allowed, netloc = await image_host(aiohttp_server)
    other, other_netloc = await image_host(aiohttp_server)
    other_url = f"http://localhost:{other_netloc.split(':')[1]}/chart.png"
    model.answer = f"![chart](http://{netloc}/chart.png) ![leak]({other_url})"
    content = {"image_hosts": ["127.0.0.1"]}
    env = await dingtalk_start(aiohttp_server, gateway, model_url=url, sections={"content": content})
    text = await dingtalk_answer(env, "draw")
    assert f"![chart](http://{netloc}/chart.png)" in text and f" [leak]({other_url})" in text
    # botgate fetches neither: DingTalk shows the allowed one itself, the other is a link
    assert allowed.requests == [] and other.requests == [] and env.double.media == {}


def test_the_displayed_text_has_no_data_url_on_any_platform() -> None:
    data = "data:image/png;base64," + base64.b64encode(png()).decode()
    text = f"one ![]({data}) two [chart]({data}) and ![c](http://img.example/c.png)"
    en = translator(Locale.EN)
    for platform in ("web", "dingtalk"):  # they show an allowed image by URL (the web chat as text)
        shown = displayed(text, ["img.example"], Locale.EN, platform)
        assert shown == f"one [{en(IMAGE_WORD)}] two [image: chart] and ![c](http://img.example/c.png)"
    shown = displayed(text, ["img.example"], None, "feishu")
    zh = translator(Locale.ZH_CN)
    assert shown == f"one [{zh(IMAGE_WORD)}] two {zh(IMAGE_MARK_ALT, alt='chart')} and [c](http://img.example/c.png)"
    assert displayed("![x](http://other.example/x.png)", ["img.example"], None, "feishu") == (
        "![x](http://other.example/x.png)"  # not allowed: the sanitizer's business (it makes a link)
    )


# -- generated files (a Dify agent's document) as file messages --------------------------------------------
DIFY_KEY = "app-double"


async def dify(aiohttp_server: Callable[..., Any], files_origin: str = "") -> tuple[DifyDouble, str]:
    double = DifyDouble(mode="agent-chat", script=["file-document"], files_origin=files_origin)
    server = await aiohttp_server(double.app(), host="127.0.0.1")
    return double, str(server.make_url("/v1"))


def dify_model(base: str) -> dict[str, Any]:
    return {"provider": "dify", "base_url": base, "api_keys": [DIFY_KEY]}


async def test_a_dify_generated_file_arrives_as_a_feishu_file_message(
    feishu: tuple[FeishuDouble, str], gateway: Start, aiohttp_server: Callable[..., Any]
) -> None:
    double, domain = feishu
    dify_double, base = await dify(aiohttp_server)
    # No [content] image_hosts: the file is on the agent's own Dify host, which is allowed for files.
    client: Client = await gateway(fd.config(domain, model=dify_model(base)))
    await double.wait_for(lambda: double.pings >= 1)
    shown = await answered(client, double, "make a sheet", "om_f")
    ((key, (data, name, file_type)),) = double.files.items()
    assert data == XLSX_BODY and name.endswith(".xlsx") and file_type == "xls"
    last = double.replies_to("om_f")[-1]
    assert last.msg_type == "file" and last.content == {"file_key": key}
    assert f"[{name}](" in shown  # the text keeps it as a link
    assert any(path.startswith("/files/tools/") for _, path in dify_double.calls)


async def test_a_dify_generated_file_arrives_as_a_dingtalk_file_message(aiohttp_server: Any, gateway: Any) -> None:
    _dify_double, base = await dify(aiohttp_server)
    env = await dingtalk_start(aiohttp_server, gateway, sections={"model": dify_model(base)})
    await dingtalk_answer(env, "make a sheet")
    ((media_id, (data, _mime)),) = env.double.media.items()
    name = env.double.media_names[media_id]
    assert data == XLSX_BODY and name.endswith(".xlsx")
    sends = [body for _, path, body in env.double.api_calls if path.endswith("/batchSend")]
    param = {"mediaId": media_id, "fileName": name, "fileType": "xlsx"}
    assert [(s["msgKey"], orjson.loads(s["msgParam"])) for s in sends] == [("sampleFile", param)]


async def test_a_generated_file_on_another_host_stays_a_link(
    feishu: tuple[FeishuDouble, str], gateway: Start, aiohttp_server: Callable[..., Any]
) -> None:
    double, domain = feishu
    other, other_netloc = await image_host(aiohttp_server)
    # The file on another host than the agent's Dify, and no [content] image_hosts: a link only.
    dify_double, base = await dify(aiohttp_server, f"http://localhost:{other_netloc.split(':')[1]}")
    client: Client = await gateway(fd.config(domain, model=dify_model(base)))
    await double.wait_for(lambda: double.pings >= 1)
    shown = await answered(client, double, "make a sheet", "om_g")
    assert double.files == {} and all(r.msg_type != "file" for r in double.replies_to("om_g"))
    assert f"(http://localhost:{other_netloc.split(':')[1]}/files/tools/" in shown
    assert other.requests == [] and not any(path.startswith("/files/tools/") for _, path in dify_double.calls)
