"""The status page in real headless Chromium: log in, chat in a second tab, watch the counter move
live (server-sent events, no reload), keep a screenshot in tests/artifacts/."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.chromium import CHROMIUM, Chromium
from tests.conftest import make_config

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK), reason=f"chromium not installed ({CHROMIUM})"
    ),
]

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
PASSWORD = "correct horse battery"

# Resolve once `test` holds (checked on every DOM change), or reject after 10 s.
WAIT_FOR = """
new Promise((resolve, reject) => {
  const test = () => { try { return %s; } catch (e) { return false; } };
  if (test()) return resolve(true);
  const obs = new MutationObserver(() => { if (test()) { obs.disconnect(); resolve(true); } });
  obs.observe(document.documentElement,
              {subtree: true, childList: true, characterData: true, attributes: true});
  setTimeout(() => { obs.disconnect(); reject(new Error("timed out waiting for: %s")); }, 10000);
})
"""


def wait_for(condition: str) -> str:
    return WAIT_FOR % (condition, condition.replace('"', "'"))


async def test_live_counter_after_web_chat_message(gateway: Any) -> None:
    config = make_config(admin={"password": PASSWORD, "jwt_secret": "browser-test-secret-of-32-bytes-min"})
    client = await gateway(config)
    base = str(client.make_url("")).rstrip("/")

    async with Chromium() as browser:
        status = await browser.new_page()
        await status.navigate(f"{base}/")
        # Not logged in: the browser was sent to the login page.
        assert await status.evaluate("location.pathname") == "/login"
        await status.submit_and_wait(
            f"document.getElementById('password').value = {PASSWORD!r};"
            "document.querySelector('form').submit()"
        )
        assert await status.evaluate("location.pathname") == "/"
        assert await status.evaluate("document.getElementById('messages-in').textContent") == "0"
        await status.evaluate(wait_for("document.getElementById('live').classList.contains('on')"))
        await status.evaluate("window.notReloaded = true")  # a reload would drop this

        chat = await browser.new_page()
        await chat.navigate(f"{base}/chat")
        await chat.evaluate(wait_for("document.getElementById('conn').dataset.state === 'connected'"))
        await chat.evaluate(
            "document.getElementById('text').value = 'hello from chromium';"
            "document.getElementById('form').requestSubmit()"
        )
        await chat.evaluate(
            wait_for(
                "[...document.querySelectorAll('.msg.bot')]"
                ".some(e => e.textContent.includes('hello from chromium'))"
            )
        )

        # The status tab was not reloaded: the counters changed through the live feed.
        await status.evaluate(
            wait_for(
                "document.getElementById('messages-in').textContent === '1'"
                " && document.getElementById('replies-out').textContent === '1'"
            )
        )
        assert await status.evaluate("window.notReloaded") is True
        await status.send("Page.bringToFront")  # background tabs do not paint: no screenshot
        shot = await status.screenshot(ARTIFACTS / "status-page.png")
        assert shot.startswith(b"\x89PNG") and len(shot) > 10_000

        # Our own CSP must not break our own pages (violations are logged as errors).
        assert status.errors == [] and chat.errors == []


async def test_expired_login_sends_the_page_to_the_login_form(gateway: Any) -> None:
    config = make_config(
        admin={"password": PASSWORD, "jwt_secret": "expiry-secret-of-at-least-32-bytes", "token_ttl": 3.0}
    )
    client = await gateway(config)
    base = str(client.make_url("")).rstrip("/")
    async with Chromium() as browser:
        page = await browser.new_page()
        await page.navigate(f"{base}/login")
        await page.submit_and_wait(
            f"document.getElementById('password').value = {PASSWORD!r};"
            "document.querySelector('form').submit()"
        )
        assert await page.evaluate("location.pathname") == "/"
        # The token lapses within seconds (3 s leaves room on a loaded machine); the live feed
        # ends, status.js finds out and leaves.
        await page.wait_event("Page.loadEventFired")
        assert await page.evaluate("location.pathname + location.search") == "/login?next=/"
        assert await page.evaluate("document.getElementById('password') !== null")
