"""http(s) dataset URIs: off unless the operator turns them on, and never to non-public addresses by default.

Rows are fetched from a real ``http.server`` on 127.0.0.1 started by the test. Addresses that are not
loopback are only ever refused by the address check: the tests that name them forbid every connection.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from posttrain.errors import DatasetSourceInvalid, InvalidRequest
from posttrain.services.dataset_sources import load_uri_rows
from posttrain.services.http_sources import HttpPolicy

CHAT = [{"role": "user", "content": "Hello, world!"}, {"role": "assistant", "content": "Hi!"}]
ROWS = [{"messages": CHAT, "id": 1}, {"messages": CHAT[:1], "id": 2}]
JSONL = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
CSV = b'instruction,output\r\n"Say hi, please",hi\r\nCount,"1,2,3"\r\n'
CSV_ROWS = [{"instruction": "Say hi, please", "output": "hi"}, {"instruction": "Count", "output": "1,2,3"}]
ON = HttpPolicy(enabled=True)
PRIVATE_OK = HttpPolicy(enabled=True, allow_private=True)


class Handler(BaseHTTPRequestHandler):
    """One route per behaviour under test; records the Host header of every request it sees."""

    hosts: ClassVar[list[str]] = []

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def _send(self, body: bytes, content_type: str, *, length: bool = True, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        Handler.hosts.append(self.headers.get("Host", ""))
        path = self.path.split("?")[0]
        if path == "/d.jsonl":
            self._send(JSONL, "application/octet-stream")
        elif path == "/d.csv":
            self._send(CSV, "text/csv; charset=utf-8")
        elif path == "/export":  # no extension: the Content-Type decides
            self._send(json.dumps({"rows": ROWS}).encode(), "application/json")
        elif path == "/export-csv":
            self._send(CSV, "text/csv")
        elif path == "/big-declared.jsonl":
            self._send(JSONL * 100, "application/jsonl")
        elif path == "/big-streamed.jsonl":  # HTTP/1.0 without Content-Length: the body ends at close
            self._send(JSONL * 100, "application/jsonl", length=False)
        elif path == "/redirect.jsonl":
            self.send_response(302)
            self.send_header("Location", "/d.jsonl")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/missing.jsonl":
            self._send(b"not here", "text/plain", status=404)
        elif path == "/stall.jsonl":  # headers, then nothing
            self.send_response(200)
            self.end_headers()
            self.wfile.flush()
            time.sleep(3)
        elif path == "/drip.jsonl":  # every read returns quickly, but the whole body takes seconds
            self.send_response(200)
            self.end_headers()
            for _ in range(30):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.1)
        elif path == "/gzip.jsonl":
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(b"", "text/plain", status=404)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def no_connections(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Fail the test on any connection attempt; record every address that one was tried to."""
    attempts: list[tuple] = []

    def refuse(address: tuple, *args: object, **kwargs: object) -> None:
        attempts.append(address)
        raise AssertionError(f"a connection to {address} was attempted")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def load(uri: str, tmp_path: Path, http: HttpPolicy | None, **kwargs: object) -> list[dict]:
    return load_uri_rows(uri, file_roots=[tmp_path], http=http, **kwargs)  # type: ignore[arg-type]


# -- off unless the operator turns it on -------------------------------------------------------


@pytest.mark.parametrize("policy", [None, HttpPolicy(), HttpPolicy(enabled=False, allow_private=True)])
def test_off_by_default(tmp_path: Path, server: str, policy: HttpPolicy | None, no_connections: list) -> None:
    with pytest.raises(DatasetSourceInvalid, match="POSTTRAIN_ALLOW_HTTP_DATASETS") as caught:
        load(f"{server}/d.jsonl", tmp_path, policy)
    assert caught.value.status_code == 400
    assert no_connections == []


