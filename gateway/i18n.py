"""Languages: which one a message is answered in (`locale_for`), and the catalogs that translate.

Every user-facing text is written in English in the code, marked for extraction (`N_` for
constants, `_` / `{% trans %}` in templates) and translated by GNU gettext catalogs:
`gateway/locales/<ll_CC>/LC_MESSAGES/botgate.po`, compiled to `botgate.mo` and read with the
standard library's `gettext` (docs/chat.md "Languages": the rule, and how to add or change a text).

A text's English is its msgid. A text with fields names them (`{request_id}`) and `Translator`
fills them in by name, so a translation may put them in any order.
"""

from __future__ import annotations

import functools
import gettext
import logging
import re
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

DOMAIN = "botgate"
LOCALES = Path(__file__).resolve().parent / "locales"

AUTO = "auto"
SETTINGS = (AUTO, "zh-CN", "en")  # `[chat] locale`
BOT_SETTINGS = ("", *SETTINGS)  # a bot's own `locale`: "" = its section's, else `[chat] locale`

# An Accept-Language header is read up to this many language ranges: browsers send a handful.
MAX_RANGES = 32
_QVALUE = re.compile(r"(?:0(?:\.\d{0,3})?|1(?:\.0{0,3})?)")
_RANGE = re.compile(r"\*|[a-z]{1,8}(?:-[a-z0-9]{1,8})*")


class Locale(StrEnum):
    """A language botgate speaks. Only Simplified Chinese exists of Chinese: zh-TW / zh-HK read it."""

    ZH_CN = "zh-CN"
    EN = "en"

    @property
    def catalog(self) -> str:
        """Its catalog's directory under `LOCALES` (gettext's spelling: zh_CN)."""
        return self.value.replace("-", "_")

    @classmethod
    def of(cls, value: str | None) -> Locale:
        """The locale `value` names, leniently ("zh_CN", "zh-Hans", "en-US"); anything else (or
        nothing: a message stored before messages carried one) is the default, zh-CN."""
        primary = re.split(r"[-_]", (value or "").strip().lower(), maxsplit=1)[0]
        return cls.EN if primary == "en" else DEFAULT_LOCALE


DEFAULT_LOCALE = Locale.ZH_CN


def N_(message: str) -> str:
    """Mark `message` for the catalog where it is defined; `translator(...)(message)` translates it."""
    return message


class Translator:
    """One locale's texts: `t(msgid, **fields)` is the translation with its fields filled in by
    name (`str.format`); without fields the text is returned as is, braces and all."""

    __slots__ = ("_catalog", "locale")

    def __init__(self, locale: Locale, catalog: gettext.NullTranslations) -> None:
        self.locale = locale
        self._catalog = catalog

    def __call__(self, message: str, /, **fields: object) -> str:
        text = self._catalog.gettext(message)
        return text.format(**fields) if fields else text

    def plural(self, singular: str, plural: str, n: int, /, **fields: object) -> str:
        """The form for `n` (Chinese has one), with `{n}` and `fields` filled in."""
        return self._catalog.ngettext(singular, plural, n).format(n=n, **fields)

    def gettext(self, message: str) -> str:
        """The bare translation, nothing filled in (what jinja2's i18n extension calls)."""
        return self._catalog.gettext(message)

    def ngettext(self, singular: str, plural: str, n: int) -> str:
        return self._catalog.ngettext(singular, plural, n)


def translator(locale: Locale | str | None = None) -> Translator:
    """The translator of `locale` (`Locale.of` reads a string; None = the default, zh-CN)."""
    return _translator(locale if isinstance(locale, Locale) else Locale.of(locale))


@functools.cache
def _translator(locale: Locale) -> Translator:
    try:
        catalog: gettext.NullTranslations = gettext.translation(DOMAIN, LOCALES, languages=[locale.catalog])
    except OSError as e:  # a checkout without its compiled catalogs: English texts, said once
        log.error("no %s catalog (%s): texts stay in English", locale.value, e)
        catalog = gettext.NullTranslations()
    return Translator(locale, catalog)


def from_accept_language(header: str | None) -> Locale | None:
    """The browser's choice among the locales there are, by its q-values (RFC 9110 §12.5.4): the
    first Chinese (any script or region) or English range wins; a header naming only other
    languages gets English; None when it names none (no header, empty, only "*")."""
    if not header:
        return None
    ranked: list[tuple[float, int, str]] = []
    for i, item in enumerate(header.split(",")[:MAX_RANGES]):
        tag, _, params = item.partition(";")
        tag = tag.strip().lower()
        quality: float | None = 1.0
        for param in params.split(";") if params else ():
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                value = value.strip()
                quality = float(value) if _QVALUE.fullmatch(value) else None
        if quality and _RANGE.fullmatch(tag):  # q=0 is "not acceptable"; a malformed range is skipped
            ranked.append((-quality, i, tag))
    named = False
    for _, _, tag in sorted(ranked):
        if tag == "*":
            continue
        named = True
        primary = tag.partition("-")[0]
        if primary == "zh":
            return Locale.ZH_CN
        if primary == "en":
            return Locale.EN
    return Locale.EN if named else None


def is_lark(domain: str) -> bool:
    """Is this Feishu domain Lark's international one (open.larksuite.com and its kin)? A private
    deployment on a domain of its own is Feishu, and Chinese."""
    try:
        host = urlsplit(domain if "//" in domain else f"//{domain}").hostname or ""
    except ValueError:
        return False
    labels = host.rstrip(".").split(".")
    return len(labels) >= 2 and labels[-2] == "larksuite"


def locale_for(
    chat_locale: str,
    bot_locale: str = "",
    platform: str = "",
    feishu_domain: str = "",
    accept_language: str | None = None,
) -> Locale:
    """The locale a message is answered in (docs/chat.md "Languages"): the bot's own `locale` if
    set, else `[chat] locale`; "zh-CN" / "en" force it; "auto" (the default) is Simplified Chinese
    on DingTalk, Feishu and WeCom, English on Lark (a Feishu domain of larksuite's), and in the
    web chat the browser's Accept-Language (`from_accept_language`; none: Chinese)."""
    setting = bot_locale or chat_locale or AUTO
    if setting != AUTO:
        return Locale.of(setting)
    if platform == "web":
        return from_accept_language(accept_language) or DEFAULT_LOCALE
    if platform == "feishu" and is_lark(feishu_domain):
        return Locale.EN
    return DEFAULT_LOCALE


def page_locale(accept_language: str | None) -> Locale:
    """The locale of an admin page (status, login): the browser's Accept-Language, else Chinese."""
    return from_accept_language(accept_language) or DEFAULT_LOCALE
