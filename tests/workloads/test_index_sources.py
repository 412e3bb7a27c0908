"""Reading knowledge-base sources (tailor.workloads.knowledge.documents): every source kind and format.

Files are real files laid out as the runtime mounts them (ConfigMaps and PVCs under
``Paths``); the PDF is written with pypdf; the URL source is a real local HTTP server.
"""

from __future__ import annotations

import io
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tailor.api.common import DataSource
from tailor.api.knowledgebase import DocumentFormat
from tailor.api.workloads import Paths
from tailor.workloads.errors import WorkloadError
from tailor.workloads.knowledge.documents import Document, html_to_text, read_documents

HTML = """<!doctype html><html><head><title>Install   guide</title>
<style>body { color: red }</style><script>track()</script></head>
<body><nav><a href="/">home</a></nav><h1>Install</h1><p>Run <b>pip</b>
install tailor.</p><ul><li>fast</li><li>safe</li></ul>
<pre>def f():
    return 1</pre></body></html>"""


def make_pdf(text: str, title: str) -> bytes:
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    page = writer.add_blank_page(612, 792)
    font = DictionaryObject(
        {
            NameObject("/Type"): NameObject("/Font"),
            NameObject("/Subtype"): NameObject("/Type1"),
            NameObject("/BaseFont"): NameObject("/Helvetica"),
        }
    )
    page[NameObject("/Resources")] = DictionaryObject(
        {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})}
    )
    stream = DecodedStreamObject()
    stream.set_data(f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode())
    page.replace_contents(stream)
    writer.add_metadata({"/Title": title})
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(
        artifacts=str(tmp_path / "artifacts"),
        config_maps=str(tmp_path / "cm"),
        pvcs=str(tmp_path / "pvc"),
        secrets=str(tmp_path / "secrets"),
    )


def read(sources: list[dict], paths: Paths, fmt: dict | None = None) -> list[Document]:
    models = [DataSource.model_validate(s) for s in sources]
    return list(read_documents(models, DocumentFormat.model_validate(fmt or {}), paths))


