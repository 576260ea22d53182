"""The backend used when no model is configured, so a fresh install answers end to end."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

from ..i18n import N_, translator
from .base import BackendRequest, Completion, Delta, DeltaKind

# The echo's answer, after the quoted question.
NO_MODEL = N_(
    "(echo: no model is configured; set `[model] base_url` or `BOTGATE_MODEL__BASE_URL` "
    "to an OpenAI-compatible endpoint)"
)
EMPTY = N_("(empty)")  # the quote of an empty question


class EchoBackend:
    name = "echo"
    keeps_history = False

    async def stream(self, request: BackendRequest, completion: Completion) -> AsyncGenerator[Delta, None]:
        completion.model = "echo"
        completion.requested_at = completion.first_byte_at = time.monotonic()
        last = request.messages[-1]["content"] if request.messages else ""
        if isinstance(last, list):  # vision content parts
            last = " ".join(p.get("text", "") for p in last if p.get("type") == "text")
        t = translator(request.locale)
        quoted = "\n".join(f"> {line}" for line in str(last).splitlines()) or f"> {t(EMPTY)}"
        yield Delta(DeltaKind.ANSWER, f"{quoted}\n\n{t(NO_MODEL)}")
        completion.last_byte_at = time.monotonic()

    async def probe(self) -> str:
        return "echoes every question (no model configured)"

    async def stop(self, completion: Completion) -> None:
        return None
