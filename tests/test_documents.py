"""Documents: type by content, text of every kind, budgets and truncation notes, and the worker's
defences (zip bombs, time and memory limits, size cap) against hostile files.

Every file is made here: Office files with python-docx/openpyxl/python-pptx themselves, PDFs written
by hand (`build_pdf`: a text layer in Helvetica, or Chinese through a ToUnicode map, or only an image).
Most extraction tests call the worker's code in this process (fast); those about isolation, and one
file of each kind, go through `DocumentExtractor`'s worker processes."""

from __future__ import annotations

import asyncio
import functools
import io
import os
import random
import re
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from pypdf import PdfReader, PdfWriter

from gateway.documents import (
    DOCUMENTS,
    DocumentExtractor,
    Extract,
    ExtractFailure,
    Failure,
    Kind,
    Limits,
    Result,
    documents_context,
    notice,
)
from gateway.documents.budget import Budget, cell_text
from gateway.documents.detect import detect
from gateway.documents.extract import extract_document
from gateway.documents.notices import DETECTED, NOTICES
from gateway.documents.results import MIB, Refused
from tests.documents_gen import (
    PHRASES,
    build_pdf,
    cjk_pdf,
    docx_bytes,
    paragraphs_xml,
    pptx_bytes,
    rezip,
    samples,
    text_page,
    xlsx_bytes,
)

SMALL = Limits(max_chars=2_000)


def extracted(data: bytes, name: str, limits: Limits = SMALL) -> Extract:
    result = extract_document(data, name, limits)
    assert isinstance(result, Extract), result
    return result


def failed(data: bytes, name: str, limits: Limits = SMALL) -> ExtractFailure:
    result = extract_document(data, name, limits)
    assert isinstance(result, ExtractFailure), result
    return result


def refusal(data: bytes, limits: Limits = SMALL) -> Refused:
    """What detection refuses `data` for (detection only: a defence that failed must not parse a bomb here)."""
    with pytest.raises(Refused) as refused:
        detect(data, "file.docx", limits)
    return refused.value


@pytest.fixture
async def extractor() -> AsyncIterator[DocumentExtractor]:
    documents = DocumentExtractor(Limits(timeout=10))
    yield documents
    await documents.close()


# -- detection by content ------------------------------------------------------------------------
def test_type_is_detected_by_content_not_by_name() -> None:
    assert detect(docx_bytes(), "report.pdf", SMALL).kind is Kind.DOCX
    assert detect(xlsx_bytes({"s": [["a"]]}), "data.docx", SMALL).kind is Kind.XLSX
    assert detect(pptx_bytes(), "slides", SMALL).kind is Kind.PPTX
    assert detect(build_pdf([text_page("x")]), "scan.xlsx", SMALL).kind is Kind.PDF
    assert detect(b"plain words", "notes.docx", SMALL).kind is Kind.TXT


def test_text_kinds_are_told_apart_by_name_once_content_says_text() -> None:
    assert detect(b"a,b\n1,2\n", "t.CSV", SMALL).kind is Kind.CSV
    assert detect(b"a\tb\n", "t.tsv", SMALL).delimiter == "\t"
    assert detect(b"# Title\n", "readme.md", SMALL).kind is Kind.MD
    assert detect(b"# Title\n", "C:\\Users\\me\\readme.markdown", SMALL).kind is Kind.MD
    assert detect(b"# Title\n", "readme", SMALL).kind is Kind.TXT
    # Text that happens to start like a signature, or to mention one, is still text.
    assert detect(b"ID3,GIF8,title\n1,2,3\n", "tags.csv", SMALL).kind is Kind.CSV
    assert detect(b"A PDF starts with %PDF-1.7 and a comment.\n", "pdf.md", SMALL).kind is Kind.MD
    assert detect(b"junk before the header\n" + build_pdf([text_page("x")]), "x", SMALL).kind is Kind.PDF


