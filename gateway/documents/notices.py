"""What the user is told when a document gives no text: one notice per failure, a catalog msgid
(English, `N_`) translated per message: `notice(failure, locale=message.locale)` (zh-CN by default,
see docs/chat.md "Languages").

Notices never quote the file's name or the failure's detail (both come from the sender or the file)."""

from __future__ import annotations

from gateway.i18n import N_, Locale, translator

from .results import MIB, ExtractFailure, Failure, Limits

NOTICES: dict[Failure, str] = {
    Failure.TOO_LARGE: N_(
        "The file is too large ({size}): I can read files up to {limit}. Please split it, or paste the part you need."
    ),
    Failure.TIMEOUT: N_(
        "This file took too long to read, so I stopped. Please save the part you need as a smaller file, or paste it."
    ),
    Failure.BOMB: N_(
        "This file unpacks to far more than its size (it looks like a zip bomb), so for safety I did not read it."
    ),
    Failure.UNREADABLE: N_(
        "I couldn't read this file: it may be damaged or malformed. Please export or save it again and resend it."
    ),
    Failure.SCANNED: N_(
        "This PDF has no text layer (it looks scanned), so I can't read its text. "
        "Please send a version with selectable text, or paste the content."
    ),
    Failure.ENCRYPTED: N_(
        "This file is password-protected, so I can't open it. Please remove the password and send it again."
    ),
    Failure.EMPTY: N_("This file is empty: there is no text in it to read."),
    Failure.UNSUPPORTED: N_(
        "I can't read {detected} yet. I can read PDF, Word (.docx), Excel (.xlsx), PowerPoint (.pptx), "
        "TXT, Markdown and CSV files.{hint}"
    ),
}

# What an unsupported file looked like (`ExtractFailure.detected`).
DETECTED: dict[str, str] = {
    "doc": N_("Word 97–2003 documents (.doc)"),
    "xls": N_("Excel 97–2003 workbooks (.xls)"),
    "ppt": N_("PowerPoint 97–2003 presentations (.ppt)"),
    "docm": N_("macro-enabled Word documents or Word templates"),
    "ppsx": N_("PowerPoint shows or templates"),
    "odf": N_("OpenDocument files"),
    "zip": N_("zip archives"),
    "archive": N_("archives"),
    "image": N_("pictures sent as files"),
    "media": N_("audio or video files"),
    "rtf": N_("RTF documents"),
    "ole2": N_("this old Office format"),
    "binary": N_("this kind of file"),
}
# A way out, where there is a plain one (each starts with a space in English: it follows a sentence).
HINTS: dict[str, str] = {
    "doc": N_(" Please save it as .docx in Word and send it again."),
    "xls": N_(" Please save it as .xlsx in Excel and send it again."),
    "ppt": N_(" Please save it as .pptx in PowerPoint and send it again."),
    "docm": N_(" Please save it as a plain .docx and send it again."),
    "ppsx": N_(" Please save it as .pptx and send it again."),
    "odf": N_(" Please save it as .docx, .xlsx or .pptx and send it again."),
    "rtf": N_(" Please save it as .docx or plain text and send it again."),
    "image": N_(" To show me a picture, send it as an image, not as a file."),
}
# Where an extract was cut, in front of the answer (the model gets `Extract.truncated_note`).
TRUNCATED = N_("(The file is long: I read only its first part.)")


def notice(
    failure: ExtractFailure, limits: Limits | None = None, size: int | None = None, locale: Locale | str | None = None
) -> str:
    """The notice for `failure` in `locale` (None: the default, zh-CN). `size` (the file's bytes)
    and `limits` fill in the too-large one."""
    limits = limits or Limits()
    _ = translator(locale)
    label = failure.detected or "binary"
    return _(
        NOTICES[failure.failure],
        size=megabytes(size) if size is not None else "?",
        limit=megabytes(limits.max_bytes),
        detected=_(DETECTED.get(label, DETECTED["binary"])),
        hint=_(HINTS[label]) if label in HINTS else "",
    )


def megabytes(n: int) -> str:
    value = n / MIB
    return f"{value:.0f} MB" if value >= 10 or value.is_integer() else f"{value:.1f} MB"
