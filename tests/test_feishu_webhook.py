"""POST /feishu/webhook: challenge, encryption, signatures, tokens, errors, and one dedup with ws."""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from Crypto.Cipher import AES

from gateway.config import ConfigError
from gateway.keys import DISPATCHER
from handlers.feishu.webhook import DecryptError, decrypt, signature
from tests.doubles import feishu as fd
from tests.doubles.feishu import FeishuDouble
from tests.doubles.feishu_events import message_event
from tests.doubles.openai import OpenAIDouble

KEY = "test key"
UNAUTHORIZED = (401, {"error": "unauthorized"})  # every refusal, whatever the reason

Client = TestClient[web.Request, web.Application]


def encrypt(plain: bytes, key: str = KEY) -> str:
    """What Feishu sends: base64(IV + AES-256-CBC(SHA-256(key), IV, PKCS#7(plain)))."""
    iv = os.urandom(16)
    pad = 16 - len(plain) % 16
    cipher = AES.new(hashlib.sha256(key.encode()).digest(), AES.MODE_CBC, iv)
    return base64.b64encode(iv + cipher.encrypt(plain + bytes([pad]) * pad)).decode()


def signed(body: bytes, key: str = KEY, age: float = 0.0) -> dict[str, str]:
    ts, nonce = str(int(time.time() - age)), "nonce-1"
    return {
        "X-Lark-Request-Timestamp": ts,
        "X-Lark-Request-Nonce": nonce,
        "X-Lark-Signature": signature(ts, nonce, key, body),
        "Content-Type": "application/json",
    }


def encrypted_body(payload: dict[str, Any]) -> bytes:
    return orjson.dumps({"encrypt": encrypt(orjson.dumps(payload))})


@pytest.fixture
async def feishu(aiohttp_server: Callable[..., Any]) -> tuple[FeishuDouble, str]:
    return await fd.start(aiohttp_server)


@pytest.fixture
def start(feishu: tuple[FeishuDouble, str], openai_double: tuple[OpenAIDouble, str], gateway: Any) -> Any:
    async def run(mode: str = "webhook", encrypt_key: str = KEY, **sections: dict[str, Any]) -> Client:
        double, domain = feishu
        feishu_cfg = {"mode": mode, "encrypt_key": encrypt_key}
        client: Client = await gateway(fd.config(domain, openai_double[1], feishu=feishu_cfg, **sections))
        if mode != "webhook":
            await double.wait_for(lambda: double.pings >= 1)
        return client

    return run


def test_feishu_published_decrypt_vector() -> None:
    assert decrypt("P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk=", "test key") == b"hello world"
    for bad in ("not base64!", base64.b64encode(b"short").decode(), encrypt(b"x", key="other key")):
        with pytest.raises(DecryptError):
            decrypt(bad, KEY)


async def test_url_verification_plain_and_encrypted(start: Any) -> None:
    client = await start()
    challenge = {"challenge": "ajls384kdjx98XX", "token": "vtoken", "type": "url_verification"}
    resp = await client.post("/feishu/webhook", json=challenge)
    assert resp.status == 200 and await resp.json() == {"challenge": "ajls384kdjx98XX"}
    resp = await client.post("/feishu/webhook", data=encrypted_body(challenge))
    assert resp.status == 200 and await resp.json() == {"challenge": "ajls384kdjx98XX"}
    resp = await client.post("/feishu/webhook", json={**challenge, "token": "wrong"})
    assert resp.status == 401


async def test_encrypted_signed_event_answered(start: Any, feishu: Any) -> None:
    double, _ = feishu
    client = await start()
    body = encrypted_body(message_event("over http", message_id="om_w"))
    resp = await client.post("/feishu/webhook", data=body, headers=signed(body))
    assert resp.status == 200 and await resp.json() == {"msg": "success"}
    await double.wait_for(lambda: double.answer("om_w") is not None)
    assert double.answer("om_w") == "echo: over http"
    assert double.endpoint_calls == 0  # webhook mode opens no long connection


