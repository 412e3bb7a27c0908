"""Reading a KnowledgeBase's sources into documents: text with an id, title and metadata.

Sources are ConfigMap files, PVC paths with globs, https URLs (fetched safely by
:mod:`tailor.workloads.io.fetch`) and inline records. Formats are chosen by file suffix, then
by the server's content type: txt, md, html (visible text, headings kept as markdown so the
markdown chunker can use them), json / jsonl (records mapped by ``spec.format.json``) and pdf
(pypdf). Documents are yielded one at a time, so a large source is never held whole in
memory beyond one file, and a source that fails midway raises a :class:`WorkloadError`
naming the file and line.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from tailor.api.common import DataSource
from tailor.api.knowledgebase import DocumentFormat, JsonFormat
from tailor.api.workloads import Paths
from tailor.workloads.errors import WorkloadError
from tailor.workloads.io.fetch import DEFAULT_TIMEOUT_SECONDS, fetch_source
from tailor.workloads.io.records import json_lines
from tailor.workloads.io.sources import source_listing

log = logging.getLogger("tailor.workloads.knowledge.documents")

SUFFIX_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".rst": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".html": "html",
    ".htm": "html",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".pdf": "pdf",
}
CONTENT_TYPE_FORMATS = {
    "text/plain": "text",
    "text/markdown": "markdown",
    "text/x-markdown": "markdown",
    "text/html": "html",
    "application/xhtml+xml": "html",
    "application/json": "json",
    "application/jsonl": "jsonl",
    "application/x-ndjson": "jsonl",
    "application/jsonlines": "jsonl",
    "application/pdf": "pdf",
}
# Without spec.format.json, records (inline or in json files) look like this.
DEFAULT_RECORD_FORMAT = JsonFormat(text_fields=["text"], id_field="id", title_field="title")


@dataclass(frozen=True)
class Document:
    """One document of a knowledge base."""

    id: str
    text: str
    source: str
    """Where it came from: pvc://claim/path, configmap://name/key, the URL, or inline."""
    title: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def read_documents(
    sources: Iterable[DataSource],
    document_format: DocumentFormat,
    paths: Paths,
    fetch_timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
) -> Iterator[Document]:
    """Every document of every source, in order; document ids must be unique across sources."""
    seen: dict[str, str] = {}
    for index, source in enumerate(sources):
        for document in _read_source(index, source, document_format, paths, fetch_timeout_seconds):
            if document.id in seen:
                raise WorkloadError(
                    "DuplicateDocumentId",
                    f"document id {document.id!r} appears twice ({seen[document.id]} and "
                    f"{document.source}); ids must be unique: pick an idField whose values "
                    "are unique (spec.format.json.idField)",
                )
            seen[document.id] = document.source
            yield document


def _read_source(
    index: int,
    source: DataSource,
    document_format: DocumentFormat,
    paths: Paths,
    fetch_timeout_seconds: float,
) -> Iterator[Document]:
    record_format = document_format.json_ or DEFAULT_RECORD_FORMAT
    if source.inline is not None:
        label = f"inline:sources[{index}]"
        for number, record in enumerate(source.inline):
            yield record_document(record, DEFAULT_RECORD_FORMAT, label, f"{label}[{number}]")
        return
    if source.url is not None:
        fetched = fetch_source(source, timeout_seconds=fetch_timeout_seconds)
        kind = SUFFIX_FORMATS.get(_suffix(fetched.url)) or CONTENT_TYPE_FORMATS.get(
            fetched.content_type, "text"
        )
        yield from parse_document(
            fetched.content, kind, source.url, record_format, charset=fetched.charset
        )
        return
    root, base, files = source_listing(source, paths)
    for path in files:
        label = base + path.relative_to(root).as_posix()
        data = path.read_bytes()
        if path.suffix.lower() not in SUFFIX_FORMATS and b"\x00" in data[:8192]:
            log.warning("skipping %s: binary file of unknown format", label)
            continue
        kind = SUFFIX_FORMATS.get(path.suffix.lower(), "text")
        yield from parse_document(data, kind, label, record_format)


def _suffix(url: str) -> str:
    path = url.split("?", 1)[0].split("#", 1)[0]
    return Path(path).suffix.lower() if "." in path.rsplit("/", 1)[-1] else ""


def parse_document(
    data: bytes,
    kind: str,
    label: str,
    record_format: JsonFormat = DEFAULT_RECORD_FORMAT,
    charset: str | None = None,
) -> Iterator[Document]:
    """The documents in one file or download of format ``kind`` (see :data:`SUFFIX_FORMATS`)."""
    if kind == "pdf":
        yield from _pdf_documents(data, label)
        return
    text = _decode(data, charset)
    if kind == "jsonl":
        for number, record in json_lines(text.splitlines(), label, "InvalidDocument"):
            yield record_document(record, record_format, label, f"{label}:{number}")
    elif kind == "json":
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WorkloadError(
                "InvalidDocument", f"{label}: not valid JSON ({exc.msg} at line {exc.lineno})"
            ) from exc
        records = parsed if isinstance(parsed, list) else [parsed]
        for number, record in enumerate(records):
            yield record_document(record, record_format, label, f"{label}[{number}]")
    elif kind == "html":
        title, body = html_to_text(text)
        if body.strip():
            yield Document(id=label, text=body, source=label, title=title or _name(label))
    else:
        if text.strip():
            title = markdown_title(text) if kind == "markdown" else None
            yield Document(id=label, text=text, source=label, title=title or _name(label))


