"""Key hygiene (docs/security.md): model and platform keys reload without a restart (SIGHUP or the
admin API, from the config file or `$CREDENTIALS_DIRECTORY`), and every configured secret's
first-seen date is kept by fingerprint, so the status page and `doctor` warn about old keys."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import time
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from gateway import doctor
from gateway.config import Config, load
from gateway.keyage import KEY_AGES_FILE, fingerprint, parse, today
from gateway.tokens import TokenCache
from handlers.dingtalk.webhook import sign
from handlers.feishu.webhook import signature
from tests.conftest import make_config
from tests.doubles import feishu as fd
from tests.doubles.dingtalk import DingTalkDouble
from tests.doubles.feishu_events import APP_ID, message_event
from tests.doubles.openai import OpenAIDouble
from tests.helpers import dingtalk_section, serve, webchat_answer
from tests.process import GatewayProcess, env_for

TOKEN_PATH = "/v1.0/oauth2/accessToken"
DIRECT_SEND = "/v1.0/robot/oToMessages/batchSend"


# -- key age --------------------------------------------------------------------------------------
def write_ages(state: Path, first_seen: dict[str, date]) -> None:
    """A `key-ages.json` as a gateway left it (mode 0600)."""
    state.mkdir(parents=True, exist_ok=True)
    text = orjson.dumps({"first_seen": {fp: day.isoformat() for fp, day in first_seen.items()}})
    fd_ = os.open(state / KEY_AGES_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd_, "wb") as fh:
        fh.write(text)


def on_disk(state: Path, **sections: dict[str, Any]) -> Config:
    """A config whose state (the key ages included) is kept in `state`."""
    return make_config(server={"state_dir": str(state)}, store={"url": "sqlite:///botgate.sqlite3"}, **sections)


def key_age_warnings(page: str) -> list[str]:
    return [" ".join(m.split()) for m in re.findall(r'<p class="banner warn key-age">(.*?)</p>', page, re.S)]


async def doctor_line(config: Config) -> str:
    """`python run.py doctor`'s key age line (the platforms' checks left out)."""
    lines: list[str] = []
    await doctor.run(config, [], lines.append)
    return next(line for line in lines if line[6:].startswith("key age: "))


async def test_a_key_older_than_90_days_warns_on_the_status_page_and_in_doctor(
    gateway: Any, openai_double: tuple[OpenAIDouble, str], tmp_path: Path
) -> None:
    fresh, old, retired = "sk-fresh-key-0001", "sk-old-key-0002", "sk-retired-key-0003"
    state, on = tmp_path / "state", today()
    write_ages(state, {
        fingerprint(fresh): on - timedelta(days=90),  # 90 days: not older than 90
        fingerprint(old): on - timedelta(days=120),
        fingerprint(retired): on - timedelta(days=400),  # no longer configured
    })  # fmt: skip
    config = on_disk(state, model={"base_url": openai_double[1], "api_keys": [fresh, old]})
    client = await gateway(config)

    page = await (await client.get("/", headers={"Accept-Language": "en"})).text()
    assert key_age_warnings(page) == [
        f"Key older than 90 days: <code>[model] api_keys #2</code> (fingerprint {fingerprint(old)[:4]}…) was first "
        f"seen {(on - timedelta(days=120)).isoformat()}, 120 days ago. Rotate it: set a new key, reload, then "
        "revoke the old one."
    ]
    api = orjson.loads(await (await client.get("/api/status")).read())
    assert [(k["name"], k["age_days"]) for k in api["key_age"]["old"]] == [("[model] api_keys #2", 120)]
    shown = page + orjson.dumps(api).decode()
    for value in (fresh, old, fingerprint(fresh), fingerprint(old)):
        assert value not in shown  # never the key, never its whole fingerprint

    # The record: the retired key is gone, the others keep their dates; 0600.
    path = state / KEY_AGES_FILE
    assert parse(path.read_text()) == {
        fingerprint(fresh): on - timedelta(days=90),
        fingerprint(old): on - timedelta(days=120),
    }
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    line = await doctor_line(config)
    assert line.startswith("WARN  key age: older than 90 days: [model] api_keys #2 (fingerprint "), line
    assert "120 days ago" in line and "#1" not in line and "systemctl reload botgate" in line
    assert old not in line and fingerprint(old) not in line


async def test_fresh_keys_do_not_warn(gateway: Any, tmp_path: Path) -> None:
    state = tmp_path / "state"
    keys = ["sk-new-key-0001"]
    secrets = {"alerts": {"dingtalk_secret": "SEC-robot-signing"}, "admin": {"jwt_secret": "j" * 32}}
    config = on_disk(state, model={"api_keys": keys}, **secrets)
    client = await gateway(config)
    page = await (await client.get("/", headers={"Accept-Language": "en"})).text()
    assert key_age_warnings(page) == [] and "Key older than" not in page
    api = orjson.loads(await (await client.get("/api/status")).read())
    assert api["key_age"] == {"max_age_days": 90, "old": []}
    values = [*keys, "SEC-robot-signing", "j" * 32]
    assert parse((state / KEY_AGES_FILE).read_text()) == {fingerprint(v): today() for v in values}
    line = await doctor_line(config)
    assert line == "PASS  key age: 3 keys, the oldest first seen 0 days ago (a warning after 90)", line


async def test_a_memory_store_keeps_no_key_ages_on_disk(gateway: Any, tmp_path: Path) -> None:
    config = make_config(model={"api_keys": ["sk-in-memory-01"]})  # memory:// (the tests' default)
    await gateway(config)
    assert not await asyncio.to_thread(lambda: list(tmp_path.rglob(KEY_AGES_FILE)))
    line = await doctor_line(config)
    assert line.startswith("PASS  key age: 1 keys; store.url is memory://"), line


# -- reloading keys -------------------------------------------------------------------------------
async def reloaded(gw: GatewayProcess) -> dict[str, object]:
    """SIGHUP, wait for RELOADING=1 then READY=1; the `config reloaded` log line."""
    gw.signal(signal.SIGHUP)
    await gw.notify.await_for("RELOADING=1")
    assert (await gw.notify.areceive())[0] == "READY=1"
    lines = [line for line in gw.log_lines() if str(line["message"]).startswith("config reloaded")]
    assert lines, gw.output()
    return lines[-1]


def credential(directory: Path, name: str, value: str) -> None:
    directory.mkdir(exist_ok=True)
    (directory / name).write_text(value + "\n")


async def test_sighup_gives_dingtalk_a_new_client_secret_without_a_restart(
    aiohttp_server: Any, spawn_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    """The secret comes from `$CREDENTIALS_DIRECTORY`; after the file changes and a SIGHUP, the
    next access token is fetched with the new secret (the double accepts no other), the webhook
    verifies with it and the next Stream connection opens with it: the same process throughout."""
    old, new = "ding-secret-old-1", "ding-secret-new-2"
    double = DingTalkDouble(client_secret=old)
    await serve(aiohttp_server, double)
    creds = tmp_path / "credentials"
    credential(creds, "BOTGATE_DINGTALK__CLIENT_SECRET", old)
    section = {k: v for k, v in dingtalk_section(double).items() if k != "client_secret"}
    env = {**env_for({"dingtalk": {**section, "mode": "both"}}), "CREDENTIALS_DIRECTORY": str(creds)}
    gw = spawn_gateway(env=env, start=False)
    await asyncio.to_thread(gw.start)  # the double it talks to runs in this loop
    await double.wait_for(lambda: double.connected, timeout=15)
    pid = gw.proc.pid if gw.proc else 0

    def tokens() -> int:
        return sum(path == TOKEN_PATH for _, path in double.requests)

    def sends() -> int:
        return sum(path == DIRECT_SEND for _, path, _ in double.api_calls)

    async def webhook(secret: str, text: str) -> int:
        ts = str(int(time.time() * 1000))
        body = orjson.dumps(double.message(text, staff_id="u2"))
        async with aiohttp.ClientSession() as http, http.post(
            f"{gw.url}/dingtalk/webhook", data=body, headers={"timestamp": ts, "sign": sign(ts, secret)}
        ) as resp:
            return resp.status

    # An expired sessionWebhook: the answer goes through the OpenAPI, which needs an access token.
    await double.push(double.message("before", staff_id="u1", expires_in=-60))
    await double.wait_for(lambda: sends() == 1)
    assert tokens() == 1
    assert await webhook(old, "signed with the old secret") == 200

    double.client_secret = new  # rotated in the developer console: only the new one works now
    credential(creds, "BOTGATE_DINGTALK__CLIENT_SECRET", new)
    line = await reloaded(gw)
    assert line["applied"] == ["dingtalk.client_secret"] and line["restart_keys"] == [], line

    await double.push(double.message("after", staff_id="u1", expires_in=-60))
    await double.wait_for(lambda: sends() == 2)
    assert tokens() == 2  # a new token, fetched with the new secret (the cached one was forgotten)
    assert await webhook(new, "signed with the new secret") == 200
    assert await webhook(old, "signed with the old secret") == 401
    await double.drop()  # the open connection outlives the reload; the next one needs the new secret
    await double.wait_for(lambda: double.connected and double.connections == 2, timeout=15)
    assert double.opens[-1]["clientSecret"] == new

    # The key-age record follows the rotation: the new secret is seen today, the old one is gone.
    stored = parse((gw.workdir / "state" / KEY_AGES_FILE).read_text())
    assert stored == {fingerprint(new): today()}
    assert gw.proc is not None and gw.proc.pid == pid and gw.proc.poll() is None  # never restarted
    assert await asyncio.to_thread(gw.stop) == 0
    assert old not in gw.output() and new not in gw.output()


async def test_sighup_rotates_the_model_key_from_a_credential_file(
    openai_double: tuple[OpenAIDouble, str], spawn_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    model, url = openai_double
    old, new = "sk-model-old-0001", "sk-model-new-0002"
    creds = tmp_path / "credentials"
    credential(creds, "BOTGATE_MODEL__API_KEYS", old)
    config = f'[model]\nbase_url = "{url}"\n[cache]\nenabled = false\n'
    gw = spawn_gateway(config, env={"CREDENTIALS_DIRECTORY": str(creds)}, start=False)
    await asyncio.to_thread(gw.start)
    async with aiohttp.ClientSession(headers=gw.admin_headers()) as http:
        assert await webchat_answer(http, gw.url, "rotatesession1") == "echo: hi from rotatesession1"
        assert model.auth_headers == [f"Bearer {old}"]

        model.bad_keys = {old}  # revoked at the provider
        credential(creds, "BOTGATE_MODEL__API_KEYS", new)
        line = await reloaded(gw)
        assert line["applied"] == ["model.api_keys"] and line["restart_keys"] == [], line
        assert await webchat_answer(http, gw.url, "rotatesession2") == "echo: hi from rotatesession2"
    assert model.auth_headers == [f"Bearer {old}", f"Bearer {new}"]
    assert parse((gw.workdir / "state" / KEY_AGES_FILE).read_text()) == {fingerprint(new): today()}
    assert await asyncio.to_thread(gw.stop) == 0


async def reload_api(client: Any) -> tuple[int, Any]:
    resp = await client.post("/api/reload", data=b"{}", headers={"Content-Type": "application/json"})
    return resp.status, await resp.json()


async def test_a_secret_for_another_app_id_waits_for_a_restart(
    aiohttp_server: Any, gateway: Any, tmp_path: Path
) -> None:
    """A new client_id is another app: its secret is reported as needing the restart too, and the
    running bot keeps the app (and secret) it started with. The same id with a new secret applies."""
    old, new = "ding-secret-old-1", "ding-secret-new-2"
    double = DingTalkDouble(client_secret=old)
    await serve(aiohttp_server, double)
    path = tmp_path / "config.toml"

    def write(client_id: str, secret: str) -> None:
        path.write_text(
            f'[dingtalk]\nenabled = true\nmode = "webhook"\nclient_id = "{client_id}"\nclient_secret = "{secret}"\n'
            f'api_base = "{double.base}"\noapi_base = "{double.base}"\n[store]\nurl = "memory://"\n'
        )

    write(double.client_id, old)
    client = await gateway(load(path, env={}))

    async def webhook(secret: str) -> int:
        ts = str(int(time.time() * 1000))
        body = orjson.dumps(double.message("hi"))
        resp = await client.post("/dingtalk/webhook", data=body, headers={"timestamp": ts, "sign": sign(ts, secret)})
        return int(resp.status)

    write("ding-another-app", new)
    assert await reload_api(client) == (200, {
        "source": str(path), "applied": [], "needs_restart": ["dingtalk.client_id", "dingtalk.client_secret"],
    })  # fmt: skip
    assert (await webhook(old), await webhook(new)) == (200, 401)

    write(double.client_id, new)
    assert await reload_api(client) == (200, {
        "source": str(path), "applied": ["dingtalk.client_secret"], "needs_restart": [],
    })  # fmt: skip
    assert (await webhook(old), await webhook(new)) == (401, 200)


async def test_a_token_fetched_while_the_secret_changed_is_not_kept() -> None:
    """A token fetch already running when a reload replaces the secret is handed to its caller,
    not cached: the next call fetches one with the new secret."""
    started, release = asyncio.Event(), asyncio.Event()
    fetches: list[int] = []

    async def fetch() -> tuple[str, float]:
        fetches.append(len(fetches) + 1)
        if len(fetches) == 1:
            started.set()
            await release.wait()
        return f"token-{len(fetches)}", 7200.0

    cache = TokenCache(fetch)
    first = asyncio.create_task(cache.get())
    async with asyncio.timeout(5):
        await started.wait()
    cache.forget()  # the secret changed while that fetch ran
    release.set()
    assert await first == "token-1"
    assert await cache.get() == "token-2" and await cache.get() == "token-2"


def feishu_signed(body: bytes, key: str) -> dict[str, str]:
    ts, nonce = str(int(time.time())), "nonce-rotation"
    return {
        "X-Lark-Request-Timestamp": ts,
        "X-Lark-Request-Nonce": nonce,
        "X-Lark-Signature": signature(ts, nonce, key, body),
        "Content-Type": "application/json",
    }


async def test_reload_gives_feishu_new_secrets(aiohttp_server: Any, gateway: Any, tmp_path: Path) -> None:
    """app_secret (the next tenant token is fetched with it), encrypt_key and verification_token
    (the webhook verifies with them) apply on a reload."""
    double, domain = await fd.start(aiohttp_server)
    path = tmp_path / "config.toml"

    def write(secret: str, key: str, token: str) -> None:
        path.write_text(
            f'[feishu]\nenabled = true\nmode = "webhook"\napp_id = "{APP_ID}"\napp_secret = "{secret}"\n'
            f'domain = "{domain}"\nencrypt_key = "{key}"\nverification_token = "{token}"\n'
            '[cache]\nenabled = false\n[store]\nurl = "memory://"\n'
        )

    write(fd.APP_SECRET, "encrypt-key-one", "vtoken")
    client = await gateway(load(path, env={}))

    async def deliver(message_id: str, key: str, token: str) -> int:
        event = message_event(f"text of {message_id}", message_id=message_id)
        event["header"]["token"] = token
        body = orjson.dumps(event)
        return int((await client.post("/feishu/webhook", data=body, headers=feishu_signed(body, key))).status)

    assert await deliver("om_before", "encrypt-key-one", "vtoken") == 200
    await double.wait_for(lambda: double.answer("om_before") is not None)
    assert double.token_calls == 1

    double.app_secret = "app-secret-two"  # rotated in the developer console
    write("app-secret-two", "encrypt-key-two", "vtoken-two")
    assert await reload_api(client) == (200, {
        "source": str(path),
        "applied": ["feishu.app_secret", "feishu.encrypt_key", "feishu.verification_token"],
        "needs_restart": [],
    })  # fmt: skip
    assert await deliver("om_old_key", "encrypt-key-one", "vtoken-two") == 401
    assert await deliver("om_old_token", "encrypt-key-two", "vtoken") == 401
    assert await deliver("om_after", "encrypt-key-two", "vtoken-two") == 200
    await double.wait_for(lambda: double.answer("om_after") is not None)
    assert "text of om_after" in str(double.answer("om_after"))
    assert double.token_calls == 2  # a new token, fetched with the new secret
