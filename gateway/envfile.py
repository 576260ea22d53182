"""Read an environment file the way systemd's `EnvironmentFile=` does (`run.py --env-file`).

Sourcing the file with a shell instead (`set -a; . /etc/botgate/env`) gives a different environment
than the service gets: the shell splits `PASSWORD=a long passphrase` at the spaces (and runs `long`
as a command), and runs whatever follows `&&`, `;` or a backtick in a secret. systemd reads values
literally. This parser follows systemd's (src/basic/env-file.c, documented in systemd.exec(5),
"EnvironmentFile="), so `--check-config --env-file /etc/botgate/env` checks what the service will see:

- `KEY=value`, one per line; empty lines, lines starting with `#` or `;`, and lines without `=` are
  skipped; whitespace around the key and around an unquoted value is dropped, inside it kept;
- unquoted: a backslash keeps the next character (`\\` is one backslash), a backslash at the end of
  a line joins the next line; quotes after the first character are kept as they are;
- `'...'`: everything verbatim up to the next `'`, newlines included;
- `"..."`: as in a shell's double quotes, `\\"`, `\\\\`, `` \\` `` and `\\$` are unescaped, any other
  backslash is kept, a backslash before a newline joins the lines;
- nothing is expanded (`$HOME` stays `$HOME`) and nothing is executed;
- a name that is not a valid variable name (letters, digits, `_`, not starting with a digit) is
  dropped, as systemd drops it; a later line wins over an earlier one.
"""

from __future__ import annotations

import re
from enum import Enum, auto
from pathlib import Path

WHITESPACE = " \t\n\r"
NEWLINE = "\n\r"
COMMENTS = "#;"
DOUBLE_QUOTE_ESCAPES = '"\\`$'
VALID_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class EnvFileError(Exception):
    """The file cannot be read (the message names it)."""


class _State(Enum):
    PRE_KEY = auto()
    KEY = auto()
    PRE_VALUE = auto()
    VALUE = auto()
    VALUE_ESCAPE = auto()
    SINGLE_QUOTED = auto()
    DOUBLE_QUOTED = auto()
    DOUBLE_QUOTED_ESCAPE = auto()
    COMMENT = auto()
    COMMENT_ESCAPE = auto()


def parse(text: str) -> dict[str, str]:
    """The assignments in `text`, in systemd's reading (see the module docstring)."""
    out: dict[str, str] = {}
    state = _State.PRE_KEY
    key: list[str] = []
    value: list[str] = []
    # Where trailing whitespace of an unquoted value starts (None: not in trailing whitespace).
    trailing: int | None = None

    def push(strip_trailing: bool) -> None:
        name = "".join(key).rstrip(WHITESPACE)
        text = "".join(value[:trailing] if strip_trailing and trailing is not None else value)
        if VALID_NAME.fullmatch(name):
            out[name] = text

    for c in text:
        if state is _State.PRE_KEY:
            if c in COMMENTS:
                state = _State.COMMENT
            elif c not in WHITESPACE:
                state, key, value = _State.KEY, [c], []
        elif state is _State.KEY:
            if c in NEWLINE:  # a line without "=": ignored
                state = _State.PRE_KEY
            elif c == "=":
                state, trailing = _State.PRE_VALUE, None
            else:
                key.append(c)
        elif state is _State.PRE_VALUE:
            if c in NEWLINE:
                push(strip_trailing=False)
                state = _State.PRE_KEY
            elif c == "'":
                state = _State.SINGLE_QUOTED
            elif c == '"':
                state = _State.DOUBLE_QUOTED
            elif c == "\\":
                state = _State.VALUE_ESCAPE
            elif c not in WHITESPACE:
                state = _State.VALUE
                value.append(c)
        elif state is _State.VALUE:
            if c in NEWLINE:
                push(strip_trailing=True)
                state = _State.PRE_KEY
            elif c == "\\":
                state, trailing = _State.VALUE_ESCAPE, None
            else:
                if c not in WHITESPACE:
                    trailing = None
                elif trailing is None:
                    trailing = len(value)
                value.append(c)
        elif state is _State.VALUE_ESCAPE:
            state = _State.VALUE
            if c not in NEWLINE:  # an escaped newline joins the lines
                value.append(c)
        elif state is _State.SINGLE_QUOTED:
            if c == "'":
                state = _State.PRE_VALUE
            else:
                value.append(c)
        elif state is _State.DOUBLE_QUOTED:
            if c == '"':
                state = _State.PRE_VALUE
            elif c == "\\":
                state = _State.DOUBLE_QUOTED_ESCAPE
            else:
                value.append(c)
        elif state is _State.DOUBLE_QUOTED_ESCAPE:
            state = _State.DOUBLE_QUOTED
            if c in DOUBLE_QUOTE_ESCAPES:
                value.append(c)
            elif c != "\n":
                value.extend(("\\", c))
        elif state is _State.COMMENT:
            if c == "\\":
                state = _State.COMMENT_ESCAPE
            elif c in NEWLINE:
                state = _State.PRE_KEY
        else:  # COMMENT_ESCAPE: the escaped character is part of the comment
            state = _State.PRE_KEY if c in NEWLINE else _State.COMMENT
    if state not in (_State.PRE_KEY, _State.KEY, _State.COMMENT, _State.COMMENT_ESCAPE):
        push(strip_trailing=state is _State.VALUE)
    return out


def read(path: str | Path) -> dict[str, str]:
    """The assignments in the file at `path`; `EnvFileError` naming it when it cannot be read."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise EnvFileError(f"env file {path}: cannot read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EnvFileError(f"env file {path}: not UTF-8 (byte {e.start})") from None
    return parse(text)
