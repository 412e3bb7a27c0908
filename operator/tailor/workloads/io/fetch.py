"""Fetching a DataSource ``url`` without letting it reach inside the cluster.

A URL in a user's manifest is fetched from inside the cluster, so it could name the cloud
metadata service (169.254.169.254), the API server or any private Service. Before each
request the host is resolved once and every resolved address is checked with
:mod:`ipaddress`: only globally routable unicast addresses pass unless the source sets
``allowPrivateAddresses``. The connection then goes to the address that was checked (the
host name is kept for the Host header, TLS SNI and certificate checks), so a DNS answer
that changes between the check and the connection cannot slip through. Redirects are
followed by hand, each hop checked the same way, and never from https down to http unless
``allowInsecureHttp`` is set. Downloads are capped in size (``maxBytes``) and in total time.
Used by the index workload for knowledge-base sources and by the trainer for datasets.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from urllib.parse import urljoin

import httpx

from tailor.api.common import DataSource
from tailor.workloads.errors import WorkloadError

DEFAULT_TIMEOUT_SECONDS = 60.0
MAX_REDIRECTS = 5
USER_AGENT = "tailor-workload/0.1"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Fetched:
    """A downloaded body and what the server said about it."""

    url: str
    """The URL the body came from, after redirects."""
    content: bytes
    content_type: str
    """The media type, lower case and without parameters; empty when the server sent none."""
    charset: str | None


def fetch_source(source: DataSource, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> Fetched:
    """Download a ``url`` DataSource under its own limits and address policy."""
    if source.url is None:
        raise ValueError("fetch_source needs a url DataSource")
    return fetch_url(
        source.url,
        allow_private_addresses=source.allow_private_addresses,
        allow_insecure_http=source.allow_insecure_http,
        max_bytes=source.max_bytes,
        timeout_seconds=timeout_seconds,
    )


def fetch_url(
    url: str,
    *,
    allow_private_addresses: bool = False,
    allow_insecure_http: bool = False,
    max_bytes: int = 100 * 1024 * 1024,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    allowed_networks: tuple[IPNetwork, ...] = (),
) -> Fetched:
    """GET ``url`` following redirects, each hop checked; raise :class:`WorkloadError` on refusal.

    ``allowed_networks`` admits specific non-public networks (e.g. one proxy or mirror)
    without opening every private address.
    """
    deadline = time.monotonic() + timeout_seconds
    current = url
    with httpx.Client(follow_redirects=False, trust_env=False) as client:
        for hop in range(MAX_REDIRECTS + 1):
            what = "url" if hop == 0 else f"redirect from {url} to"
            target = httpx.URL(current)
            addresses = check_url(
                current,
                allow_private_addresses=allow_private_addresses,
                allow_insecure_http=allow_insecure_http,
                allowed_networks=allowed_networks,
                deadline=deadline,
                what=what,
            )
            response = _send(client, target, addresses, deadline, url)
            try:
                if response.is_redirect:
                    location = response.headers.get("location", "")
                    if not location:
                        raise WorkloadError(
                            "FetchFailed", f"{current}: redirect without a Location header"
                        )
                    current = urljoin(current, location)
                    continue
                if response.status_code >= 400:
                    raise WorkloadError(
                        "FetchFailed",
                        f"{current}: HTTP {response.status_code} {response.reason_phrase}",
                    )
                content = _read_body(response, max_bytes, deadline, url, timeout_seconds)
            finally:
                response.close()
            media_type, _, params = response.headers.get("content-type", "").partition(";")
            charset = None
            for param in params.split(";"):
                key, _, value = param.strip().partition("=")
                if key.lower() == "charset" and value:
                    charset = value.strip("\"'")
            return Fetched(str(target), content, media_type.strip().lower(), charset)
    raise WorkloadError("FetchFailed", f"{url}: more than {MAX_REDIRECTS} redirects")


class GuardedTransport(httpx.HTTPTransport):
    """An httpx transport for API clients (the RAFT teacher): every request's URL is
    checked as :func:`fetch_url` checks it (scheme, every resolved address, addresses
    embedded in IPv6) and the connection goes to the address that was checked, the host
    name kept for the Host header and TLS (SNI and the certificate check). Redirects are
    not followed (httpx's default), so none escapes the check."""

    def __init__(self, *, allow_private_addresses: bool = False, allow_insecure_http: bool = False):
        super().__init__()
        self.allow_private_addresses = allow_private_addresses
        self.allow_insecure_http = allow_insecure_http

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        target = request.url
        addresses = check_url(
            str(target),
            allow_private_addresses=self.allow_private_addresses,
            allow_insecure_http=self.allow_insecure_http,
        )
        request.headers["Host"] = target.netloc.decode("ascii").rpartition("@")[2]
        request.url = target.copy_with(host=str(addresses[0]))
        if target.scheme == "https":
            request.extensions = {**request.extensions, "sni_hostname": target.host}
        return super().handle_request(request)


def check_url(
    url: str,
    *,
    allow_private_addresses: bool = False,
    allow_insecure_http: bool = False,
    allowed_networks: tuple[IPNetwork, ...] = (),
    deadline: float | None = None,
    what: str = "url",
) -> list[IPAddress]:
    """The addresses ``url`` resolves to, all of them allowed; raise ``UnsafeURL`` otherwise."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise WorkloadError("UnsafeURL", f"{what} {url} is not a valid URL ({exc})") from exc
    if parsed.scheme not in ("https", "http"):
        raise WorkloadError(
            "UnsafeURL", f"{what} {url} refused: only https:// (or http:// with allowInsecureHttp)"
        )
    if parsed.scheme == "http" and not allow_insecure_http:
        raise WorkloadError(
            "UnsafeURL",
            f"{what} {url} refused: plain http; use https:// or set allowInsecureHttp: true "
            "on the source",
        )
    if not parsed.host:
        raise WorkloadError("UnsafeURL", f"{what} {url} refused: no host")
    addresses = _resolve(parsed.host, parsed.port or _default_port(parsed.scheme), deadline)
    if allow_private_addresses:
        return addresses
    for address in addresses:
        if _is_public(address) or any(address in net for net in allowed_networks):
            continue
        literal = str(address) == parsed.host.strip("[]")
        where = f"{address} is" if literal else f"host {parsed.host} resolves to {address},"
        raise WorkloadError(
            "UnsafeURL",
            f"{what} {url} refused: {where} a {_kind(address)} address. "
            "Private, loopback and link-local addresses are refused; set "
            "allowPrivateAddresses: true on the source to fetch from inside the cluster.",
        )
    return addresses


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def _resolve(host: str, port: int, deadline: float | None) -> list[IPAddress]:
    """Every address of ``host`` (an IP literal resolves to itself), within the deadline."""
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    timeout = None if deadline is None else max(deadline - time.monotonic(), 0.1)
    # getaddrinfo has no timeout of its own: run it in a thread we stop waiting for.
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        infos = pool.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM).result(
            timeout=timeout
        )
    except FutureTimeout as exc:
        raise WorkloadError("FetchTimeout", f"resolving {host} timed out") from exc
    except OSError as exc:
        raise WorkloadError("FetchFailed", f"cannot resolve host {host} ({exc})") from exc
    finally:
        pool.shutdown(wait=False)
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise WorkloadError("FetchFailed", f"host {host} has no addresses")
    return addresses


_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))


def embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries, which a gateway may connect to:
    IPv4-mapped (``::ffff:a.b.c.d``), IPv4-compatible (``::a.b.c.d``), 6to4
    (``2002:AABB:CCDD::``), NAT64 (``64:ff9b::/96``, and RFC 8215's ``64:ff9b:1::/48``)
    and Teredo (server and client). Python's ``is_global`` judges the IPv6 prefix alone
    (True for ``64:ff9b::a9fe:a9fe``, the metadata service behind NAT64), so each embedded
    address is checked on its own."""
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    found: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    value = int(address)
    if value >> 32 == 0 and value > 1:  # ::a.b.c.d (not :: or ::1)
        found.append(ipaddress.IPv4Address(value & 0xFFFFFFFF))
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if any(address in net for net in _NAT64):
        found.append(ipaddress.IPv4Address(value & 0xFFFFFFFF))
    if address.teredo is not None:
        found.extend(address.teredo)
    return found


def _is_public(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return _is_public(address.ipv4_mapped)  # (::ffff:0:0/96 itself is never global)
    if any(not _is_public(inner) for inner in embedded_ipv4(address)):
        return False
    return address.is_global and not address.is_multicast


def _kind(address: IPAddress) -> str:
    inner = next((a for a in embedded_ipv4(address) if not _is_public(a)), None)
    if inner is not None:
        return f"{_kind(inner)} (embedded {inner})"
    for kind in ("loopback", "link_local", "unspecified", "multicast", "private", "reserved"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return "non-public"


def _send(
    client: httpx.Client,
    target: httpx.URL,
    addresses: list[IPAddress],
    deadline: float,
    original: str,
) -> httpx.Response:
    """Send the GET to the checked addresses in turn, keeping the host name for TLS and Host."""
    host_header = target.netloc.decode("ascii").rpartition("@")[2]
    error: Exception | None = None
    for address in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        request = client.build_request(
            "GET",
            target.copy_with(host=str(address)),
            headers={"Host": host_header, "User-Agent": USER_AGENT},
            timeout=httpx.Timeout(min(remaining, 30.0)),
            extensions={"sni_hostname": target.host} if target.scheme == "https" else {},
        )
        try:
            return client.send(request, stream=True)
        except httpx.ConnectError as exc:
            error = exc
        except httpx.TimeoutException as exc:
            raise WorkloadError("FetchTimeout", f"{original}: timed out ({exc})") from exc
        except httpx.HTTPError as exc:
            raise WorkloadError("FetchFailed", f"{original}: {exc}") from exc
    if error is None:
        raise WorkloadError("FetchTimeout", f"{original}: timed out")
    raise WorkloadError("FetchFailed", f"{original}: cannot connect to {target.host} ({error})")


def _read_body(
    response: httpx.Response, max_bytes: int, deadline: float, url: str, timeout_seconds: float
) -> bytes:
    too_large = WorkloadError(
        "SourceTooLarge",
        f"{url} is larger than maxBytes ({max_bytes} bytes); raise maxBytes on the source",
    )
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    body = bytearray()
    try:
        for piece in response.iter_bytes():
            body += piece
            if len(body) > max_bytes:
                raise too_large
            if time.monotonic() > deadline:
                raise WorkloadError(
                    "FetchTimeout", f"{url}: download took longer than {timeout_seconds:g}s"
                )
    except httpx.TimeoutException as exc:
        raise WorkloadError("FetchTimeout", f"{url}: timed out while reading ({exc})") from exc
    except httpx.HTTPError as exc:
        raise WorkloadError("FetchFailed", f"{url}: {exc}") from exc
    return bytes(body)
