"""Documents of every kind, made here for the tests (no fixtures on disk): Office files with
python-docx/openpyxl/python-pptx themselves, PDFs written by hand (`build_pdf`: a text layer in
Helvetica, or Chinese through a ToUnicode map, or only an image), zip surgery for bombs.
Shared by the extraction tests and the chat tests."""

from __future__ import annotations

import io
import zipfile
import zlib
from collections.abc import Sequence

import docx
import openpyxl
import pptx
from pptx.util import Inches

from gateway.documents import Kind

PHRASES = {
    Kind.PDF: "pdf phrase quartz falcon",
    Kind.DOCX: "docx phrase 青色的长颈鹿",
    Kind.XLSX: "xlsx phrase 紫色的河马",
    Kind.PPTX: "pptx phrase amber heron",
    Kind.TXT: "txt phrase 橙色的企鹅",
    Kind.MD: "md phrase silver otter",
    Kind.CSV: "csv phrase 绿色的熊猫",
}


# -- files ---------------------------------------------------------------------------------------
def docx_bytes(phrase: str = PHRASES[Kind.DOCX], paragraphs: int = 0) -> bytes:
    document = docx.Document()
    document.add_heading("季度报告 Quarterly report", level=1)
    document.add_paragraph(phrase)
    table = document.add_table(rows=2, cols=2)
    for (row, col), text in {(0, 0): "地区", (0, 1): "金额 | CNY", (1, 0): "华东", (1, 1): "1200"}.items():
        table.cell(row, col).text = text
    for n in range(paragraphs):
        document.add_paragraph(f"Paragraph {n}: " + "lorem ipsum " * 10)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def xlsx_bytes(sheets: dict[str, Sequence[Sequence[object]]]) -> bytes:
    workbook = openpyxl.Workbook()
    workbook.remove(workbook.active)
    for title, rows in sheets.items():
        sheet = workbook.create_sheet(title)
        for row in rows:
            sheet.append(list(row))
    out = io.BytesIO()
    workbook.save(out)
    return out.getvalue()


def pptx_bytes(phrase: str = PHRASES[Kind.PPTX], slides: int = 1) -> bytes:
    presentation = pptx.Presentation()
    for n in range(slides):
        slide = presentation.slides.add_slide(presentation.slide_layouts[5])  # title only
        assert slide.shapes.title is not None
        slide.shapes.title.text = f"Slide title {n + 1}"
        box = slide.shapes.add_textbox(Inches(1), Inches(2), Inches(6), Inches(1))
        box.text_frame.text = phrase if n == 0 else f"Body of slide {n + 1} " + "words " * 20
        if n == 0:
            rows = slide.shapes.add_table(2, 2, Inches(1), Inches(3), Inches(4), Inches(1)).table
            rows.cell(0, 0).text, rows.cell(0, 1).text = "Item", "Owner"
            rows.cell(1, 0).text, rows.cell(1, 1).text = "Launch", "林"
            group = slide.shapes.add_group_shape()
            group.shapes.add_textbox(Inches(1), Inches(5), Inches(2), Inches(1)).text_frame.text = "grouped text"
            slide.notes_slide.notes_text_frame.text = "speaker notes here"
    out = io.BytesIO()
    presentation.save(out)
    return out.getvalue()


def pdf_escape(text: str) -> bytes:
    return text.encode("latin-1").replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")


def text_page(*lines: str) -> bytes:
    ops = [b"BT /F1 12 Tf 72 720 Td 14 TL"] + [b"(" + pdf_escape(line) + b") '" for line in lines] + [b"ET"]
    return b"\n".join(ops)


def to_unicode_cmap(chars: str) -> bytes:
    """A ToUnicode CMap mapping glyph ids 1, 2, ... to `chars`: what makes a CID font's text extractable."""
    entries = "\n".join(f"<{n + 1:04X}> <{ord(char):04X}>" for n, char in enumerate(chars))
    return (
        "/CIDInit /ProcSet findresource begin 12 dict begin begincmap\n"
        "/CIDSystemInfo << /Registry (Adobe) /Ordering (UCS) /Supplement 0 >> def\n"
        "/CMapName /Adobe-Identity-UCS def /CMapType 2 def\n"
        f"1 begincodespacerange\n<0000> <FFFF>\nendcodespacerange\n{len(chars)} beginbfchar\n{entries}\nendbfchar\n"
        "endcmap CMapName currentdict /CMap defineresource pop end end"
    ).encode()


