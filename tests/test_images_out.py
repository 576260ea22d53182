"""Images in answers (issue 16, "Images and files out"): an allowed image is downloaded, uploaded
and shown natively; a disallowed host stays a plain link and gets no request; a data URL is uploaded."""

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

from gateway.keys import DISPATCHER
from tests.doubles import feishu as fd
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
    replies = double.replies_to("om_1")
    assert replies[-1].msg_type == "image" and replies[-1].content == {"image_key": key}
    assert double.rejected == []


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
    assert f"![chart](http://{netloc}/moved.png)" in (double.answer("om_3") or "")


async def test_feishu_data_url_uploaded(start: Start, feishu: Any, openai_double: Any) -> None:
    double, _ = feishu
    model, _ = openai_double
    model.answer = "A dot: ![dot](data:image/png;base64," + base64.b64encode(png()).decode() + ")"
    client = await start([])
    await answered(client, double, "draw", "om_4")
    ((key, (data, mime)),) = double.images.items()
    assert data == png() and mime == "image/png"
    assert double.replies_to("om_4")[-1].content == {"image_key": key}


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
    await dingtalk_answer(env, "draw")
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