def test_text_encodings() -> None:
    phrase = "编码测试 encoding"
    for encoding, expected in [
        ("utf-8", "utf-8-sig"),
        ("utf-8-sig", "utf-8-sig"),
        ("gbk", "gb18030"),
        ("utf-16", "utf-16"),
    ]:
        detection = detect(phrase.encode(encoding), "t.txt", SMALL)
        assert (detection.text or "").removeprefix("\ufeff") == phrase, encoding
        assert detection.encoding == expected


@pytest.mark.parametrize(
    ("data", "failure", "detected"),
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(100), Failure.UNSUPPORTED, "image"),
        (
            b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(50) + "WordDocument".encode("utf-16-le"),
            Failure.UNSUPPORTED,
            "doc",
        ),
        (
            b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(50) + "EncryptedPackage".encode("utf-16-le"),
            Failure.ENCRYPTED,
            None,
        ),
        (b"{\\rtf1\\ansi hello}", Failure.UNSUPPORTED, "rtf"),
        (bytes(range(256)) * 4, Failure.UNSUPPORTED, "binary"),
        (b"text with a NUL\x00 inside", Failure.UNSUPPORTED, "binary"),
        (b"PK\x03\x04 broken zip", Failure.UNREADABLE, "zip"),
        (b"", Failure.EMPTY, None),
    ],
)
def test_what_is_not_a_document(data: bytes, failure: Failure, detected: str | None) -> None:
    refused = refusal(data)
    assert (refused.failure, refused.detected) == (failure, detected)


def test_a_plain_zip_and_opendocument_are_unsupported() -> None:
    plain, odf = io.BytesIO(), io.BytesIO()
    with zipfile.ZipFile(plain, "w") as archive:
        archive.writestr("a.txt", "hi")
    with zipfile.ZipFile(odf, "w") as archive:
        archive.writestr("mimetype", "application/vnd.oasis.opendocument.text")
    assert failed(plain.getvalue(), "a.zip").detected == "zip"
    assert failed(odf.getvalue(), "a.odt").detected == "odf"


# -- text of every kind --------------------------------------------------------------------------
def test_pdf_text_layer() -> None:
    result = extracted(build_pdf([text_page(PHRASES[Kind.PDF], "second line"), text_page("page two")]), "a.pdf")
    assert PHRASES[Kind.PDF] in result.text and "[Page 2]\npage two" in result.text
    assert (result.kind, result.pages_total, result.truncated_note) == (Kind.PDF, 2, None)


def test_pdf_chinese_text() -> None:
    assert "中文的短语" in extracted(cjk_pdf("中文的短语"), "中文.pdf").text


def test_docx_paragraphs_headings_and_tables() -> None:
    result = extracted(docx_bytes(), "a.docx")
    assert PHRASES[Kind.DOCX] in result.text
    assert result.text.startswith("# 季度报告 Quarterly report")
    assert "| 地区 | 金额 \\| CNY |\n|---|---|\n| 华东 | 1200 |" in result.text
    assert result.truncated_note is None


def test_xlsx_sheets_as_markdown_tables() -> None:
    data = xlsx_bytes({"销售": [["产品", "数量"], [PHRASES[Kind.XLSX], 3.0], [None, None], ["b", 2.5]], "空": []})
    result = extracted(data, "a.xlsx")
    assert result.text == f"## Sheet 1: 销售\n\n| 产品 | 数量 |\n|---|---|\n| {PHRASES[Kind.XLSX]} | 3 |\n| b | 2.5 |"
    assert result.pages_total == 2 and result.truncated_note is None


def test_pptx_slides_tables_groups_and_notes() -> None:
    result = extracted(pptx_bytes(), "a.pptx")
    assert result.text.startswith("[Slide 1] Slide title 1\n" + PHRASES[Kind.PPTX])
    for part in ("| Item | Owner |", "| Launch | 林 |", "grouped text", "Notes: speaker notes here"):
        assert part in result.text
    assert result.pages_total == 1