def record_document(record: Any, fmt: JsonFormat, source: str, where: str) -> Document:
    """A document from one JSON record: text from ``fmt.text_fields``, id, title, metadata."""
    if not isinstance(record, dict):
        raise WorkloadError(
            "InvalidDocument", f"{where}: expected a JSON object, got {type(record).__name__}"
        )
    present = [name for name in fmt.text_fields if _has_value(record.get(name))]
    if not present:
        raise WorkloadError(
            "InvalidDocument",
            f"{where}: none of the text fields {fmt.text_fields} is set (the record has "
            f"{sorted(record)[:20]}); set spec.format.json.textFields",
        )
    if len(fmt.text_fields) == 1:
        text = _field_text(record[present[0]])
    else:
        text = "\n".join(f"{name}: {_field_text(record[name])}" for name in present)
    document_id = where
    if fmt.id_field is not None and fmt.id_field in record:
        document_id = str(record[fmt.id_field])
    elif fmt.id_field is not None and fmt is not DEFAULT_RECORD_FORMAT:
        raise WorkloadError(
            "InvalidDocument",
            f"{where}: the id field {fmt.id_field!r} is missing; set it in every record or "
            "change spec.format.json.idField",
        )
    title = record.get(fmt.title_field) if fmt.title_field else None
    metadata: dict[str, Any] = {}
    if fmt is DEFAULT_RECORD_FORMAT:
        if isinstance(record.get("metadata"), dict):
            metadata = record["metadata"]
    else:
        metadata = {name: record[name] for name in fmt.metadata_fields if name in record}
    return Document(
        id=document_id,
        text=text,
        source=source,
        title=str(title) if title is not None else None,
        metadata=metadata,
    )


def _has_value(value: Any) -> bool:
    return value is not None and value != "" and value != [] and value != {}


def _field_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    return json.dumps(value, ensure_ascii=False)


def _decode(data: bytes, charset: str | None) -> str:
    try:
        return data.decode(charset or "utf-8-sig")
    except (UnicodeDecodeError, LookupError):
        return data.decode("utf-8", errors="replace")


def _name(label: str) -> str:
    return label.rstrip("/").rsplit("/", 1)[-1]


def markdown_title(text: str) -> str | None:
    """The first level-1 (or failing that, any) ATX heading of a markdown text."""
    headings: list[tuple[str, str]] = re.findall(
        r"^(#{1,6})\s+(.+?)\s*#*\s*$", text, flags=re.MULTILINE
    )
    for hashes, title in headings:
        if hashes == "#":
            return title
    return headings[0][1] if headings else None


def _pdf_documents(data: bytes, label: str) -> Iterator[Document]:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        pages = [page.extract_text() or "" for page in reader.pages]
        title = reader.metadata.title if reader.metadata else None
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as exc:
        raise WorkloadError("InvalidDocument", f"{label}: cannot read PDF ({exc})") from exc
    text = "\n\n".join(page.strip() for page in pages if page.strip())
    if not text:
        log.warning("skipping %s: no extractable text (a scanned PDF needs OCR first)", label)
        return
    yield Document(id=label, text=text, source=label, title=title or _name(label))


BLOCK_TAGS = frozenset(
    [
        "address",
        "article",
        "aside",
        "blockquote",
        "br",
        "dd",
        "details",
        "dialog",
        "div",
        "dl",
        "dt",
        "fieldset",
        "figcaption",
        "figure",
        "footer",
        "form",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "header",
        "hr",
        "li",
        "main",
        "nav",
        "ol",
        "p",
        "pre",
        "section",
        "summary",
        "table",
        "tbody",
        "td",
        "tfoot",
        "th",
        "thead",
        "tr",
        "ul",
    ]
)
INLINE_END_TAGS = frozenset(["br", "dd", "dt", "li", "td", "th"])
"""Block tags whose end adds no line break (the next one starts its own line)."""
SKIPPED_TAGS = frozenset(
    ["script", "style", "noscript", "template", "svg", "head", "iframe", "object"]
)


class _HTMLText(HTMLParser):
    """Visible text of an HTML page; headings become markdown headings."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title_parts: list[str] = []
        self.skipping: list[str] = []
        self.in_title = False
        self.in_pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self.in_title = True
        elif tag in SKIPPED_TAGS:
            self.skipping.append(tag)
        elif tag in BLOCK_TAGS:
            self.parts.append("\n\n" if tag in ("p", "div", "section", "article") else "\n")
            if re.fullmatch(r"h[1-6]", tag):
                self.parts.append("#" * int(tag[1]) + " ")
            elif tag == "li":
                self.parts.append("- ")
        if tag == "pre":
            self.in_pre += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self.in_title = False
        elif self.skipping and tag == self.skipping[-1]:
            self.skipping.pop()
        elif tag in BLOCK_TAGS and tag not in INLINE_END_TAGS:
            self.parts.append("\n")
        if tag == "pre" and self.in_pre:
            self.in_pre -= 1

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title_parts.append(data)
        elif not self.skipping:
            if not self.in_pre:
                data = re.sub(r"\s+", " ", data)
                if not self.parts or self.parts[-1].endswith(("\n", "# ", "- ")):
                    data = data.lstrip()
            self.parts.append(data)


def html_to_text(html: str) -> tuple[str | None, str]:
    """(title, visible text) of an HTML page, with blank lines between blocks."""
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    text = "".join(parser.parts)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    title = " ".join("".join(parser.title_parts).split()) or None
    return title, text
