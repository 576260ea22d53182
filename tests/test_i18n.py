"""Languages: the locale rule, the catalogs (complete, placeholders kept, compiled in sync, covering
every marked text), the config keys, the locale a message carries, and the pages in both languages."""

from __future__ import annotations

import gettext
import re
import string
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from babel.messages.catalog import Catalog
from babel.messages.frontend import CommandLineInterface
from babel.messages.pofile import read_po

from gateway.config import ConfigError, build
from gateway.i18n import DOMAIN, LOCALES, Locale, from_accept_language, is_lark, locale_for, translator
from gateway.messages import InboundMessage
from gateway.metrics import Metrics
from gateway.store.base import decode_messages
from handlers.dingtalk.adapter import DingTalkAdapter
from handlers.dingtalk.parse import UNSUPPORTED, Filters, parse_message
from handlers.feishu.adapter import FeishuAdapter
from handlers.feishu.parse import Rules, parse_event
from tests.conftest import make_config
from tests.doubles.dingtalk import DingTalkDouble
from tests.helpers import hello, msg

ZH, EN = Locale.ZH_CN, Locale.EN
ROOT = Path(__file__).resolve().parent.parent
POT = LOCALES / f"{DOMAIN}.pot"
REBUILD = (
    "rebuild the catalogs (docs/chat.md, 'Languages'): pybabel extract, pybabel update, translate, pybabel compile"
)


# -- the rule -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("chat", "bot", "platform", "domain", "accept", "expected"),
    [
        # auto: Chinese on the Chinese platforms
        ("auto", "", "dingtalk", "", None, ZH),
        ("auto", "", "feishu", "https://open.feishu.cn", None, ZH),
        ("auto", "", "wecom", "", None, ZH),
        ("auto", "", "dingtalk", "", "en-US", ZH),  # a platform's message carries no browser language
        # Lark (larksuite) is English; a private Feishu deployment is Chinese
        ("auto", "", "feishu", "https://open.larksuite.com", None, EN),
        ("auto", "", "feishu", "https://open.larksuite.com/", None, EN),
        ("auto", "", "feishu", "https://OPEN.LARKSUITE.COM:443", None, EN),
        ("auto", "", "feishu", "https://feishu.corp.example.com", None, ZH),
        ("auto", "", "feishu", "https://larksuite.example.cn", None, ZH),  # a name, not Lark's domain
        ("auto", "", "dingtalk", "https://open.larksuite.com", None, ZH),  # the domain is Feishu's setting
        # the web chat: the browser's Accept-Language, by q-value; none: Chinese
        ("auto", "", "web", "", None, ZH),
        ("auto", "", "web", "", "", ZH),
        ("auto", "", "web", "", "*", ZH),
        ("auto", "", "web", "", "en", EN),
        ("auto", "", "web", "", "en-US,en;q=0.9", EN),
        ("auto", "", "web", "", "EN-gb", EN),
        ("auto", "", "web", "", "zh-CN,zh;q=0.9,en;q=0.8", ZH),
        ("auto", "", "web", "", "zh-TW", ZH),  # only Simplified Chinese exists
        ("auto", "", "web", "", "zh-HK, en;q=0.5", ZH),
        ("auto", "", "web", "", "zh-Hant-TW", ZH),
        ("auto", "", "web", "", "en;q=0.5, zh;q=0.8", ZH),
        ("auto", "", "web", "", "zh;q=0.5, en;q=0.8", EN),
        ("auto", "", "web", "", "zh;q=0.7, en;q=0.7", ZH),  # a tie: the header's order
        ("auto", "", "web", "", "en;q=0, zh;q=0.1", ZH),  # q=0: not acceptable
        ("auto", "", "web", "", "en;q=1.5, zh;q=0.3", ZH),  # an invalid q-value: that range is skipped
        ("auto", "", "web", "", "en;q=high, zh", ZH),
        ("auto", "", "web", "", "fr-FR, de;q=0.9", EN),  # neither: the international fallback
        ("auto", "", "web", "", "fr-FR, zh;q=0.1", ZH),
        ("auto", "", "web", "", "fr-FR, *;q=0.5", EN),
        ("auto", "", "web", "", " en-US ; q=0.8 , fr ; q=0.9", EN),  # spaces around the parts
        # forced, and a bot's own
        ("zh-CN", "", "web", "", "en", ZH),
        ("zh-CN", "", "feishu", "https://open.larksuite.com", None, ZH),
        ("en", "", "dingtalk", "", None, EN),
        ("en", "", "feishu", "https://feishu.corp.example.com", None, EN),
        ("zh-CN", "en", "dingtalk", "", None, EN),  # the bot's own wins over [chat]
        ("en", "zh-CN", "feishu", "https://open.larksuite.com", None, ZH),
        ("en", "auto", "dingtalk", "", None, ZH),  # a bot may be "auto" where [chat] forces
        ("en", "", "dingtalk", "", None, EN),  # "" inherits [chat]
        ("", "", "dingtalk", "", None, ZH),  # nothing set: auto
    ],
)
def test_the_locale_rule(chat: str, bot: str, platform: str, domain: str, accept: str | None, expected: Locale) -> None:
    assert locale_for(chat, bot, platform, domain, accept) is expected