def test_plain_text_markdown_and_gbk_csv() -> None:
    assert extracted(PHRASES[Kind.TXT].encode("utf-8-sig"), "a.txt").text == PHRASES[Kind.TXT]
    markdown = extracted(f"# Notes\n\n- {PHRASES[Kind.MD]}\n".encode(), "notes.md")
    assert markdown.kind is Kind.MD and markdown.text == f"# Notes\n\n- {PHRASES[Kind.MD]}"
    csv_bytes = f"名称;数量\n{PHRASES[Kind.CSV]};7\n苹果;3\n".encode("gbk")  # Excel on Chinese Windows: GBK
    table = extracted(csv_bytes, "库存.csv")
    assert table.kind is Kind.CSV
    assert table.text == f"| 名称 | 数量 |\n|---|---|\n| {PHRASES[Kind.CSV]} | 7 |\n| 苹果 | 3 |"


def test_table_cells_are_markdown_safe() -> None:
    assert cell_text("a|b\nc", 300) == "a\\|b<br>c"
    assert cell_text(2.0, 300) == "2" and cell_text(None, 300) == ""
    assert cell_text("x" * 10, 5) == "xxxx…"


# -- budget and truncation -----------------------------------------------------------------------
def test_budget_cuts_at_a_boundary() -> None:
    budget = Budget(400)
    assert budget.add_partly("first block") == 2
    assert budget.add_partly("second block " + "word " * 100) == 1
    assert budget.full and budget.text().startswith("first block\n\nsecond block word")
    assert budget.text().endswith("word") and 380 <= len(budget.text()) <= 400
    assert budget.add_partly("more") == 0
    nearly = Budget(300)
    nearly.add("x" * 150)
    assert nearly.add_partly("y" * 500) == 0 and nearly.full  # 148 characters of a block: none rather
    first = Budget(50)
    assert first.add_partly("z" * 80) == 1 and first.text() == "z" * 50  # the first block is cut anyway


def test_long_pdf_is_truncated_first_pages_first() -> None:
    pages = [text_page(f"Page {n} text " + "word " * 40) for n in range(1, 41)]
    result = extracted(build_pdf(pages), "long.pdf")
    assert len(result.text) <= SMALL.max_chars
    assert result.text.startswith("[Page 1]\nPage 1 text")
    assert result.truncated_note is not None
    match = re.fullmatch(r"\(truncated: pages 1–(\d+) of 40(?:, and the start of page (\d+))?\)", result.truncated_note)
    assert match, result.truncated_note
    last = int(match[1]) + (1 if match[2] else 0)
    assert match[2] is None or int(match[2]) == last
    assert f"[Page {last}]" in result.text and f"[Page {last + 1}]" not in result.text


def test_page_cap() -> None:
    pages = [text_page(f"p{n}") for n in range(1, 11)]
    result = extracted(build_pdf(pages), "capped.pdf", Limits(max_pages=3))
    assert result.truncated_note == "(truncated: pages 1–3 of 10)"


def test_big_xlsx_is_truncated_sheet_by_sheet() -> None:
    rows = [["id", "名称"]] + [[n, f"行 {n}"] for n in range(1, 400)]
    result = extracted(xlsx_bytes({"一月": rows, "二月": rows, "三月": rows}), "big.xlsx")
    assert len(result.text) <= SMALL.max_chars and result.text.startswith("## Sheet 1: 一月")
    assert result.truncated_note is not None
    assert re.fullmatch(
        r"\(truncated: sheets 1–?\d* of 3; sheet 1 “一月”: first \d+ rows of 400\)", result.truncated_note
    )
    assert result.pages_total == 3


def test_row_and_column_caps() -> None:
    limits = Limits(max_rows=10, max_columns=3)
    result = extracted(xlsx_bytes({"wide": [[f"c{n}" for n in range(6)]] * 50}), "wide.xlsx", limits)
    assert result.text.splitlines()[2] == "| c0 | c1 | c2 |"
    assert (
        result.truncated_note
        == "(truncated: sheet 1 “wide”: first 10 rows of 50; sheet 1 “wide”: first 3 columns of 6)"
    )
    csv_result = extracted(("a,b\n" + "1,2\n" * 30).encode(), "t.csv", limits)
    assert csv_result.truncated_note == "(truncated: the first 10 of 31 rows)"


