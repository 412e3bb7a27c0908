"""Safe URL fetching (tailor.workloads.io.fetch) against real local addresses and a real server.

Every refusal here is real: the URLs name loopback, private and link-local addresses (or a
host name that resolves to one), and nothing is mocked. The local HTTP server on 127.0.0.1
is reachable only when the source opts in with allowPrivateAddresses + allowInsecureHttp.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tailor.api.common import DataSource
from tailor.workloads.errors import WorkloadError
from tailor.workloads.io.fetch import fetch_source, fetch_url

DOC = "# Local doc\n\nServed by a real server on 127.0.0.1.\n"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: object) -> None:
        return None

    def do_GET(self) -> None:
        routes = {
            "/doc.md": self._doc,
            "/redirect-metadata": lambda: self._redirect("http://169.254.169.254/latest/meta-data"),
            "/redirect-private": lambda: self._redirect("http://10.0.0.7/internal"),
            "/redirect-file": lambda: self._redirect("file:///etc/passwd"),
            "/redirect-doc": lambda: self._redirect("/doc.md"),
            "/big": self._big,
            "/big-undeclared": self._big_undeclared,
            "/slow": self._slow,
            "/missing": lambda: self.send_error(404),
        }
        routes.get(self.path, lambda: self.send_error(404))()

    def _doc(self) -> None:
        body = DOC.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/markdown; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.end_headers()

    def _big(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "10000")
        self.end_headers()
        self.wfile.write(b"x" * 10000)

    def _big_undeclared(self) -> None:  # no Content-Length: the limit must hold while reading
        self.send_response(200)
        self.end_headers()
        for _ in range(10):
            self.wfile.write(b"y" * 1000)

    def _slow(self) -> None:
        self.send_response(200)
        self.end_headers()
        try:
            for _ in range(40):
                self.wfile.write(b"z")
                self.wfile.flush()
                time.sleep(0.25)
        except OSError:
            pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


LOCAL = (ipaddress.ip_network("127.0.0.1/32"),)


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("https://127.0.0.1/x", "loopback"),
        ("https://10.1.2.3/x", "private"),
        ("https://192.168.0.10/x", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("https://[::1]:8443/x", "loopback"),
        ("https://[::ffff:127.0.0.1]/x", "loopback (embedded 127.0.0.1)"),
        ("https://localhost/x", "loopback"),
        ("https://0.0.0.0/x", "unspecified"),
    ],
)
def test_private_addresses_are_refused(url: str, kind: str) -> None:
    started = time.monotonic()
    with pytest.raises(WorkloadError) as error:
        fetch_url(url, allow_insecure_http=True, timeout_seconds=5)
    assert error.value.reason == "UnsafeURL"
    assert f"a {kind} address" in error.value.message
    assert "allowPrivateAddresses" in error.value.message
    assert url in error.value.message
    assert time.monotonic() - started < 3  # refused before any connection attempt


@pytest.mark.parametrize(
    ("url", "inner"),
    [
        # Python's is_global is True for all three: the IPv6 prefix alone is judged.
        ("https://[64:ff9b::a9fe:a9fe]/latest/meta-data", "link-local (embedded 169.254.169.254)"),
        ("https://[2002:a9fe:a9fe::]/x", "link-local (embedded 169.254.169.254)"),
        ("https://[::a9fe:a9fe]/x", "link-local (embedded 169.254.169.254)"),
        ("https://[64:ff9b:1::a00:7]/x", "private (embedded 10.0.0.7)"),
        ("https://[::ffff:169.254.169.254]/x", "link-local (embedded 169.254.169.254)"),
    ],
)
def test_ipv4_embedded_in_ipv6_is_checked_and_named(url: str, inner: str) -> None:
    with pytest.raises(WorkloadError) as error:
        fetch_url(url, timeout_seconds=5)
    assert error.value.reason == "UnsafeURL"
    assert f"a {inner} address" in error.value.message


def test_a_public_address_behind_nat64_passes_the_check() -> None:
    from tailor.workloads.io.fetch import check_url

    # 8.8.8.8 through the well-known NAT64 prefix: a public destination.
    assert [str(a) for a in check_url("https://[64:ff9b::808:808]/")] == ["64:ff9b::808:808"]


def test_the_teacher_transport_checks_every_request(server: str) -> None:
    """The RAFT teacher's client (an external url) goes through the same guard: plain http
    and private addresses refused, naming the fix; with both allowed the request reaches
    the server at the checked address."""
    from tailor.workloads.io.fetch import GuardedTransport
    from tailor.workloads.raft.data import Teacher

    for guard, refused in (
        (GuardedTransport(), "plain http"),
        (GuardedTransport(allow_insecure_http=True), "a loopback address"),
    ):
        with pytest.raises(WorkloadError) as error:
            Teacher(server, None, None, transport=guard)  # GET /models
        assert error.value.reason == "UnsafeURL" and refused in error.value.message
    guard = GuardedTransport(allow_private_addresses=True, allow_insecure_http=True)
    teacher = Teacher(server, "m", None, transport=guard)
    response = teacher.client.get("/doc.md")
    assert response.status_code == 200 and response.text == DOC
    teacher.close()


def test_a_teacher_url_must_be_https_unless_allowed() -> None:
    from pydantic import ValidationError

    from tailor.api.raftjob import Teacher as TeacherSpec

    with pytest.raises(ValidationError, match="url must use https://"):
        TeacherSpec.model_validate({"url": "http://teacher.example/v1"})
    TeacherSpec.model_validate({"url": "http://teacher.example/v1", "allowInsecureHttp": True})


def test_localhost_names_the_address_it_resolves_to() -> None:
    with pytest.raises(WorkloadError, match=r"host localhost resolves to (127\.0\.0\.1|::1)"):
        fetch_url("https://localhost:9/x")


def test_plain_http_needs_allow_insecure_http(server: str) -> None:
    with pytest.raises(WorkloadError, match="allowInsecureHttp") as error:
        fetch_url(f"{server}/doc.md", allow_private_addresses=True)
    assert error.value.reason == "UnsafeURL"


def test_local_server_is_served_when_the_source_allows_it(server: str) -> None:
    source = DataSource(
        url=f"{server}/doc.md", allow_private_addresses=True, allow_insecure_http=True
    )
    fetched = fetch_source(source)
    assert fetched.content.decode() == DOC
    assert fetched.content_type == "text/markdown"
    assert fetched.charset == "utf-8"


def test_same_server_refused_without_allow_private_addresses(server: str) -> None:
    source = DataSource(url=f"{server}/doc.md", allow_insecure_http=True)
    with pytest.raises(WorkloadError, match=r"127\.0\.0\.1 is a loopback address"):
        fetch_source(source)


def test_redirect_within_allowed_network_is_followed(server: str) -> None:
    fetched = fetch_url(f"{server}/redirect-doc", allow_insecure_http=True, allowed_networks=LOCAL)
    assert fetched.content.decode() == DOC
    assert fetched.url.endswith("/doc.md")


@pytest.mark.parametrize(
    ("path", "refused"),
    [
        ("/redirect-metadata", "169.254.169.254 is a link-local address"),
        ("/redirect-private", "10.0.0.7 is a private address"),
        ("/redirect-file", "only https://"),
    ],
)
def test_redirects_to_unsafe_targets_are_refused(server: str, path: str, refused: str) -> None:
    # 127.0.0.1 alone is admitted, so the first hop is served and the redirect is checked
    with pytest.raises(WorkloadError) as error:
        fetch_url(f"{server}{path}", allow_insecure_http=True, allowed_networks=LOCAL)
    assert error.value.reason == "UnsafeURL"
    assert error.value.message.startswith(f"redirect from {server}{path} to")
    assert refused in error.value.message


@pytest.mark.parametrize("path", ["/big", "/big-undeclared"])
def test_max_bytes_is_enforced(server: str, path: str) -> None:
    source = DataSource(
        url=f"{server}{path}",
        allow_private_addresses=True,
        allow_insecure_http=True,
        max_bytes=4096,
    )
    with pytest.raises(WorkloadError, match=r"larger than maxBytes \(4096 bytes\)") as error:
        fetch_source(source)
    assert error.value.reason == "SourceTooLarge"
    source = source.model_copy(update={"max_bytes": 20000})
    assert len(fetch_source(source).content) == 10000


def test_total_time_is_limited(server: str) -> None:
    started = time.monotonic()
    with pytest.raises(WorkloadError) as error:
        fetch_url(
            f"{server}/slow",
            allow_private_addresses=True,
            allow_insecure_http=True,
            timeout_seconds=1,
        )
    assert error.value.reason == "FetchTimeout"
    assert time.monotonic() - started < 5


def test_http_errors_name_the_status(server: str) -> None:
    with pytest.raises(WorkloadError, match="HTTP 404") as error:
        fetch_url(f"{server}/missing", allow_private_addresses=True, allow_insecure_http=True)
    assert error.value.reason == "FetchFailed"


@pytest.mark.parametrize("field", ["phase", "conditions", "observedGeneration"])
def test_a_workload_cannot_report_a_field_the_operator_owns(field: str) -> None:
    """One writer of phase: workloads report progress and their own fields only."""
    from tailor.workloads.progress import ProgressReporter

    sent: list[dict[str, Any]] = []
    reporter = ProgressReporter(sent.append, 0)
    reporter.report({"progress": {"step": 1}})
    with pytest.raises(ValueError, match=f"status.{field}: written by the operator alone"):
        reporter.report({field: "Running", "progress": {"step": 2}}, final=True)
    assert sent == [{"progress": {"step": 1}}]