def test_a_header_naming_no_language_chooses_none() -> None:
    assert from_accept_language(None) is None and from_accept_language("*") is None
    assert from_accept_language("de, ja;q=0.3") is EN
    assert from_accept_language(",".join(["de"] * 1000) + ", zh") is EN  # read to MAX_RANGES only


def test_lark_is_recognised_by_its_domain_only() -> None:
    assert is_lark("https://open.larksuite.com") and is_lark("open.larksuite.com")
    assert not is_lark("https://open.feishu.cn") and not is_lark("") and not is_lark("http://[::1")


def test_locale_of_is_lenient_and_defaults_to_chinese() -> None:
    assert [Locale.of(v) for v in ("en", "en-US", "EN_gb", "zh-CN", "zh_TW", "", None, "fr")] == [
        EN, EN, EN, ZH, ZH, ZH, ZH, ZH
    ]


def test_the_translator_fills_fields_by_name_and_keeps_braces_without_fields() -> None:
    apology = "Sorry, something went wrong while answering. Please try again. (ref {request_id})"
    assert translator(ZH)(apology, request_id="r1") == "抱歉，回答时出了点问题，请再试一次。（编号 r1）"
    assert translator(EN)(apology, request_id="r1").endswith("(ref r1)")
    assert translator("en")("not in the catalog {x}") == "not in the catalog {x}"
    assert translator(None) is translator(ZH) is translator("zh_CN")  # one per locale, cached
    assert translator(ZH).plural("{n} file", "{n} files", 3) == "3 files"  # unknown: the English forms


# -- the catalogs ---------------------------------------------------------------------------------
def catalog(locale: Locale) -> Catalog:
    path = LOCALES / locale.catalog / "LC_MESSAGES" / f"{DOMAIN}.po"
    with path.open("rb") as fh:
        return read_po(fh, locale=locale.catalog)


def brace_fields(text: str) -> list[str]:
    if "{" not in text:
        return []
    try:
        return sorted(name for _, name, _, _ in string.Formatter().parse(text) if name is not None)
    except ValueError:  # not a format string at all (e.g. literal JSON): compared as text below
        return [text]


def markup(text: str) -> list[str]:
    """What a translation must keep as it is: %(name)s fields, HTML tags, `code`, [config] keys,
    environment variables, /commands."""
    kept = re.findall(r"%\(\w+\)s|</?\w+[^>]*>|`[^`]+`|\[\w+\]|BOTGATE_\w+|(?:^|(?<=\s))/[a-z]+", text)
    return sorted(kept)


@pytest.mark.parametrize("msgid", [m.id for m in catalog(ZH) if m.id], ids=lambda m: str(m)[:40])
def test_every_text_has_a_chinese_translation_with_the_same_fields(msgid: str) -> None:
    message = catalog(ZH)[msgid]
    assert message is not None and isinstance(message.string, str)
    assert message.string.strip(), f"no translation: {msgid!r}"
    assert not message.fuzzy, f"fuzzy (a guess by pybabel update, not compiled): {msgid!r}"
    assert brace_fields(message.string) == brace_fields(msgid)
    assert markup(message.string) == markup(msgid)


def test_the_english_catalog_translates_nothing_yet() -> None:
    """English is the msgid: an English entry would only be there to correct one's wording."""
    assert [m.id for m in catalog(EN) if m.id and m.string] == []
    assert {m.id for m in catalog(EN)} == {m.id for m in catalog(ZH)}


