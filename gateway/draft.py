"""An answer as a backend's deltas arrive: its text (inline thinking split off), its thinking, and
the images, files and sources a backend reports beside the text (Dify's message_file, retriever_resources).
"""

from __future__ import annotations

from .backends import Delta, DeltaKind, Source
from .reasoning import ThinkSplitter

SOURCES = "来源 / Sources"
IMAGE = "图片 / Image"  # an image's alt text: the link text where the sanitizer makes it a link
MAX_SOURCES = 5  # a short list: the documents that matched best (backends list them best first)


class Draft:
    def __init__(self, starts_in_think: bool = False) -> None:
        self._splitter = ThinkSplitter(starts_in_think)
        self._thinking: list[str] = []  # from deltas of its own, and from replaced answers
        self._images: list[str] = []
        self._files: list[tuple[str, str]] = []  # (file name, URL) of the generated files
        self._sources: list[Source] = []

    @property
    def orphan(self) -> bool:
        """The thinking ended with a `</think>` it never opened (`ThinkSplitter.orphan`)."""
        return self._splitter.orphan

    def add(self, delta: Delta) -> None:
        kind = delta.kind
        if kind is DeltaKind.ANSWER:
            self._splitter.feed(delta.text)
        elif kind is DeltaKind.REASONING:
            self._thinking.append(delta.text)
        elif kind is DeltaKind.REPLACE:
            self._thinking.append(self._splitter.reasoning)
            self._splitter = ThinkSplitter()
            self._splitter.feed(delta.text)
        elif kind is DeltaKind.IMAGE:
            self._images.append(delta.text)
        elif kind is DeltaKind.FILE:
            if (delta.name, delta.text) not in self._files:
                self._files.append((delta.name, delta.text))
        else:
            for source in delta.sources:
                if source not in self._sources:
                    self._sources.append(source)

    def end(self) -> None:
        self._splitter.end()

    @property
    def reasoning(self) -> str:
        return "".join(self._thinking) + self._splitter.reasoning

    @property
    def files(self) -> list[tuple[str, str]]:
        """The generated files (FILE deltas) as (file name, URL): `gateway.images_out` sends them."""
        return list(self._files)

    @property
    def answer(self) -> str:
        """The answer as the user gets it and the context keeps it: the text, each image (a link
        unless `[content] image_hosts` allows it, `gateway.sanitize`), then a numbered list of at
        most `MAX_SOURCES` sources, each a link where the backend gave a URL."""
        text = self._splitter.answer
        if not self._images and not self._files and not self._sources:
            return text
        extras = [f"![{IMAGE}]({_url(url)})" for url in self._images]
        extras += [f"[{_title(name)}]({_url(url)})" for name, url in self._files]  # a link; sent as a file too
        if self._sources:
            items = (_source(s) for s in self._sources[:MAX_SOURCES])
            extras.append(f"{SOURCES}:\n" + "\n".join(f"{i}. {item}" for i, item in enumerate(items, 1)))
        return "\n\n".join([text.rstrip(), *extras]) if text.strip() else "\n\n".join(extras)


def _url(url: str) -> str:
    """A URL that cannot end its markdown link early (a space or a parenthesis in it)."""
    return url.replace(" ", "%20").replace("(", "%28").replace(")", "%29")


def _source(source: Source) -> str:
    # One line, and brackets that cannot close a link's text: a title is a document's name.
    title = _title(source.title)
    return f"[{title}]({_url(source.url)})" if source.url else title


def _title(title: str) -> str:
    return " ".join(title.split()).replace("[", "(").replace("]", ")")
