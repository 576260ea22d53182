"""Reference servers and clients measured in the same run as the gateway, each the practical floor
(or what users would deploy instead) for one scenario. Run as `python -m bench.references KIND`.

  bare      aiohttp handler: read body, check the DingTalk signature, parse JSON, 200 (the ceiling)
  fastapi   the same handler in FastAPI on uvicorn (what users would otherwise deploy)
  relay     a minimal web-chat-to-model relay: no dispatcher, store, metrics or logs (latency floor)
  dingtalk  a bare DingTalk Stream client: open-connection, websocket, parse, ACK (stream ceiling)
  dingtalk-relay  the same client answering every message: ACK, model call, reply POST to the
            sessionWebhook; no store, dispatcher, metrics or logs (the answers-per-core floor)
  feishu    a bare Feishu long-connection client: endpoint, protobuf frames, response frame
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from .dingtalk import sign
from .env import HOST
from .servers import CLIENT_ID, FEISHU_APP_ID, SECRET

WEBHOOK = "/dingtalk/webhook"


def check_signature(timestamp: str, signature: str) -> bool:
    if not timestamp.isdigit() or abs(time.time() * 1000 - int(timestamp)) > 3_600_000:
        return False
    return hmac.compare_digest(signature, sign(timestamp))


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


# -- bare aiohttp --------------------------------------------------------------------------------
async def bare_webhook(request: web.Request) -> web.Response:
    body = await request.read()
    if not check_signature(request.headers.get("timestamp", ""), request.headers.get("sign", "")):
        return web.json_response({"error": "bad signature"}, status=401)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return web.json_response({"error": "malformed JSON"}, status=400)
    if not isinstance(data, dict):
        return web.json_response({"error": "malformed JSON"}, status=400)
    return web.json_response({"ok": True})


def bare(port: int) -> None:
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_post(WEBHOOK, bare_webhook)
    web.run_app(app, host=HOST, port=port, print=None, access_log=None)


# -- FastAPI + uvicorn ---------------------------------------------------------------------------
def fastapi(port: int) -> None:
    from .ref_fastapi import serve  # optional extra (bench/requirements.txt)

    serve(port)


# -- relay: the latency floor of any gateway between a chat socket and the model -----------------
def relay(port: int, model_url: str) -> None:
    tasks: set[asyncio.Task[None]] = set()

    async def answer(
        ws: web.WebSocketResponse, http: aiohttp.ClientSession, frame: dict[str, Any], session: str
    ) -> None:
        text = await _model_text(http, model_url, frame["text"])
        await ws.send_str(
            orjson.dumps(
                {"type": "done", "text": text, "reply_to": f"{session}:{frame['id']}"}
            ).decode()
        )

    async def chat(request: web.Request) -> web.WebSocketResponse:
        session = request.query.get("session", "s")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(orjson.dumps({"type": "hello", "session": session}).decode())
        async for msg in ws:
            frame = orjson.loads(msg.data)
            await ws.send_str(orjson.dumps({"type": "accepted", "id": frame["id"]}).decode())
            task = asyncio.create_task(answer(ws, request.app["http"], frame, session))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        return ws

    async def http_ctx(app: web.Application) -> Any:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            app["http"] = http
            yield

    app = web.Application()
    app.cleanup_ctx.append(http_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/chat/ws", chat)
    web.run_app(app, host=HOST, port=port, print=None, access_log=None)


# -- bare stream clients -------------------------------------------------------------------------
def _client(port: int, serve: Any) -> None:
    """Run `serve(http, connected)` forever, reconnecting at once; /healthz is 200 while connected."""
    state = {"connected": False}

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"connected": state["connected"]}, status=200 if state["connected"] else 503)

    async def loop_ctx(app: web.Application) -> Any:
        async def run() -> None:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
                while True:
                    with contextlib.suppress(aiohttp.ClientError, OSError):
                        await serve(http, state)
                    state["connected"] = False

        task = asyncio.create_task(run())
        yield
        task.cancel()

    app = web.Application()
    app.cleanup_ctx.append(loop_ctx)
    app.router.add_get("/healthz", health)
    web.run_app(app, host=HOST, port=port, print=None, access_log=None)


@contextlib.asynccontextmanager
async def _stream_socket(http: aiohttp.ClientSession, api_base: str) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """open-connection, then the websocket it names."""
    body = {
        "clientId": CLIENT_ID,
        "clientSecret": SECRET,
        "subscriptions": [{"type": "CALLBACK", "topic": "/v1.0/im/bot/messages/get"}],
    }
    async with http.post(api_base + "/v1.0/gateway/connections/open", json=body) as resp:
        conn = await resp.json()
    async with http.ws_connect(conn["endpoint"], params={"ticket": conn["ticket"]}) as ws:
        yield ws


def _stream_ack(frame: dict[str, Any]) -> str:
    ack = {
        "code": 200,
        "headers": {"contentType": "application/json", "messageId": frame["headers"]["messageId"]},
        "message": "OK",
        "data": '{"response": "OK"}',
    }
    return orjson.dumps(ack).decode()


async def _model_text(http: aiohttp.ClientSession, model_url: str, text: str) -> str:
    """One streamed chat completion, its deltas joined (what any relay must do with the model)."""
    body = {"model": "bench", "stream": True, "messages": [{"role": "user", "content": text}]}
    parts: list[str] = []
    async with http.post(model_url + "/chat/completions", data=orjson.dumps(body)) as resp:
        async for line in resp.content:
            if line.startswith(b"data:") and b"[DONE]" not in line:
                for choice in orjson.loads(line[5:]).get("choices") or ():
                    parts.append(choice.get("delta", {}).get("content") or "")
            elif b"[DONE]" in line:
                break
    return "".join(parts)


def dingtalk(port: int, api_base: str, model_url: str = "") -> None:
    """The bare Stream client; with `model_url`, the relay: every message also answered (model
    call, reply POSTed to its sessionWebhook) in a task of its own."""
    tasks: set[asyncio.Task[None]] = set()

    async def answer(http: aiohttp.ClientSession, data: dict[str, Any]) -> None:
        text = await _model_text(http, model_url, data["text"]["content"])
        reply = {"msgtype": "markdown", "markdown": {"title": text[:20], "text": text}}
        async with http.post(data["sessionWebhook"], data=orjson.dumps(reply)) as resp:
            await resp.read()

    async def serve(http: aiohttp.ClientSession, state: dict[str, bool]) -> None:
        async with _stream_socket(http, api_base) as ws:
            state["connected"] = True
            async for msg in ws:
                frame = orjson.loads(msg.data)
                data = orjson.loads(frame["data"])
                if frame["type"] == "CALLBACK" and not data.get("msgId"):
                    continue
                await ws.send_str(_stream_ack(frame))
                if model_url and frame["type"] == "CALLBACK":
                    task = asyncio.create_task(answer(http, data))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)

    _client(port, serve)


def feishu(port: int, domain: str) -> None:
    # The gateway's pbbp2 codec, imported here only: importing it loads the handlers package, which
    # the other references (bare, fastapi: memory and startup ceilings) must not pay for.
    from handlers.feishu.frame import decode, encode

    async def serve(http: aiohttp.ClientSession, state: dict[str, bool]) -> None:
        async with http.post(
            domain + "/callback/ws/endpoint", json={"AppID": FEISHU_APP_ID, "AppSecret": SECRET}
        ) as resp:
            url = (await resp.json())["data"]["URL"]
        async with http.ws_connect(url) as ws:
            state["connected"] = True
            async for msg in ws:
                frame = decode(msg.data)
                if frame.method != 1:
                    continue
                orjson.loads(frame.payload or b"{}")  # the event JSON, parsed as an adapter must
                response = replace(frame.with_header("biz_rt", "0"), payload=b'{"code": 200}')
                await ws.send_bytes(encode(response))

    _client(port, serve)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.references")
    parser.add_argument("kind", choices=["bare", "fastapi", "relay", "dingtalk", "dingtalk-relay", "feishu"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--upstream", default="", help="model URL (relay), api base (dingtalk), domain (feishu)"
    )
    parser.add_argument("--model", default="", help="model URL (dingtalk-relay)")
    parser.add_argument(
        "--loop", choices=["asyncio", "uvloop"], default="asyncio", help="the event loop (aiohttp kinds)"
    )
    args = parser.parse_args()
    if args.loop == "uvloop":  # web.run_app makes its loop through the policy
        import uvloop  # bench/requirements.txt

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if args.kind in ("dingtalk", "dingtalk-relay"):  # the relay is the one given a model
        dingtalk(args.port, args.upstream, args.model if args.kind == "dingtalk-relay" else "")
    elif args.kind in ("relay", "feishu"):
        {"relay": relay, "feishu": feishu}[args.kind](args.port, args.upstream)
    else:
        {"bare": bare, "fastapi": fastapi}[args.kind](args.port)


if __name__ == "__main__":
    main()