def build_pdf(pages: Sequence[bytes], *, cjk: str = "", image: bool = False, compress: bool = False) -> bytes:
    """A valid PDF (with its xref table) whose pages have the given content streams.

    The font is Helvetica, or with `cjk` a Type0 font whose glyph ids 1, 2, ... map to those characters;
    `image` gives every page an 8×8 grey image `/Im1`."""
    objects: dict[int, bytes] = {}
    streams: dict[int, tuple[bytes, bytes]] = {}  # number -> (extra dictionary entries, data)
    kids = " ".join(f"{10 + 2 * n} 0 R" for n in range(len(pages)))
    objects[1] = b"<< /Type /Catalog /Pages 2 0 R >>"
    objects[2] = f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode()
    if cjk:
        objects[3] = (
            b"<< /Type /Font /Subtype /Type0 /BaseFont /STSong-Light /Encoding /Identity-H"
            b" /DescendantFonts [4 0 R] /ToUnicode 5 0 R >>"
        )
        objects[4] = (
            b"<< /Type /Font /Subtype /CIDFontType2 /BaseFont /STSong-Light"
            b" /CIDSystemInfo << /Registry (Adobe) /Ordering (Identity) /Supplement 0 >> >>"
        )
        streams[5] = (b"", to_unicode_cmap(cjk))
    else:
        objects[3] = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"
    resources = b"/Font << /F1 3 0 R >>"
    if image:
        resources += b" /XObject << /Im1 6 0 R >>"
        image_dict = b"/Type /XObject /Subtype /Image /Width 8 /Height 8 /ColorSpace /DeviceGray /BitsPerComponent 8"
        streams[6] = (image_dict, bytes([128]) * 64)
    for n, content in enumerate(pages):
        objects[10 + 2 * n] = (
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << "
            + resources
            + f" >> /Contents {11 + 2 * n} 0 R >>".encode()
        )
        streams[11 + 2 * n] = (b"", content)
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets: dict[int, int] = {}
    for number in sorted(objects.keys() | streams.keys()):
        offsets[number] = len(out)
        out += f"{number} 0 obj\n".encode()
        if number in streams:
            entries, data = streams[number]
            if compress:
                data, entries = zlib.compress(data), entries + b" /Filter /FlateDecode"
            out += b"<< " + entries + f" /Length {len(data)} >>\nstream\n".encode() + data + b"\nendstream"
        else:
            out += objects[number]
        out += b"\nendobj\n"
    size = max(offsets) + 1
    xref = len(out)
    out += f"xref\n0 {size}\n0000000000 65535 f \n".encode()
    for number in range(1, size):
        out += f"{offsets[number]:010d} 00000 n \n".encode() if number in offsets else b"0000000000 65535 f \n"
    out += f"trailer\n<< /Size {size} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def cjk_pdf(text: str) -> bytes:
    glyphs = "".join(f"{n + 1:04X}" for n in range(len(text)))
    return build_pdf([f"BT /F1 12 Tf 72 720 Td <{glyphs}> Tj ET".encode()], cjk=text, compress=True)


def rezip(data: bytes, replace: dict[str, bytes] | None = None, add: int = 0) -> bytes:
    """`data` (a zip) with members replaced or added, and `add` extra empty members."""
    replace = replace or {}
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, replace.get(info.filename, source.read(info)))
        for name in replace.keys() - set(source.namelist()):
            target.writestr(name, replace[name])
        for n in range(add):
            target.writestr(f"extra/item{n}.xml", b"")
    return out.getvalue()


def paragraphs_xml(count: int) -> bytes:
    """A valid document.xml of `count` one-letter paragraphs: a lot of tree for a little zip."""
    head = (
        b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
        b'<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body>'
    )
    return head + b"<w:p><w:r><w:t>a</w:t></w:r></w:p>" * count + b"</w:body></w:document>"


def samples() -> dict[Kind, tuple[str, bytes]]:
    return {
        Kind.PDF: ("a.pdf", build_pdf([text_page(PHRASES[Kind.PDF])])),
        Kind.DOCX: ("a.docx", docx_bytes()),
        Kind.XLSX: ("a.xlsx", xlsx_bytes({"s": [["k"], [PHRASES[Kind.XLSX]]]})),
        Kind.PPTX: ("a.pptx", pptx_bytes()),
        Kind.TXT: ("a.txt", PHRASES[Kind.TXT].encode("gb18030")),
        Kind.MD: ("a.md", PHRASES[Kind.MD].encode()),
        Kind.CSV: ("a.csv", f"h\n{PHRASES[Kind.CSV]}\n".encode()),
    }