def test_long_docx_and_text_notes() -> None:
    result = extracted(docx_bytes(paragraphs=100), "long.docx")
    assert result.truncated_note is not None
    assert re.fullmatch(r"\(truncated: the first [\d,]+ characters of about [\d,]+\)", result.truncated_note)
    text = extracted(("这是一行中文。\n" * 1000).encode(), "long.txt")
    assert text.truncated_note == f"(truncated: the first {len(text.text):,} of 7,999 characters)"
    assert text.for_model().endswith("\n\n" + text.truncated_note)


def test_long_pptx_note() -> None:
    result = extracted(pptx_bytes(slides=30), "deck.pptx", Limits(max_chars=1_000))
    assert result.truncated_note is not None and re.fullmatch(
        r"\(truncated: slides 1–\d+ of 30(, and the start of slide \d+)?\)", result.truncated_note
    )


# -- what has no text ----------------------------------------------------------------------------
def test_scanned_pdf_says_so() -> None:
    result = failed(build_pdf([b"q 612 0 0 792 0 0 cm /Im1 Do Q"] * 3, image=True), "scan.pdf")
    assert (result.failure, result.kind) == (Failure.SCANNED, Kind.PDF)
    assert "no text layer" in result.detail


def test_password_protected_pdf() -> None:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(build_pdf([text_page("secret")]))))
    writer.encrypt("s3cret", algorithm="AES-128")
    out = io.BytesIO()
    writer.write(out)
    assert failed(out.getvalue(), "locked.pdf").failure is Failure.ENCRYPTED


def test_documents_without_text_are_empty() -> None:
    assert failed(b"  \n\n ", "blank.txt").failure is Failure.EMPTY
    assert failed(xlsx_bytes({"empty": []}), "blank.xlsx").failure is Failure.EMPTY


# -- zip bombs (checked from the zip's directory, before any parser) ------------------------------
@pytest.fixture(scope="module")
def bomb_docx() -> bytes:
    """A DOCX whose document.xml is ~60 MiB of paragraphs in ~0.2 MiB: ratio ~300."""
    return rezip(docx_bytes(), {"word/document.xml": paragraphs_xml(1_800_000)})


def test_compression_ratio_bomb(bomb_docx: bytes) -> None:
    result = refusal(bomb_docx)
    assert result.failure is Failure.BOMB and "word/document.xml" in result.detail


def test_total_size_and_member_count_caps() -> None:
    noise = random.Random(16).randbytes(2 * MIB)  # incompressible
    big = rezip(docx_bytes(), {"word/media/noise.bin": noise})
    assert refusal(big, Limits(max_unzipped=1 * MIB)).failure is Failure.BOMB
    assert detect(big, "big.docx", SMALL).kind is Kind.DOCX
    many = rezip(docx_bytes(), add=300)
    result = refusal(many, Limits(max_members=200))
    assert result.failure is Failure.BOMB and "zip members" in result.detail


def test_xml_entity_bomb_is_unreadable() -> None:
    """Billion laughs inside document.xml: the XML parser's own amplification limit stops it."""
    entities = '<!ENTITY l0 "lol">' + "".join(f'<!ENTITY l{n} "{f"&l{n - 1};" * 10}">' for n in range(1, 10))
    document = zipfile.ZipFile(io.BytesIO(docx_bytes())).read("word/document.xml").decode()
    declaration, body = document.split("?>", 1)
    laughs = f"{declaration}?><!DOCTYPE w:document [{entities}]>{body.replace('docx phrase', '&l9;')}"
    result = failed(rezip(docx_bytes(), {"word/document.xml": laughs.encode()}), "laughs.docx")
    assert (result.failure, result.kind) == (Failure.UNREADABLE, Kind.DOCX) and "amplification" in result.detail


