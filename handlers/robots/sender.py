"""The part of a group-robot sender that is the same on every platform: wait for a token of the
robot's bucket, cut the text to the platform's size, post the JSON, read the answer's error code
and classify it (`gateway.robots`). A platform module says how to sign and shape the post and
which codes mean what.

The webhook URL carries the robot's credential (DingTalk's `access_token`, Feishu's hook token,
WeCom's `key`): no error raised here ever contains it, nor the exception that named it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, ClassVar

import aiohttp
import orjson
from aiohttp import hdrs
from yarl import URL

from gateway.alerts import Alert
from gateway.errors import PlatformError, StoreError, Throttled
from gateway.robots import BUCKET_WAIT, RobotMessage, RobotRefused, cut_to_bytes, take_robot_token
from gateway.store import Store

TIMEOUT = aiohttp.ClientTimeout(total=10)
MAX_ERRMSG = 200  # of the platform's own words kept in a refusal
THROTTLED_RETRY = 60.0  # when the platform asks for no wait of its own


ENVELOPE = 1_000  # room for the JSON around the text, and its escapes, within `body_limit`


class WebhookRobot:
    """One configured robot. Subclasses set the class attributes and `shape`/`answer_code`."""

    name: str  # its platform; also the bucket's name (`robot:<name>`)
    # Tokens a minute in the robot's shared bucket (`take_robot_token`). The store's bucket starts
    # full, so up to twice this many posts can land in one minute: half the platform's figure.
    per_minute: ClassVar[int]
    body_limit: ClassVar[int | None] = None  # the platform's limit on the whole JSON body, bytes
    throttled: ClassVar[Mapping[int, float]]  # error code -> seconds to wait before trying again
    busy: ClassVar[frozenset[int]] = frozenset()  # codes that say "not taken, try again later"
    refusals: ClassVar[Mapping[int, str]]  # error codes known to be a refusal -> what it means

    def __init__(
        self, session: aiohttp.ClientSession, store: Store, webhook: str, secret: str = "", wait: float = BUCKET_WAIT
    ) -> None:
        self._session = session
        self._store = store
        self._webhook = webhook
        self._secret = secret  # the signing secret, for the platforms that sign ("" = unsigned)
        self._wait = wait

    def content_limit(self, markdown: bool) -> int:
        """The most UTF-8 bytes of text one post carries: by default the body's limit, less the envelope."""
        if self.body_limit is None:
            raise NotImplementedError
        return self.body_limit - ENVELOPE

    def shape(self, message: RobotMessage, now: float) -> tuple[URL, dict[str, Any]]:
        """The URL (signed where the platform signs it there) and body of one post."""
        raise NotImplementedError

    @staticmethod
    def answer_code(data: Mapping[str, Any]) -> tuple[int | None, str]:
        """The error code in an answer (None: the answer has none) and the platform's message."""
        raise NotImplementedError

    async def post(self, alert: Alert) -> None:
        """The built-in notifier's sink (`gateway.alerts.AlertSink`): the same path as any post."""
        await self.send(RobotMessage(alert.text()))

    async def send(self, message: RobotMessage) -> None:
        try:
            await take_robot_token(self._store, self.name, self.per_minute, self._wait)
        except StoreError as e:  # its bucket cannot be read: not posted, so trying again later is safe
            raise PlatformError(f"the {self.name} robot's rate-limit bucket is unavailable: {e}") from None
        url, raw = self._request(message)
        try:
            async with self._session.post(
                url, data=raw, headers={hdrs.CONTENT_TYPE: "application/json; charset=utf-8"}, timeout=TIMEOUT
            ) as resp:
                status, retry_after, body = resp.status, resp.headers.get(hdrs.RETRY_AFTER, ""), await resp.read()
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            # `from None`: the cause's text may name the URL, and with it the robot's credential
            raise PlatformError(f"the {self.name} robot is unreachable: {type(e).__name__}") from None
        self._check(status, retry_after, body)

    def _request(self, message: RobotMessage) -> tuple[URL, bytes]:
        """The post, its text cut to the content limit and, where the platform limits the whole
        body, cut further until the encoded body fits (JSON escapes make it longer than the text)."""
        limit = self.content_limit(message.markdown)
        while True:
            fitted = RobotMessage(cut_to_bytes(message.text, limit), message.markdown, message.title)
            url, body = self.shape(fitted, time.time())
            raw = orjson.dumps(body)
            over = len(raw) - self.body_limit if self.body_limit else 0
            if over <= 0 or limit <= 0:
                return url, raw
            limit -= over

    def _check(self, status: int, retry_after: str, body: bytes) -> None:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
        code, said = self.answer_code(data) if isinstance(data, dict) else (None, "")
        said = said[:MAX_ERRMSG]
        if code == 0 and status == 200:
            return
        if code is not None and code in self.throttled:
            wait = self.throttled[code]
            raise Throttled(f"the {self.name} robot throttled the post: {code} {said}", retry_after=wait)
        if code is not None and code in self.busy:
            raise PlatformError(f"the {self.name} robot is busy: {code} {said}")
        if code is not None and code != 0:
            reason = self.refusals.get(code, "")
            raise RobotRefused(self.name, code, f"{reason} ({said})" if reason and said else reason or said)
        if status == 429:
            wait = float(retry_after) if retry_after.isdigit() else THROTTLED_RETRY
            raise Throttled(f"the {self.name} robot throttled the post: HTTP 429", retry_after=wait)
        if status >= 500 or status == 200:  # a 200 without a code: a proxy's page, not the robot
            raise PlatformError(f"the {self.name} robot answered HTTP {status} without a result")
        raise RobotRefused(self.name, 0, f"HTTP {status}")