def test_settings_defaults_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from posttrain.settings import Settings

    for name in ("ALLOW_HTTP_DATASETS", "HTTP_DATASET_ALLOW_PRIVATE", "HTTP_DATASET_MAX_BYTES", "HTTP_DATASET_TIMEOUT_SECONDS"):
        monkeypatch.delenv(f"POSTTRAIN_{name}", raising=False)
    defaults = Settings()
    assert (defaults.allow_http_datasets, defaults.http_dataset_allow_private) == (False, False)
    assert defaults.http_dataset_max_bytes == 256 * 1024 * 1024 == HttpPolicy().max_bytes
    assert defaults.http_dataset_timeout_seconds == 30 == HttpPolicy().timeout_seconds
    monkeypatch.setenv("POSTTRAIN_ALLOW_HTTP_DATASETS", "true")
    monkeypatch.setenv("POSTTRAIN_HTTP_DATASET_ALLOW_PRIVATE", "1")
    monkeypatch.setenv("POSTTRAIN_HTTP_DATASET_MAX_BYTES", "1000")
    monkeypatch.setenv("POSTTRAIN_HTTP_DATASET_TIMEOUT_SECONDS", "2.5")
    configured = Settings()
    assert configured.allow_http_datasets and configured.http_dataset_allow_private
    assert (configured.http_dataset_max_bytes, configured.http_dataset_timeout_seconds) == (1000, 2.5)


@pytest.mark.parametrize(
    ("env", "expected"),
    [({}, "POSTTRAIN_ALLOW_HTTP_DATASETS"), ({"POSTTRAIN_ALLOW_HTTP_DATASETS": "true"}, "loopback"),
     ({"POSTTRAIN_ALLOW_HTTP_DATASETS": "true", "POSTTRAIN_HTTP_DATASET_ALLOW_PRIVATE": "true"}, None),
     ({"POSTTRAIN_ALLOW_HTTP_DATASETS": "true", "POSTTRAIN_HTTP_DATASET_ALLOW_PRIVATE": "true",
       "POSTTRAIN_HTTP_DATASET_MAX_BYTES": "10"}, "10 bytes")],
)  # fmt: skip
def test_dataset_service_passes_the_policy_from_settings(
    tmp_path: Path, server: str, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str | None
) -> None:
    from posttrain.services.container import build_services
    from posttrain.settings import Settings

    for name in ("ALLOW_HTTP_DATASETS", "HTTP_DATASET_ALLOW_PRIVATE", "HTTP_DATASET_MAX_BYTES", "HTTP_DATASET_TIMEOUT_SECONDS"):
        monkeypatch.delenv(f"POSTTRAIN_{name}", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    services = build_services(Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'store.db'}"))
    try:
        def register():
            return services.datasets.register(
                tenant="t", purpose="post-training/messages", source={"type": "uri", "uri": f"{server}/d.jsonl"},
                metadata=None, dataset_id="web",
            )
        if expected is None:
            dataset = register()
            assert dataset.row_count == 2
            rows, more = services.datasets.iterrows(tenant="t", dataset_id="web", start_index=0, limit=None)
            assert (rows, more) == (ROWS, False)
        else:
            with pytest.raises(InvalidRequest, match=expected):
                register()
    finally:
        services.close()


# -- fetched from a trusted local server -------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/d.jsonl", ROWS), ("/d.csv", CSV_ROWS), ("/export", ROWS), ("/export-csv", CSV_ROWS), ("/d.jsonl?sig=abc", ROWS)],
)
def test_rows_from_a_local_server_when_private_is_allowed(tmp_path: Path, server: str, path: str, expected: list) -> None:
    assert load(f"{server}{path}", tmp_path, PRIVATE_OK) == expected


def test_max_rows_applies(tmp_path: Path, server: str) -> None:
    with pytest.raises(DatasetSourceInvalid, match="limit of 1"):
        load(f"{server}/d.jsonl", tmp_path, PRIVATE_OK, max_rows=1)


