"""A model's inline thinking (`<think>…</think>` in the answer text) split off its answer, as the text
streams in; and how the `show` mode marks thinking in a reply.

Servers without a reasoning parser (vLLM, SGLang, llama.cpp, older Ollama, Dify's LLM node) leave
the thinking inline, cut anywhere by the stream (docs/protocols/backends.md §5). The rules:

* A think block counts only at the start: before any visible answer text (whitespace aside), and
  further blocks directly after one. A `<think>` after answer text is the answer's own text (an
  answer about the tag, say), and so is everything after it.
* A `</think>` before any `<think>` makes everything before it thinking: the chat template opened
  the block in the prompt (DeepSeek-R1 distills). Nothing is held back waiting for such a tag, so a
  model that does not think streams at once: until the tag comes, its text counts as answer (a
  stream shows it; the final answer, the context and the cache never hold it). `starts_in_think`
  (for a model seen doing this before) counts it as thinking instead until a tag decides, and as
  the answer when the stream ends without one.
* A tag split across deltas is held back until it is complete (or the stream ends).
* A stream that ends inside a think block was all thinking: its answer is empty.
* Whitespace right after a block is dropped.

`answer` and `reasoning` are the texts so far: whole texts, not increments, because an orphan
`</think>` turns text already counted as answer into thinking.
"""

from __future__ import annotations

from enum import Enum

OPEN, CLOSE = "<think>", "</think>"
_TAIL = len(CLOSE) - 1  # the most of a tag a delta can end with
THINKING = "思考过程 / Thinking"  # heads the thinking in `show` mode and the Feishu card's panel


class _State(Enum):
    START = "start"  # nothing decided yet
    THINK = "think"  # inside a think block
    AFTER = "after"  # right after a block: another may follow
    ANSWER = "answer"  # answer text: no tag means anything any more


def _held(text: str) -> int:
    """How many characters at the end of `text` may begin a tag."""
    for k in range(min(_TAIL, len(text)), 0, -1):
        end = text[-k:]
        if OPEN.startswith(end) or CLOSE.startswith(end):
            return k
    return 0


class ThinkSplitter:
    def __init__(self, starts_in_think: bool = False) -> None:
        self._assume = starts_in_think
        self._state = _State.START
        self._start: list[str] = []  # START: every delta so far, undecided
        self._tail = ""  # START: the last characters seen, where a tag may have begun
        self._buf = ""  # THINK / AFTER: a partial tag held back
        self._answer: list[str] = []
        self._reasoning: list[str] = []
        self.orphan = False  # a `</think>` came without a `<think>`: the model starts in thought

    @property
    def answer(self) -> str:
        if self._state is _State.START:
            return "" if self._assume else self._undecided()
        return "".join(self._answer)

    @property
    def reasoning(self) -> str:
        done = "".join(self._reasoning)
        if self._state is _State.START and self._assume:
            return done + self._undecided()
        return done

    def _undecided(self) -> str:
        text = "".join(self._start)
        held = _held(self._tail)
        return text[: len(text) - held]

    def feed(self, text: str) -> None:
        while text:
            if self._state is _State.START:
                text = self._feed_start(text)
            elif self._state is _State.THINK:
                text = self._feed_think(text)
            elif self._state is _State.AFTER:
                text = self._feed_after(text)
            else:
                self._answer.append(text)
                return

    def end(self) -> None:
        """The stream is over: what was held back goes where it stood."""
        if self._state is _State.START:
            self._answer.append("".join(self._start))  # no tag at all: all of it was answer
            self._start = []
        elif self._state is _State.THINK:
            self._reasoning.append(self._buf)
        else:
            self._answer.append(self._buf)  # AFTER: text that only looked like a tag's start
        self._buf = ""
        self._state = _State.ANSWER

    def _feed_start(self, text: str) -> str:
        window = self._tail + text
        i_open, i_close = window.find(OPEN), window.find(CLOSE)
        if i_open < 0 and i_close < 0:
            self._start.append(text)
            self._tail = window[-_TAIL:]
            return ""
        whole = "".join(self._start) + text
        offset = len(whole) - len(window)
        self._start, self._tail = [], ""
        if i_close >= 0 and (i_open < 0 or i_close < i_open):
            at = offset + i_close
            self.orphan = True
            self._reasoning.append(whole[:at])
            self._state = _State.AFTER
            return whole[at + len(CLOSE) :]
        at = offset + i_open
        if whole[:at].strip():  # after answer text: the tag is the answer's own
            self._state = _State.ANSWER
            return whole
        self._state = _State.THINK
        return whole[at + len(OPEN) :]

    def _feed_think(self, text: str) -> str:
        text = self._buf + text
        i = text.find(CLOSE)
        if i < 0:
            held = _held(text)
            self._reasoning.append(text[: len(text) - held])
            self._buf = text[len(text) - held :]
            return ""
        self._reasoning.append(text[:i])
        self._buf = ""
        self._state = _State.AFTER
        return text[i + len(CLOSE) :]

    def _feed_after(self, text: str) -> str:
        text = (self._buf + text).lstrip()
        self._buf = ""
        if text.startswith(OPEN):
            self._state = _State.THINK
            return text[len(OPEN) :]
        if OPEN.startswith(text):  # "" or a start of "<think>": wait for more
            self._buf = text
            return ""
        self._state = _State.ANSWER
        return text


def shown(reasoning: str, answer: str) -> str:
    """`[model] reasoning = "show"`: the thinking quoted under a heading, then the answer. Built so
    that a longer thinking or answer only extends the text (a stream appends, never rewrites)."""
    thinking = reasoning.strip()
    if not thinking:
        return answer
    quoted = "\n".join(f"> {line}" for line in thinking.split("\n"))
    return f"> **{THINKING}**\n>\n{quoted}\n\n{answer}"