async def test_bad_or_missing_signature_refused(start: Any, feishu: Any) -> None:
    double, _ = feishu
    client = await start()
    body = encrypted_body(message_event("forged", message_id="om_x"))
    headers = signed(body)
    headers["X-Lark-Signature"] = "0" * 64
    resp = await client.post("/feishu/webhook", data=body, headers=headers)
    assert (resp.status, await resp.json()) == UNAUTHORIZED
    tampered = encrypted_body(message_event("forged", message_id="om_y"))
    resp = await client.post("/feishu/webhook", data=tampered, headers=signed(body))  # signature of another body
    assert (resp.status, await resp.json()) == UNAUTHORIZED
    resp = await client.post("/feishu/webhook", data=body)
    assert (resp.status, await resp.json()) == UNAUTHORIZED
    for age in (3601, -3601):  # a replayed capture, correctly signed
        resp = await client.post("/feishu/webhook", data=body, headers=signed(body, age=age))
        assert (resp.status, await resp.json()) == UNAUTHORIZED
    assert double.replies == []


async def test_bad_verification_token_refused(start: Any) -> None:
    client = await start()
    event = message_event("who am i", message_id="om_tok")
    event["header"]["token"] = "not-the-token"
    body = orjson.dumps(event)
    resp = await client.post("/feishu/webhook", data=body, headers=signed(body))
    assert (resp.status, await resp.json()) == UNAUTHORIZED


GARBAGE = (
    b"{not json",
    b"[1, 2]",
    orjson.dumps({"encrypt": "AAAA"}),
    orjson.dumps({"encrypt": encrypt(b"not json either")}),
    orjson.dumps({"encrypt": encrypt(b"[1]")}),
)


async def test_signed_garbage_is_400_unsigned_garbage_the_same_401_as_any_refusal(start: Any) -> None:
    """Unsigned, nothing is told apart (no oracle for an attacker probing the decryption); only a
    correctly signed body, which only Feishu can send, gets told what is wrong with it."""
    client = await start()
    for body in GARBAGE:
        resp = await client.post("/feishu/webhook", data=body)
        assert (resp.status, await resp.json()) == UNAUTHORIZED, body
        resp = await client.post("/feishu/webhook", data=body, headers=signed(body))
        assert resp.status == 400, body
        assert (await resp.json())["error"] != "unauthorized"


async def test_too_large_refused_with_413(start: Any) -> None:
    client = await start(server={"max_body_bytes": 4096})
    resp = await client.post("/feishu/webhook", data=b"x" * 10_000)
    assert resp.status == 413 and await resp.json() == {"error": "request body too large"}


async def test_shutting_down_answers_503_so_feishu_retries(start: Any) -> None:
    client = await start()
    client.app[DISPATCHER].stop_intake()
    body = orjson.dumps(message_event("later", message_id="om_503"))
    resp = await client.post("/feishu/webhook", data=body, headers=signed(body))
    assert resp.status == 503


async def test_ws_and_webhook_share_one_dedup(start: Any, feishu: Any) -> None:
    double, _ = feishu
    client = await start(mode="both")
    event = message_event("both ways", message_id="om_both")
    await double.push_event(event)
    body = encrypted_body(event)
    resp = await client.post("/feishu/webhook", data=body, headers=signed(body))
    assert resp.status == 200
    await double.wait_for(lambda: double.answer("om_both") is not None)
    await client.app[DISPATCHER].wait_idle()
    assert len(double.replies_to("om_both")) == 1


def test_webhook_mode_requires_a_verification_token() -> None:
    with pytest.raises(ConfigError, match="verification_token"):
        fd.config("http://127.0.0.1:1", feishu={"mode": "webhook", "verification_token": ""})


def test_webhook_mode_requires_an_encrypt_key() -> None:
    """The verification token is the same in every delivery: alone, it authenticates nothing."""
    for mode in ("webhook", "both"):
        with pytest.raises(ConfigError, match=r"feishu\.encrypt_key"):
            fd.config("http://127.0.0.1:1", feishu={"mode": mode, "encrypt_key": ""})
    fd.config("http://127.0.0.1:1", feishu={"mode": "ws", "encrypt_key": ""})  # no webhook: not needed