def test_connection_is_pinned_to_the_checked_address(tmp_path: Path, server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The name is resolved once; a second lookup (a DNS rebinding chance) would fail this test."""
    port = int(server.rsplit(":", 1)[1])
    lookups: list[str] = []
    real = socket.getaddrinfo

    def resolve(host: str, *args: object, **kwargs: object) -> list:
        if host == "127.0.0.1":  # the numeric address the socket layer parses; no DNS
            return real(host, *args, **kwargs)  # type: ignore[arg-type]
        lookups.append(host)
        if host != "datasets.example" or len(lookups) > 1:
            raise AssertionError(f"unexpected lookup of {host!r} (lookup {len(lookups)})")
        return real("127.0.0.1", *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    Handler.hosts.clear()
    assert load(f"http://datasets.example:{port}/d.jsonl", tmp_path, PRIVATE_OK) == ROWS
    assert lookups == ["datasets.example"]
    assert Handler.hosts == [f"datasets.example:{port}"]  # the Host header still names the host


# -- refused ------------------------------------------------------------------------------------


def test_loopback_server_is_refused_as_private(tmp_path: Path, server: str) -> None:
    Handler.hosts.clear()
    refused = r"127\.0\.0\.1, not a public address \(loopback\).*HTTP_DATASET_ALLOW_PRIVATE"
    with pytest.raises(DatasetSourceInvalid, match=refused):
        load(f"{server}/d.jsonl", tmp_path, ON)
    port = server.rsplit(":", 1)[1]
    with pytest.raises(DatasetSourceInvalid, match="loopback"):
        load(f"http://localhost:{port}/d.jsonl", tmp_path, ON)
    assert Handler.hosts == []


@pytest.mark.parametrize(
    ("uri", "why"),
    [("http://[::1]/d.jsonl", "loopback"), ("http://0.0.0.0/d.jsonl", "unspecified"),
     ("http://169.254.169.254/latest/meta-data/", "link-local"), ("http://10.0.0.1/d.jsonl", "private"),
     ("https://192.168.1.10:8443/d.jsonl", "private"), ("http://172.16.0.1/d.jsonl", "private"),
     ("http://100.64.0.1/d.jsonl", "non-global"), ("http://224.0.0.1/d.jsonl", "multicast"),
     ("http://240.0.0.1/d.jsonl", "reserved|private"), ("http://[fe80::1]/d.jsonl", "link-local"),
     ("http://[fc00::1]/d.jsonl", "private"), ("http://[::]/d.jsonl", "unspecified"),
     ("http://[::ffff:127.0.0.1]/d.jsonl", "loopback.*embedded"),
     ("http://[::ffff:169.254.169.254]/d.jsonl", "link-local.*embedded"),
     ("http://[2002:a00:1::1]/d.jsonl", "private.*embedded"), ("http://[64:ff9b::7f00:1]/d.jsonl", "loopback.*embedded"),
     ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/d.jsonl", "private|Teredo"),
     # Shorthand IPv4 forms: the resolver turns them into 127.0.0.1 without any DNS traffic.
     ("http://2130706433/d.jsonl", "loopback"), ("http://127.1/d.jsonl", "loopback"),
     ("http://0x7f.0.0.1/d.jsonl", "loopback")],
)  # fmt: skip
def test_non_public_addresses_are_refused_without_connecting(
    tmp_path: Path, uri: str, why: str, no_connections: list
) -> None:
    with pytest.raises(DatasetSourceInvalid, match=why):
        load(uri, tmp_path, ON)
    assert no_connections == []


@pytest.mark.parametrize(
    "uri", ["http://[::1]/", "http://0.0.0.0/", "http://169.254.169.254/", "http://10.0.0.1/", "http://[::ffff:10.0.0.1]/"]
)
def test_ip_literals_are_judged_before_any_lookup(tmp_path: Path, uri: str, no_connections: list,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    def no_lookup(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"getaddrinfo{args} was called")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    with pytest.raises(DatasetSourceInvalid, match=r"not a public address \((loopback|private|link-local|unspecified|reserved)"):
        load(uri, tmp_path, ON)
    assert no_connections == []


def test_refused_when_any_resolved_address_is_private(
    tmp_path: Path, no_connections: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    def resolve(host: str, port: int, *args: object, **kwargs: object) -> list:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", port))]  # fmt: skip

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    with pytest.raises(DatasetSourceInvalid, match=r"10\.1\.2\.3, not a public address \(private\)"):
        load("https://mixed.example/d.jsonl", tmp_path, ON)
    assert no_connections == []


@pytest.mark.parametrize("uri", ["http://user:pw@127.0.0.1/d.jsonl", "https://user@datasets.example/d.jsonl",
                                 "http://:secret@10.0.0.1/"])  # fmt: skip
def test_credentials_in_the_url_are_refused(tmp_path: Path, uri: str, no_connections: list) -> None:
    with pytest.raises(DatasetSourceInvalid, match="credentials") as caught:
        load(uri, tmp_path, PRIVATE_OK)
    assert "pw" not in str(caught.value) and "secret" not in str(caught.value)
    assert no_connections == []


@pytest.mark.parametrize("uri", ["http:///d.jsonl", "http://exa mple.com/d.jsonl", "http://127.0.0.1:99999/d.jsonl"])
def test_malformed_urls_are_refused(tmp_path: Path, uri: str, no_connections: list) -> None:
    with pytest.raises(DatasetSourceInvalid):
        load(uri, tmp_path, PRIVATE_OK)
    assert no_connections == []


def test_redirect_is_refused_not_followed(tmp_path: Path, server: str) -> None:
    Handler.hosts.clear()
    with pytest.raises(DatasetSourceInvalid, match=r"302.*redirect to '/d\.jsonl'.*not followed"):
        load(f"{server}/redirect.jsonl", tmp_path, PRIVATE_OK)
    assert len(Handler.hosts) == 1


@pytest.mark.parametrize("path", ["/big-declared.jsonl", "/big-streamed.jsonl"])
def test_too_large_is_refused(tmp_path: Path, server: str, path: str) -> None:
    small = HttpPolicy(enabled=True, allow_private=True, max_bytes=len(JSONL) * 10)
    with pytest.raises(DatasetSourceInvalid, match=f"larger than the {len(JSONL) * 10} bytes.*HTTP_DATASET_MAX_BYTES"):
        load(f"{server}{path}", tmp_path, small)
    roomy = HttpPolicy(enabled=True, allow_private=True, max_bytes=len(JSONL) * 100)
    assert load(f"{server}{path}", tmp_path, roomy) == ROWS * 100


def test_error_status_is_refused(tmp_path: Path, server: str) -> None:
    with pytest.raises(DatasetSourceInvalid, match="answered HTTP 404"):
        load(f"{server}/missing.jsonl", tmp_path, PRIVATE_OK)


def test_encoded_body_is_refused(tmp_path: Path, server: str) -> None:
    with pytest.raises(DatasetSourceInvalid, match="Content-Encoding 'gzip'"):
        load(f"{server}/gzip.jsonl", tmp_path, PRIVATE_OK)


@pytest.mark.parametrize(("path", "match"), [("/stall.jsonl", "did not answer within 0.5 s"),
                                             ("/drip.jsonl", "took longer than 0.5 s")])  # fmt: skip
def test_timeouts(tmp_path: Path, server: str, path: str, match: str) -> None:
    quick = HttpPolicy(enabled=True, allow_private=True, timeout_seconds=0.5)
    started = time.monotonic()
    with pytest.raises(DatasetSourceInvalid, match=match):
        load(f"{server}{path}", tmp_path, quick)
    assert time.monotonic() - started < 2


def test_connection_refused_is_reported(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(DatasetSourceInvalid, match="could not be fetched"):
            load(f"http://127.0.0.1:{port}/d.jsonl", tmp_path, PRIVATE_OK)


# -- https: the pinned connection still verifies the certificate against the URL's host ---------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """An https server on 127.0.0.1 whose self-signed certificate names only datasets.example."""
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=datasets.example",
         "-addext", "subjectAltName=DNS:datasets.example", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"{httpd.server_address[1]}", cert
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def trust_test_cert(tls_server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolve every name to 127.0.0.1 and trust the test certificate (and nothing else matters here)."""
    import ssl

    real_context, real_resolve = ssl.create_default_context, socket.getaddrinfo

    def context(*args: object, **kwargs: object) -> ssl.SSLContext:
        made = real_context(*args, **kwargs)  # type: ignore[arg-type]
        made.load_verify_locations(cafile=str(tls_server[1]))
        return made

    monkeypatch.setattr(ssl, "create_default_context", context)
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: real_resolve("127.0.0.1", *a, **k))


def test_https_verifies_the_url_host_over_the_pinned_address(
    tmp_path: Path, tls_server: tuple[str, Path], trust_test_cert: None
) -> None:
    port = tls_server[0]
    Handler.hosts.clear()
    assert load(f"https://datasets.example:{port}/d.csv", tmp_path, PRIVATE_OK) == CSV_ROWS
    assert Handler.hosts == [f"datasets.example:{port}"]
    with pytest.raises(DatasetSourceInvalid, match=r"could not be fetched.*(certificate|hostname)"):
        load(f"https://other.example:{port}/d.csv", tmp_path, PRIVATE_OK)  # same address, wrong name
    with pytest.raises(DatasetSourceInvalid, match="could not be fetched"):
        load(f"https://127.0.0.1:{port}/d.csv", tmp_path, PRIVATE_OK)  # the certificate names no IP