async def test_zip_bomb_through_the_worker_is_quick(bomb_docx: bytes, extractor: DocumentExtractor) -> None:
    started = time.monotonic()
    result = await extractor.extract(bomb_docx, "bomb.docx")
    assert isinstance(result, ExtractFailure) and result.failure is Failure.BOMB
    assert time.monotonic() - started < extractor.limits.timeout


# -- the worker pool -----------------------------------------------------------------------------
async def test_every_kind_through_worker_processes(extractor: DocumentExtractor) -> None:
    files = samples()
    results = await asyncio.gather(*(extractor.extract(data, name) for name, data in files.values()))
    for kind, result in zip(files, results, strict=True):
        assert isinstance(result, Extract), result
        assert result.kind is kind and PHRASES[kind] in result.text
    assert extractor.counts.started == len(files) and extractor.running == 0


@functools.cache
def spinning_pdf(pages: int = 5) -> bytes:
    """Millions of text operators per page: tiny compressed, seconds of parsing per page."""
    return build_pdf([b"BT /F1 1 Tf " + b"(a) Tj " * 1_500_000 + b"ET"] * pages, compress=True)


async def test_a_file_that_spins_times_out_and_the_next_one_is_read() -> None:
    extractor = DocumentExtractor(Limits(timeout=3))
    try:
        started = time.monotonic()
        result = await extractor.extract(spinning_pdf(), "spin.pdf")
        assert isinstance(result, ExtractFailure) and result.failure is Failure.TIMEOUT, result
        assert time.monotonic() - started < 3 + 5  # killed at the limit, not run to its end
        assert extractor.running == 0 and extractor.counts.timeouts == 1
        after = await extractor.extract(b"still here", "next.txt")
        assert isinstance(after, Extract) and after.text == "still here"
    finally:
        await extractor.close()


async def test_a_file_that_allocates_hits_the_memory_limit_and_the_next_one_is_read() -> None:
    # A content stream that inflates to 70 MB: within pypdf's own caps, over this worker's address space.
    hungry = build_pdf([b"BT /F1 1 Tf (x) Tj ET" + b" " * 70_000_000], compress=True)
    extractor = DocumentExtractor(Limits(memory=150 * MIB, timeout=20))
    try:
        result = await extractor.extract(hungry, "hungry.pdf")
        assert isinstance(result, ExtractFailure) and result.failure is Failure.UNREADABLE, result
        after = await extractor.extract(build_pdf([text_page(PHRASES[Kind.PDF])]), "next.pdf")
        assert isinstance(after, Extract) and PHRASES[Kind.PDF] in after.text
    finally:
        await extractor.close()


async def until_confined(pid: int, within: float = 10.0) -> None:
    """Yield to the loop until worker `pid` has applied its limits (its niceness, set last, is up)."""
    deadline = time.monotonic() + within
    while os.getpriority(os.PRIO_PROCESS, pid) < os.getpriority(os.PRIO_PROCESS, 0) + 10:
        assert time.monotonic() < deadline, "the worker never confined itself"
        await asyncio.sleep(0)


@pytest.mark.parametrize(
    ("sent", "failure", "detail"),
    [
        (signal.SIGTERM, Failure.UNREADABLE, "worker died (exit code -15)"),
        (signal.SIGXCPU, Failure.TIMEOUT, "CPU time"),
    ],
    ids=["killed", "cpu-limit"],
)
async def test_a_worker_that_dies_is_reported_and_the_next_one_is_read(
    extractor: DocumentExtractor, sent: signal.Signals, failure: Failure, detail: str
) -> None:
    """A worker ended from outside (as a crash would end it), and one stopped by its CPU limit's signal."""
    task = asyncio.create_task(extractor.extract(spinning_pdf(1), "spin.pdf"))
    await until_running(extractor)
    pid = extractor.pids[0]
    await until_confined(pid)  # past its limits: RLIMIT_CORE 0, so SIGXCPU leaves no core file
    os.kill(pid, sent)
    result = await task
    assert isinstance(result, ExtractFailure) and result.failure is failure and detail in result.detail, result
    after = await extractor.extract(b"next", "next.txt")
    assert isinstance(after, Extract) and after.text == "next"