@pytest.mark.parametrize("locale", [ZH, EN])
def test_the_compiled_catalogs_are_in_sync_with_their_sources(locale: Locale) -> None:
    """The .mo files are committed (the gateway reads them with the standard library alone)."""
    path = LOCALES / locale.catalog / "LC_MESSAGES" / f"{DOMAIN}.mo"
    with path.open("rb") as fh:
        compiled = {k: v for k, v in gettext.GNUTranslations(fh)._catalog.items() if k}  # type: ignore[attr-defined]
    source = {m.id: m.string for m in catalog(locale) if m.id and m.string and not m.fuzzy}
    assert compiled == source, f"{path.name} is stale: {REBUILD}"


def test_every_marked_text_is_in_the_catalogs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `pybabel extract` finds in the code and templates now (the settings in pyproject.toml)
    is what the template and the catalogs hold: nothing marked is left untranslated."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "now.pot"
    monkeypatch.setattr(sys, "argv", ["pybabel"])
    CommandLineInterface().run(  # type: ignore[no-untyped-call]
        ["pybabel", "-q", "extract", "-F", "pyproject.toml", "-o", str(out), "."]
    )
    with out.open("rb") as fh:
        marked = {m.id for m in read_po(fh) if m.id}
    with POT.open("rb") as fh:
        template = {m.id for m in read_po(fh) if m.id}
    assert len(marked) > 100
    assert sorted(marked - template) == [], f"new texts: {REBUILD}"
    assert sorted(template - marked) == [], f"texts no longer in the code: {REBUILD}"
    assert marked <= {m.id for m in catalog(ZH) if m.string}


# -- configuration --------------------------------------------------------------------------------
def test_the_locale_settings_are_checked_and_named() -> None:
    assert make_config().chat.locale == "auto"
    assert make_config(chat={"locale": "en"}).chat.locale == "en"
    with pytest.raises(ConfigError, match=r"chat\.locale: must be one of auto, zh-CN, en, got 'zh'"):
        make_config(chat={"locale": "zh"})
    with pytest.raises(ConfigError, match=r"feishu\.locale: must be one of \"\", auto, zh-CN, en"):
        make_config(feishu={"locale": "english"})
    with pytest.raises(ConfigError, match=r"environment variable BOTGATE_CHAT__LOCALE: chat\.locale"):
        build({}, {"BOTGATE_CHAT__LOCALE": "de"})
    bots = {"name": "lark", "app_id": "a", "app_secret": "s", "locale": "EN"}
    with pytest.raises(ConfigError, match=r"feishu\.bots\[lark\]\.locale: must be one of"):
        make_config(feishu={"bots": [bots]})
    cfg = make_config(dingtalk={"locale": "en", "bots": [{"name": "hr", "client_id": "c", "client_secret": "s"}]})
    assert [b.settings.locale for b in cfg.bots] == ["en"]  # a listed bot inherits its section's


# -- the locale a message carries ---------------------------------------------------------------------
def test_the_locale_survives_json_and_old_entries_load_without_one() -> None:
    english = InboundMessage.from_dict(orjson.loads(orjson.dumps({**msg(1).to_dict(), "locale": "en"})))
    assert english.locale is EN
    old = msg(2).to_dict()
    del old["locale"]  # an inbox entry written before messages carried a locale
    assert [m.locale for m in decode_messages([orjson.dumps(old)])] == [None]
    assert translator(None)("Reply") == "回复"  # ... answered in the default


async def test_a_dingtalk_bot_words_its_notices_in_its_locale() -> None:
    double = DingTalkDouble(base="https://oapi.dingtalk.com")
    body = double.message(msgtype="video", content={"downloadCode": "v"})
    for settings, expected in (({}, ZH), ({"locale": "en"}, EN)):
        cfg = make_config(dingtalk={"client_id": double.client_id, **settings}).dingtalk
        message = await DingTalkAdapter(cfg, Metrics()).parse(body, "stream")
        assert isinstance(message, InboundMessage) and message.locale is expected
        wanted = translator(expected)(UNSUPPORTED, what=translator(expected)("videos"))
        assert message.unsupported == wanted
    assert "视频" in translator(ZH)(UNSUPPORTED, what=translator(ZH)("videos"))
    plain = parse_message(body, Filters(robot_code="r"), "stream")  # no locale: English, chosen later
    assert isinstance(plain, InboundMessage) and plain.locale is None and "can't read videos" in plain.unsupported


