"""What every HTML page shares: its language. Templates are translated by jinja2's i18n extension
over the catalogs of `gateway.i18n` (`_("…")` and `{% trans %}`), in the `locale` each render's
context names, so one environment serves every language at once (docs/chat.md "Languages").

The extension's translations are the trusted catalog: they are markup, and formatted with `%`. A
value that may name a catalog text (a channel state, a note) goes through the `translate` filter
instead, which is escaped like any value and never formatted.
"""

from __future__ import annotations

from typing import Any

import jinja2
from aiohttp import web
from jinja2.runtime import Context

from gateway.i18n import Locale, page_locale, translator


class PageTranslations:
    """What `install_gettext_translations` takes: gettext and ngettext, each reading the
    locale of the template being rendered (its `locale` variable; none = the default, zh-CN)."""

    @jinja2.pass_context
    def gettext(self, context: Context, message: str) -> str:
        return translator(context.get("locale")).gettext(message)

    @jinja2.pass_context
    def ngettext(self, context: Context, singular: str, plural: str, n: int) -> str:
        return translator(context.get("locale")).ngettext(singular, plural, n)


@jinja2.pass_context
def translate(context: Context, value: Any) -> Any:
    """A value that may be a catalog text (a state, a note): its translation, else itself."""
    return translator(context.get("locale")).gettext(value) if isinstance(value, str) and value else value


def install(env: jinja2.Environment) -> None:
    """Translate `env`'s templates. Whitespace inside `{% trans %}` is collapsed (the catalog's
    msgids are single lines); `pybabel extract` reads them with the same settings (pyproject.toml)."""
    env.add_extension("jinja2.ext.i18n")
    env.policies["ext.i18n.trimmed"] = True
    # Added to the environment by the extension (not in jinja2's type stubs).
    env.install_gettext_translations(PageTranslations(), newstyle=True)  # type: ignore[attr-defined]
    env.filters["translate"] = translate


def locale_of(request: web.Request) -> Locale:
    """An admin page's language: the browser's Accept-Language, else Chinese."""
    return page_locale(request.headers.get("Accept-Language"))
