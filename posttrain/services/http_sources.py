"""Fetching a dataset over http(s): only when the operator allows it, and by default never from
loopback, private or otherwise non-public addresses.

The host is resolved once, every address checked, and the connection pinned to those addresses
(so DNS rebinding cannot swap them between the check and the fetch); redirects are not followed,
and the body is capped in bytes and time.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import ssl
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from posttrain.errors import DatasetSourceInvalid

DEFAULT_PORTS = {"http": 80, "https": 443}
_NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the low 32 bits are an IPv4 address


@dataclass(frozen=True)
class HttpPolicy:
    """Whether and how ``http(s)://`` dataset URIs are fetched (built from ``Settings``).

    ``enabled`` is POSTTRAIN_ALLOW_HTTP_DATASETS; ``allow_private`` (POSTTRAIN_HTTP_DATASET_ALLOW_PRIVATE)
    lets tests and trusted setups fetch from loopback, private, link-local and other non-public addresses.
    """

    enabled: bool = False
    allow_private: bool = False
    max_bytes: int = 256 * 1024 * 1024
    timeout_seconds: float = 30.0


def fetch_http(uri: str, policy: HttpPolicy) -> tuple[bytes, str, str, str]:
    """Fetch an ``http(s)://`` dataset, connecting only to addresses that passed the address check.

    The host is resolved once; every address it resolves to must be public (``_refusal``) unless
    ``policy.allow_private``. The connection is then made to those very addresses (a network backend
    that ignores the host name), so DNS rebinding cannot swap a checked public address for a private one
    between the check and the connect. The URL's host still goes in the ``Host`` header and, for https,
    in SNI and certificate verification. Redirects are not followed (a 3xx is an error naming where it
    points); the body is read in chunks up to ``policy.max_bytes``. No proxy from the environment is
    used: a proxy would make the address check meaningless.

    Residual risks: ``getaddrinfo`` has no timeout of its own, so a slow resolver can hold the request
    longer than ``timeout_seconds``; the overall deadline is checked between chunks, so a read that
    blocks may run up to one more ``timeout_seconds`` past it. A public address that forwards to an
    internal service (an open proxy the operator runs) is beyond what an address check can see.
    """
    import httpcore  # installed with httpx; only needed when http datasets are on
    import httpx

    try:
        url = httpx.URL(uri)
    except (httpx.InvalidURL, ValueError) as exc:
        raise DatasetSourceInvalid(f"dataset URL is not a valid URL: {exc}") from exc
    if url.userinfo:
        raise DatasetSourceInvalid(
            "dataset URL carries credentials (user:password@host); this server does not send them. Use a URL "
            "that needs none (for example a pre-signed link), or upload the file"
        )
    host = url.raw_host.decode("ascii")
    if not host:
        raise DatasetSourceInvalid("dataset URL names no host; write http(s)://host/path")
    port = url.port or DEFAULT_PORTS[url.scheme]
    if not 0 < port < 65536:
        raise DatasetSourceInvalid(f"dataset URL port {port} is not a TCP port (1 to 65535)")
    shown = f"{url.scheme}://{url.netloc.decode('ascii')}{url.path}"  # no query: it may hold a token
    addresses = _resolve_checked(host, port, policy, shown)

    deadline = time.monotonic() + policy.timeout_seconds
    timeouts = dict.fromkeys(("connect", "read", "write", "pool"), policy.timeout_seconds)
    target = httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=port, target=url.raw_path)
    headers = [(b"Host", url.netloc), (b"Accept-Encoding", b"identity"), (b"User-Agent", b"posttrain"),
               (b"Accept", b"*/*")]  # fmt: skip
    pool = httpcore.ConnectionPool(
        ssl_context=ssl.create_default_context(),
        network_backend=_pinned_backend_class()(addresses),
        max_connections=1,
        retries=0,
    )
    try:
        with pool, pool.stream("GET", target, headers=headers, extensions={"timeout": timeouts}) as response:
            status = response.status
            if 300 <= status < 400:
                location = _header(response.headers, b"location") or "(no Location header)"
                raise DatasetSourceInvalid(
                    f"{shown} answered {status}, a redirect to {location[:300]!r}; redirects are not followed. "
                    "Give the final URL instead"
                )
            if status != 200:
                raise DatasetSourceInvalid(f"{shown} answered HTTP {status}; the dataset must be served with 200")
            encoding = (_header(response.headers, b"content-encoding") or "identity").strip().lower()
            if encoding != "identity":
                raise DatasetSourceInvalid(
                    f"{shown} was sent with Content-Encoding {encoding!r} although identity was asked for"
                )
            too_big = (f"{shown} is larger than the {policy.max_bytes} bytes this server fetches "
                       "(POSTTRAIN_HTTP_DATASET_MAX_BYTES)")
            length = _header(response.headers, b"content-length")
            if length is not None and length.strip().isdigit() and int(length) > policy.max_bytes:
                raise DatasetSourceInvalid(f"{too_big}: it declares {int(length)} bytes")
            body = bytearray()
            for chunk in response.iter_stream():
                body += chunk
                if len(body) > policy.max_bytes:
                    raise DatasetSourceInvalid(too_big)
                if time.monotonic() > deadline:
                    raise DatasetSourceInvalid(
                        f"{shown} took longer than {policy.timeout_seconds} s to download "
                        "(POSTTRAIN_HTTP_DATASET_TIMEOUT_SECONDS)"
                    )
            mime = (_header(response.headers, b"content-type") or "").split(";")[0].strip().lower()
    except httpcore.TimeoutException as exc:
        raise DatasetSourceInvalid(
            f"{shown} did not answer within {policy.timeout_seconds} s (POSTTRAIN_HTTP_DATASET_TIMEOUT_SECONDS)"
        ) from exc
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol, OSError) as exc:
        raise DatasetSourceInvalid(f"{shown} could not be fetched: {type(exc).__name__}: {exc}") from exc
    # The name the user wrote is the most specific statement of the format; servers often send
    # application/octet-stream or text/plain for .jsonl and .parquet. Content-Type comes next, then sniffing.
    return bytes(body), Path(unquote(url.path)).suffix.lower(), mime, shown


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _resolve_checked(host: str, port: int, policy: HttpPolicy, shown: str) -> list[str]:
    """The addresses to connect to. An IP literal is checked as is, before any lookup or connection."""
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        found = [str(literal)]
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError, OSError) as exc:
            raise DatasetSourceInvalid(f"{shown}: host {host!r} cannot be resolved: {exc}") from exc
        found = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not found:
            raise DatasetSourceInvalid(f"{shown}: host {host!r} resolves to no address")
    if not policy.allow_private:
        for address in found:
            why = _refusal(ipaddress.ip_address(address))
            if why:
                raise DatasetSourceInvalid(
                    f"{shown}: host {host!r} resolves to {address}, not a public address ({why}); this server fetches "
                    "datasets only from public addresses (the operator may set "
                    "POSTTRAIN_HTTP_DATASET_ALLOW_PRIVATE=true for trusted networks)"
                )
    return found


def _refusal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``address`` is not a public one, or None. IPv6 forms that embed IPv4 are judged by the IPv4 inside."""
    if isinstance(address, ipaddress.IPv6Address):
        address = ipaddress.IPv6Address(address.exploded.split("%")[0])  # drop a zone id
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64_PREFIX:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            why = _refusal(embedded)
            return f"{why} IPv4 {embedded} embedded in {address}" if why else None
        if address.teredo is not None:
            return "Teredo"
    for flag in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):  # most telling first
        if getattr(address, f"is_{flag}"):
            return flag.replace("_", "-")
    if not address.is_global:  # shared (100.64/10), benchmarking, documentation and other special ranges
        return "non-global"
    return None


@functools.cache
def _pinned_backend_class() -> type:
    """Built on first use so that importing this module does not import httpcore."""
    import httpcore

    class PinnedBackend(httpcore.SyncBackend):
        """Connects to the checked addresses, whatever host name httpcore asks for."""

        def __init__(self, addresses: list[str]) -> None:
            self._addresses = addresses

        def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                        socket_options: typing.Iterable[typing.Any] | None = None) -> httpcore.NetworkStream:  # fmt: skip
            error: Exception | None = None
            for address in self._addresses:
                try:
                    return super().connect_tcp(address, port, timeout, local_address, socket_options)
                except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:  # try the next checked address
                    error = exc
            assert error is not None
            raise error

    return PinnedBackend