async def test_oversize_is_refused_without_a_worker() -> None:
    extractor = DocumentExtractor(Limits(max_bytes=1_000))
    result = await extractor.extract(b"x" * 1_001, "big.txt")
    assert isinstance(result, ExtractFailure) and result.failure is Failure.TOO_LARGE
    assert extractor.counts.started == 0 and extractor.counts.refused_size == 1
    await extractor.close()


async def until_running(extractor: DocumentExtractor, within: float = 10.0) -> None:
    """Yield to the loop until a worker process is up (no sleeping: each turn is a bare yield)."""
    deadline = time.monotonic() + within
    while not extractor.running:
        assert time.monotonic() < deadline, "no worker started"
        await asyncio.sleep(0)


async def test_cancelling_kills_the_worker(extractor: DocumentExtractor) -> None:
    task = asyncio.create_task(extractor.extract(spinning_pdf(1), "spin.pdf"))
    await until_running(extractor)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert extractor.running == 0


async def test_close_ends_running_workers() -> None:
    extractor = DocumentExtractor(Limits(timeout=30))
    task = asyncio.create_task(extractor.extract(spinning_pdf(1), "spin.pdf"))
    await until_running(extractor)
    await extractor.close()
    result = await task
    assert isinstance(result, ExtractFailure) and result.failure is Failure.UNREADABLE
    assert result.detail == "shutting down"


async def test_cleanup_context() -> None:
    app = web.Application()
    app.cleanup_ctx.append(documents_context(Limits(workers=1)))
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        result: Result = await app[DOCUMENTS].extract(b"via app", "a.txt")
        assert isinstance(result, Extract) and result.text == "via app"
    finally:
        await runner.cleanup()
    assert app[DOCUMENTS].running == 0


def test_the_gateway_process_loads_no_parser_and_the_worker_no_asyncio() -> None:
    probe = (
        "import sys, gateway.documents, gateway.documents.worker;"
        "gateway.documents.DocumentExtractor;"
        "print(sorted(m for m in ('pypdf', 'docx', 'openpyxl', 'pptx', 'lxml') if m in sys.modules))"
    )
    root = Path(__file__).resolve().parents[1]
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=root)
    assert loaded.stdout == "[]\n"
    worker = "import sys, gateway.documents.worker; print('asyncio' in sys.modules, 'aiohttp' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", worker], capture_output=True, text=True, check=True, cwd=root)
    assert loaded.stdout == "False False\n"


# -- notices -------------------------------------------------------------------------------------
def test_every_failure_has_a_notice_in_both_languages() -> None:
    assert set(NOTICES) == set(Failure)
    for failure in Failure:
        for detected in [None, *DETECTED]:
            refused = ExtractFailure(failure, "x", "detail", detected=detected)
            zh, en = notice(refused, size=25 * MIB), notice(refused, size=25 * MIB, locale="en")
            assert re.search(r"[\u4e00-\u9fff]", zh) and not re.search(r"[\u4e00-\u9fff]", en), (zh, en)
            assert "{" not in zh + en and "detail" not in zh + en
    too_large = ExtractFailure(Failure.TOO_LARGE, "x", "")
    assert notice(too_large, size=25 * MIB, locale="zh-CN") == (
        "文件太大了（25 MB），我最多能读 20 MB 的文件。可以拆分后再发，或者直接粘贴需要的部分。"
    )
    assert notice(too_large, Limits(max_bytes=5 * MIB), size=int(7.5 * MIB), locale="en").startswith(
        "The file is too large (7.5 MB): I can read files up to 5 MB."
    )
    assert ".docx" in notice(ExtractFailure(Failure.UNSUPPORTED, "x", "", detected="doc"))