def test_every_file_format_on_a_pvc(paths: Paths) -> None:
    root = Path(paths.pvcs) / "docs" / "kb"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("plain text file")
    (root / "b.md").write_text("intro\n\n# Guide title\n\nbody")
    (root / "sub" / "c.html").write_text(HTML)
    (root / "d.pdf").write_bytes(make_pdf("Hello from a PDF", "PDF title"))
    (root / "e.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    docs = read([{"pvc": {"claimName": "docs", "path": "kb"}}], paths)
    by_id = {d.id: d for d in docs}
    assert sorted(by_id) == [
        "pvc://docs/kb/a.txt",
        "pvc://docs/kb/b.md",
        "pvc://docs/kb/d.pdf",
        "pvc://docs/kb/sub/c.html",
    ]  # the binary file of unknown format is skipped
    assert by_id["pvc://docs/kb/a.txt"].text == "plain text file"
    assert by_id["pvc://docs/kb/a.txt"].title == "a.txt"
    assert by_id["pvc://docs/kb/b.md"].title == "Guide title"
    assert by_id["pvc://docs/kb/d.pdf"].text == "Hello from a PDF"
    assert by_id["pvc://docs/kb/d.pdf"].title == "PDF title"
    html = by_id["pvc://docs/kb/sub/c.html"]
    assert html.title == "Install guide"
    assert "track()" not in html.text and "color: red" not in html.text
    assert "# Install\n\nRun pip install tailor." in html.text
    assert "- fast\n- safe" in html.text
    assert "def f():\n    return 1" in html.text  # pre keeps its indentation


def test_pvc_glob_selects_files(paths: Paths) -> None:
    root = Path(paths.pvcs) / "docs"
    (root / "deep" / "er").mkdir(parents=True)
    (root / "top.md").write_text("top")
    (root / "deep" / "er" / "x.md").write_text("deep")
    (root / "deep" / "skip.txt").write_text("not markdown")
    docs = read([{"pvc": {"claimName": "docs", "glob": "**/*.md"}}], paths)
    assert [d.id for d in docs] == ["pvc://docs/deep/er/x.md", "pvc://docs/top.md"]


def test_configmap_keys_and_inline_records(paths: Paths) -> None:
    cm = Path(paths.config_maps) / "faq"
    cm.mkdir(parents=True)
    (cm / "billing.md").write_text("# Billing\n\nPay monthly.")
    (cm / "refunds.txt").write_text("Refunds take 5 days.")
    docs = read([{"configMap": {"name": "faq"}}], paths)
    assert [(d.id, d.title) for d in docs] == [
        ("configmap://faq/billing.md", "Billing"),
        ("configmap://faq/refunds.txt", "refunds.txt"),
    ]
    docs = read(
        [
            {"configMap": {"name": "faq", "key": "refunds.txt"}},
            {
                "inline": [
                    {"id": "x1", "text": "inline doc", "title": "X", "metadata": {"k": 1}},
                    {"text": "no id"},
                ]
            },
        ],
        paths,
    )
    assert docs[1] == Document(
        id="x1", text="inline doc", source="inline:sources[1]", title="X", metadata={"k": 1}
    )
    assert docs[2].id == "inline:sources[1][1]" and docs[2].text == "no id"


def test_json_and_jsonl_records_with_a_format(paths: Paths) -> None:
    root = Path(paths.pvcs) / "data"
    root.mkdir(parents=True)
    records = [
        {"name": "resnet", "task": "classify", "about": "a CNN", "tags": ["vision"], "extra": 1},
        {"name": "bert", "task": "embed", "about": "a transformer", "tags": ["nlp"]},
    ]
    (root / "apis.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    (root / "more.json").write_text(json.dumps([{"name": "gpt", "task": "generate", "about": "x"}]))
    fmt = {
        "json": {
            "textFields": ["task", "about"],
            "idField": "name",
            "titleField": "name",
            "metadataFields": ["tags", "absent"],
        }
    }
    docs = read([{"pvc": {"claimName": "data"}}], paths, fmt)
    assert [d.id for d in docs] == ["resnet", "bert", "gpt"]
    assert docs[0].text == "task: classify\nabout: a CNN"
    assert docs[0].title == "resnet"
    assert docs[0].metadata == {"tags": ["vision"]}
    assert docs[0].source == "pvc://data/apis.jsonl"


def test_url_source_is_fetched_and_parsed(paths: Paths, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "page.html").write_text(HTML)

    class Quiet(SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(site), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            return None

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/page.html"
        source = {"url": url, "allowPrivateAddresses": True, "allowInsecureHttp": True}
        (doc,) = read([source], paths)
        assert doc.id == url and doc.title == "Install guide"
        assert "Run pip install tailor." in doc.text
        with pytest.raises(WorkloadError, match="allowPrivateAddresses"):
            read([{"url": url, "allowInsecureHttp": True}], paths)
    finally:
        httpd.shutdown()


def bad_source_error(tmp: Path, paths: Paths, name: str, content: bytes, fmt: dict | None) -> str:
    root = Path(paths.pvcs) / "bad"
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(content)
    with pytest.raises(WorkloadError) as error:
        read([{"pvc": {"claimName": "bad", "path": name}}], paths, fmt)
    return f"{error.value.reason}: {error.value.message}"


def test_bad_input_names_the_file_line_and_fix(paths: Paths, tmp_path: Path) -> None:
    fmt = {"json": {"textFields": ["description"], "idField": "api_name"}}
    lines = b'{"description": "ok", "api_name": "a"}\n{"description": broken}\n'
    assert bad_source_error(tmp_path, paths, "a.jsonl", lines, fmt).startswith(
        "InvalidDocument: pvc://bad/a.jsonl:2: not valid JSON"
    )
    missing_text = b'{"desc": "typo", "api_name": "a"}\n'
    message = bad_source_error(tmp_path, paths, "b.jsonl", missing_text, fmt)
    assert "pvc://bad/b.jsonl:1: none of the text fields ['description']" in message
    assert "'desc'" in message and "textFields" in message
    duplicate = b'{"description": "x", "api_name": "a"}\n{"description": "y", "api_name": "a"}\n'
    message = bad_source_error(tmp_path, paths, "c.jsonl", duplicate, fmt)
    assert message.startswith("DuplicateDocumentId: document id 'a' appears twice")
    assert "idField" in message
    message = bad_source_error(tmp_path, paths, "d.pdf", b"%PDF-1.4 truncated", None)
    assert message.startswith("InvalidDocument: pvc://bad/d.pdf: cannot read PDF")
    with pytest.raises(WorkloadError, match="no files found") as error:
        read([{"pvc": {"claimName": "nothing-here", "path": "x.md"}}], paths)
    assert error.value.reason == "SourceNotFound"


def test_html_to_text_keeps_block_structure() -> None:
    title, text = html_to_text("<p>one</p><p>two<br>three</p><h2>Sub</h2>text &amp; more")
    assert title is None
    assert text == "one\n\ntwo\nthree\n\n## Sub\ntext & more"
