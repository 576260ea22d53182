"""One server-sent-events reader for every answer backend (docs/protocols/backends.md §1).

It follows the WHATWG event-stream rules (html.spec.whatwg.org, "Parsing an event stream"): lines
end with CRLF, LF or CR (also split across chunks); a leading BOM is dropped; `:` starts a comment;
`field:value` loses one optional space after the colon; `data` lines are joined with "\\n";
`event` names the event ("message" when none does); `id` (without NUL) is the last event id; `retry`
(digits only) is recorded; unknown fields are ignored; a blank line dispatches. Lines are split as
bytes and decoded whole, so a UTF-8 character cut by a chunk boundary arrives intact.

Two deliberate choices, both tested:

* An event that has an `event` line but no `data` line is dispatched, with data "" (a browser
  drops it). Dify's keep-alive is a bare `event: ping`, and Coze Studio ends its stream with a
  data-less `conversation.stream.done`; the backend decides what they mean.
* At the end of the stream an event not closed by a blank line is discarded, as the spec says: it
  may be cut off mid-way. A backend that needs a terminal event (`[DONE]`, `message_end`) notices
  that it never came.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

LIMIT = 1 << 20  # bytes: a longer line, or event data, is refused (a runaway or hostile stream)
_BOM = "\ufeff"


class SseError(ValueError):
    """The stream broke a limit; what came before it was read."""


@dataclass(frozen=True, slots=True)
class SseEvent:
    event: str  # the `event` field; "message" when the event named none
    data: str  # the `data` lines joined with "\n"; "" when there were none
    id: str = ""  # the last event id when it was dispatched
    retry: int | None = None  # the last valid `retry` (milliseconds); nothing here reconnects


class SseParser:
    """Incremental: `feed` bytes as they arrive, get the events they complete."""

    def __init__(self, limit: int = LIMIT) -> None:
        self._limit = limit
        self._partial = b""  # a line not ended yet
        self._skip_lf = False  # the last chunk ended with CR: a LF opening the next one is its CRLF
        self._first = True
        self._event = ""
        self._data: list[str] = []
        self._size = 0
        self._id = ""
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[SseEvent]:
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._skip_lf = False
        if not chunk:
            return []
        # bytes.splitlines splits on exactly CR, LF and CRLF (str.splitlines would split on more).
        lines = (self._partial + chunk).splitlines(keepends=True)
        if lines[-1].endswith((b"\n", b"\r")):
            self._partial = b""
            self._skip_lf = lines[-1].endswith(b"\r")
        else:
            self._partial = lines.pop()
            if len(self._partial) > self._limit:
                raise SseError(f"SSE line longer than {self._limit} bytes")
        events = []
        for raw in lines:
            line = raw.rstrip(b"\r\n")
            if len(line) > self._limit:
                raise SseError(f"SSE line longer than {self._limit} bytes")
            event = self._line(line.decode("utf-8", "replace"))
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> SseEvent | None:
        if self._first:
            self._first = False
            line = line.removeprefix(_BOM)
        if not line:
            return self._dispatch()
        if line[0] == ":":
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._size += len(value) + 1
            if self._size > self._limit:
                raise SseError(f"SSE event data longer than {self._limit} bytes")
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\x00" not in value:
                self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> SseEvent | None:
        if not self._data and not self._event:
            return None
        event = SseEvent(self._event or "message", "\n".join(self._data), self._id, self._retry)
        self._event, self._data, self._size = "", [], 0
        return event


def read_events(chunks: AsyncIterable[bytes], limit: int = LIMIT) -> AsyncIterator[SseEvent]:
    """The events of a byte stream (e.g. `aiohttp.ClientResponse.content.iter_any()`); raises
    `SseError` at a line or event over `limit` bytes."""
    return _Events(chunks.__aiter__(), SseParser(limit))


class _Events:
    """`read_events`' iterator. A class, not an async generator: a backend stops reading at its
    terminal event (`[DONE]`, `message_end`), and an async generator left unfinished is closed by
    the loop's finalizer hook in a task of its own, one per answer; this object just goes away."""

    def __init__(self, chunks: AsyncIterator[bytes], parser: SseParser) -> None:
        self._chunks = chunks
        self._parser = parser
        self._ready: deque[SseEvent] = deque()

    def __aiter__(self) -> _Events:
        return self

    async def __anext__(self) -> SseEvent:
        while not self._ready:
            self._ready.extend(self._parser.feed(await self._chunks.__anext__()))  # StopAsyncIteration at the end
        return self._ready.popleft()