def feishu_event(message_type: str) -> dict[str, Any]:
    content = orjson.dumps({"file_key": "k"}).decode()
    return {
        "schema": "2.0",
        "header": {"event_type": "im.message.receive_v1"},
        "event": {
            "sender": {"sender_id": {"open_id": "ou_user"}, "sender_type": "user"},
            "message": {"message_id": "om_1", "chat_id": "oc_1", "chat_type": "p2p",
                        "message_type": message_type, "content": content},
        },
    }  # fmt: skip


@pytest.mark.parametrize(
    ("domain", "expected", "words"),
    [("https://open.feishu.cn", ZH, "位置"), ("https://open.larksuite.com", EN, "locations")],
)
def test_a_feishu_bot_speaks_english_on_lark(domain: str, expected: Locale, words: str) -> None:
    adapter = FeishuAdapter(make_config(feishu={"domain": domain}).feishu, Metrics())
    assert adapter.locale() is expected
    message = parse_event(feishu_event("location"), Rules("ou_bot"), "ws", 0.0, adapter.locale())
    assert isinstance(message, InboundMessage) and message.locale is expected and words in message.unsupported


# -- the pages --------------------------------------------------------------------------------------
def page_strings(html: str) -> dict[str, str]:
    """The words a page hands its script (`data-strings` on <body>)."""
    match = re.search(r"<body data-strings='([^']*)'>", html)
    assert match, "no data-strings"
    return dict(orjson.loads(match.group(1)))


@pytest.mark.parametrize(
    ("accept", "lang", "shown", "not_shown"),
    [
        ({}, "zh-CN", "收到消息", "Messages in"),
        ({"Accept-Language": "zh-TW,zh;q=0.9"}, "zh-CN", "收到消息", "Messages in"),
        ({"Accept-Language": "en-US,en;q=0.9"}, "en", "Messages in", "收到消息"),
    ],
)
async def test_the_status_page_follows_accept_language(
    gateway: Any, accept: dict[str, str], lang: str, shown: str, not_shown: str
) -> None:
    client = await gateway(make_config())
    html = await (await client.get("/", headers={"Accept": "text/html", **accept})).text()
    assert f'<html lang="{lang}">' in html and shown in html and not_shown not in html
    feed = await client.get("/status/events", headers=accept)  # the live body: the same language
    async with feed:
        while not (line := await feed.content.readline()).startswith(b"data: "):
            pass
    body = orjson.loads(line[len(b"data: ") :])["html"]
    assert shown in body and not_shown not in body


async def test_the_status_page_translates_states_and_escapes_values(gateway: Any) -> None:
    client = await gateway(make_config())
    html = await (await client.get("/", headers={"Accept": "text/html"})).text()
    assert '<span class="state off">未配置</span>' in html
    assert "未配置：请设置 [dingtalk] enabled = true" in html
    assert page_strings(html)["live"] == "实时"  # what status.js shows


async def test_the_login_page_follows_accept_language(gateway: Any) -> None:
    client = await gateway(make_config(admin={"password": "a password for i18n"}))
    zh = await (await client.get("/login")).text()
    assert '<html lang="zh-CN">' in zh and "管理员密码" in zh and "登录" in zh
    en = await (await client.get("/login", headers={"Accept-Language": "en"})).text()
    assert '<html lang="en">' in en and "Admin password" in en and "管理员密码" not in en
    wrong = await client.post("/login", data={"password": "not it"}, headers={"Accept-Language": "en"})
    assert wrong.status == 401 and "wrong password" in await wrong.text()
    wrong = await client.post("/login", data={"password": "not it"})
    assert wrong.status == 401 and "密码错误" in await wrong.text()
    api = await client.post("/login", json={"password": "not it"})  # the API stays English
    assert (await api.json())["error"] == "wrong password"


async def test_the_web_chat_follows_the_browser_unless_forced(gateway: Any) -> None:
    client = await gateway(make_config())
    page = await (await client.get("/chat", headers={"Accept-Language": "en"})).text()
    assert '<html lang="en">' in page and "Send" in page
    page = await (await client.get("/chat")).text()
    assert '<html lang="zh-CN">' in page and "发送" in page and page_strings(page)["connected"] == "已连接"
    forced = await gateway(make_config(chat={"locale": "zh-CN"}))
    page = await (await forced.get("/chat", headers={"Accept-Language": "en"})).text()
    assert '<html lang="zh-CN">' in page
    async with forced.ws_connect("/chat/ws", headers={"Accept-Language": "en"}) as ws:
        await hello(ws)
        await ws.send_str('{"type": "message", "text": ""}')
        assert orjson.loads((await ws.receive()).data)["error"] == "text 必须是非空字符串"
