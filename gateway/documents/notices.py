"""What the user is told when a document gives no text: one notice per failure, each a (zh-CN,
English) pair. `notice(failure)` gives both as the gateway's other notices do ("中文 / English"),
`notice(failure, language="en")` one of them. Proposals: the lead owns the final wording (the English
halves are ready to be catalog msgids).

Notices never quote the file's name or the failure's detail (both come from the sender or the file)."""

from __future__ import annotations

from .results import MIB, ExtractFailure, Failure, Limits

SUPPORTED_ZH = "PDF、Word（.docx）、Excel（.xlsx）、PowerPoint（.pptx）、TXT、Markdown 和 CSV"
SUPPORTED_EN = "PDF, Word (.docx), Excel (.xlsx), PowerPoint (.pptx), TXT, Markdown and CSV"

NOTICES: dict[Failure, tuple[str, str]] = {
    Failure.TOO_LARGE: (
        "文件太大了（{size}），我最多能读 {limit} 的文件。可以拆分后再发，或者直接粘贴需要的部分。",
        "The file is too large ({size}): I can read files up to {limit}. Please split it, or paste the part you need.",
    ),
    Failure.TIMEOUT: (
        "这个文件太复杂，我没能在规定时间内读完。可以把需要的部分另存为新文件，或者直接粘贴过来。",
        "This file took too long to read, so I stopped. Please save the part you need as a smaller file, or paste it.",
    ),
    Failure.BOMB: (
        "这个文件解压后异常巨大（像是“压缩炸弹”），为了安全我没有读取。",
        "This file unpacks to far more than its size (it looks like a zip bomb), so for safety I did not read it.",
    ),
    Failure.UNREADABLE: (
        "这个文件读不出来，可能已损坏或格式不规范。可以重新导出或另存一份再发。",
        "I couldn't read this file: it may be damaged or malformed. Please export or save it again and resend it.",
    ),
    Failure.SCANNED: (
        "这个 PDF 没有文字层（看起来是扫描件或图片），我读不到其中的文字。请发送可以复制文字的版本，或者直接粘贴内容。",
        "This PDF has no text layer (it looks scanned), so I can't read its text. "
        "Please send a version with selectable text, or paste the content.",
    ),
    Failure.ENCRYPTED: (
        "这个文件设置了密码，我打不开。请取消密码后再发送。",
        "This file is password-protected, so I can't open it. Please remove the password and send it again.",
    ),
    Failure.EMPTY: ("这个文件是空的，里面没有可读的文字。", "This file is empty: there is no text in it to read."),
    Failure.UNSUPPORTED: (
        "暂时读不了{detected}。我能读 " + SUPPORTED_ZH + " 文件。{hint}",
        "I can't read {detected} yet. I can read " + SUPPORTED_EN + " files.{hint}",
    ),
}

# What an unsupported file looked like (`ExtractFailure.detected`): (zh-CN, English).
DETECTED: dict[str, tuple[str, str]] = {
    "doc": ("Word 97–2003 文档（.doc）", "Word 97–2003 documents (.doc)"),
    "xls": ("Excel 97–2003 工作簿（.xls）", "Excel 97–2003 workbooks (.xls)"),
    "ppt": ("PowerPoint 97–2003 演示文稿（.ppt）", "PowerPoint 97–2003 presentations (.ppt)"),
    "docm": ("带宏的 Word 文档或 Word 模板", "macro-enabled Word documents or Word templates"),
    "ppsx": ("PowerPoint 放映文件或模板", "PowerPoint shows or templates"),
    "odf": ("OpenDocument 文件", "OpenDocument files"),
    "zip": ("压缩包", "zip archives"),
    "archive": ("压缩包", "archives"),
    "image": ("以文件发送的图片", "pictures sent as files"),
    "media": ("音频或视频文件", "audio or video files"),
    "rtf": ("RTF 文档", "RTF documents"),
    "ole2": ("这种旧版 Office 文件", "this old Office format"),
    "binary": ("这种文件", "this kind of file"),
}
# A way out, where there is a plain one: (zh-CN, English).
HINTS: dict[str, tuple[str, str]] = {
    "doc": ("请在 Word 中另存为 .docx 后再发。", " Please save it as .docx in Word and send it again."),
    "xls": ("请在 Excel 中另存为 .xlsx 后再发。", " Please save it as .xlsx in Excel and send it again."),
    "ppt": ("请在 PowerPoint 中另存为 .pptx 后再发。", " Please save it as .pptx in PowerPoint and send it again."),
    "docm": ("请另存为普通的 .docx 后再发。", " Please save it as a plain .docx and send it again."),
    "ppsx": ("请另存为 .pptx 后再发。", " Please save it as .pptx and send it again."),
    "odf": ("请另存为 .docx、.xlsx 或 .pptx 后再发。", " Please save it as .docx, .xlsx or .pptx and send it again."),
    "rtf": ("请另存为 .docx 或纯文本后再发。", " Please save it as .docx or plain text and send it again."),
    "image": ("想让我看图片的话，请直接以图片发送。", " To show me a picture, send it as an image, not as a file."),
}
# Where an extract was cut, if the user is to be told too (the model gets `Extract.truncated_note`).
TRUNCATED = ("（文件较长，我只读了开头的一部分。）", "(The file is long: I read only its first part.)")
LANGUAGES = ("zh-CN", "en")


def notice(
    failure: ExtractFailure, limits: Limits | None = None, size: int | None = None, language: str | None = None
) -> str:
    """The notice for `failure`: in `language` ("zh-CN" or "en"), or both ("中文 / English") if None.
    `size` (the file's bytes) and `limits` fill in the too-large one."""
    limits = limits or Limits()
    label = failure.detected or "binary"
    texts = []
    for index, template in enumerate(NOTICES[failure.failure]):
        detected = DETECTED.get(label, DETECTED["binary"])[index]
        hint = HINTS.get(label, ("", ""))[index]
        size_text = megabytes(size) if size is not None else "?"
        texts.append(template.format(size=size_text, limit=megabytes(limits.max_bytes), detected=detected, hint=hint))
    if language is None:
        return " / ".join(texts)
    return texts[LANGUAGES.index(language)] if language in LANGUAGES else texts[0]


def megabytes(n: int) -> str:
    value = n / MIB
    return f"{value:.0f} MB" if value >= 10 or value.is_integer() else f"{value:.1f} MB"
