"""Nobody without a key can stall or exhaust the server (issue 12, class 1), shown against real
``posttrain serve`` processes over real sockets: big bodies on open paths are refused before they
are read, big JSON bodies are parsed off the event loop, idle and slow connections are closed,
one address cannot hold every connection, and callers without a (valid) key have rate limits of
their own address. Loopback has many addresses (127.0.0.2, …), so each test speaks from its own."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from posttrain.services.access import digest
from tests.conftest import start_server, stop_server
from tests.integration.test_access import ALICE, BOB, as_
from tests.integration.test_api import assert_problem

HEADER_SECONDS, BODY_SECONDS, KEEP_ALIVE_SECONDS = 3.0, 3.0, 1.0
PER_ADDRESS, FAILED_AUTH, SIGN_INS = 8, 5, 3


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, tiny_model_path):
    """A real ``posttrain serve`` with API keys, short connection timeouts and small per-address limits."""
    home = tmp_path_factory.mktemp("edge-home")
    keys = home / "keys"
    keys.write_text(f"alice:{digest(ALICE)}\n")
    server = start_server(home, tiny_model_path, extra_env={
        "POSTTRAIN_WORKER_SLOTS": "0", "POSTTRAIN_API_KEYS_FILE": str(keys),
        "POSTTRAIN_HEADER_TIMEOUT_SECONDS": str(HEADER_SECONDS), "POSTTRAIN_BODY_TIMEOUT_SECONDS": str(BODY_SECONDS),
        "POSTTRAIN_KEEP_ALIVE_SECONDS": str(KEEP_ALIVE_SECONDS), "POSTTRAIN_CONNECTIONS_PER_ADDRESS": str(PER_ADDRESS),
        "POSTTRAIN_FAILED_AUTH_PER_MINUTE": str(FAILED_AUTH), "POSTTRAIN_SIGN_IN_ATTEMPTS_PER_MINUTE": str(SIGN_INS),
        # The big-body tests below send 60+ MB as alice; the body budget has its own test and server.
        "POSTTRAIN_BODY_BYTES_PER_MINUTE": str(1 << 30)})
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def keyless_server(tmp_path_factory, tiny_model_path):
    """A real keyless ``posttrain serve`` (the default) with a rate limit."""
    home = tmp_path_factory.mktemp("edge-keyless-home")
    server = start_server(home, tiny_model_path, extra_env={
        "POSTTRAIN_WORKER_SLOTS": "0", "POSTTRAIN_RATE_LIMIT_PER_MINUTE": "3"})
    yield server
    stop_server(server)


def client_from(address: str, server) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, timeout=30,
                        transport=httpx.HTTPTransport(local_address=address))


def connect_from(address: str, server) -> socket.socket:
    host, port = server.base_url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.bind((address, 0))
    sock.connect((host, int(port)))
    return sock


def seconds_until_closed(sock: socket.socket, limit: float = 15.0, trickle: bytes = b"") -> float:
    """How long until the server closes ``sock`` (reading and dropping whatever it answers), while
    sending ``trickle`` every 0.2 s if given."""
    started = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - started < limit:
        try:
            if not sock.recv(65536):
                return time.monotonic() - started
        except TimeoutError:
            pass
        except ConnectionResetError:
            return time.monotonic() - started
        if trickle:
            try:
                sock.sendall(trickle)
            except OSError:  # broken pipe or reset: the server closed it
                return time.monotonic() - started
    pytest.fail(f"the server kept the connection open for {limit} s")


def rows_body(dataset_id: str, rows: list[bytes]) -> bytes:
    """A registration body of these JSON rows (joined as bytes: json.dumps of a big list is slow)."""
    head = json.dumps({"purpose": "post-training/messages", "dataset_id": dataset_id, "source": {"type": "rows"}})
    return head[:-2].encode() + b', "rows": [' + b", ".join(rows) + b"]}}"


class HealthProbe:
    """Times ``/healthz`` over and over from another thread while the test does something heavy."""

    def __init__(self, server) -> None:
        self.server, self.slowest, self._stop = server, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with client_from("127.0.0.9", self.server) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                answered = client.get("/healthz", headers={"Connection": "close"}).status_code == 200
                self.slowest = max(self.slowest, time.monotonic() - started if answered else float("inf"))
                time.sleep(0.02)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def assert_never_stalled(self, took: float) -> None:
        """/healthz kept answering while a big request took ``took`` seconds.

        The bound is relative to the big request's own time, so it holds on a slow or loaded
        machine (CI's two busy cores make every answer slower, the big request as much): with the
        work on the event loop, as before the fix, /healthz waited through all of a refused
        parse and through about a quarter of a registration; off the loop its slowest answer is
        a small fraction of either. Under a sixth of ``took``, with a 0.5 s floor for a request
        that is itself quick (a refusal before the body is read)."""
        print(f"slowest /healthz {self.slowest:.3f} s during a {took:.3f} s request")
        assert self.slowest < max(0.5, took / 6), (self.slowest, took)


def test_a_60_mb_sign_in_form_is_refused_before_it_is_read_while_healthz_answers(keyed_server):
    form = b"api_key=" + b"a" * (60 * 1024 * 1024)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    with HealthProbe(keyed_server) as probe, client_from("127.0.0.7", keyed_server) as client:
        started = time.monotonic()
        refused = client.post("/ui/login", content=form, headers=headers)
        took = time.monotonic() - started
    assert_problem(refused, 413, "16384 bytes")
    assert took < 5, took
    probe.assert_never_stalled(took)

    # Without a length (chunked) it is read only up to the limit.
    with client_from("127.0.0.7", keyed_server) as client:
        chunked = client.post("/ui/login", content=iter([b"api_key=", b"a" * 65536, b"a" * 65536]), headers=headers)
    assert_problem(chunked, 413, "16384 bytes")


def test_a_big_json_body_is_parsed_off_the_event_loop(keyed_server):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    last = 200_000  # a NaN in the last row: found only after every row before it is checked
    body = rows_body("big", [json.dumps(row).encode()] * last + [b'{"messages": [], "score": NaN}'])
    assert 15e6 < len(body)
    with HealthProbe(keyed_server) as probe, client_from("127.0.0.8", keyed_server) as client:
        started = time.monotonic()
        refused = client.post("/v1/datasets", content=body,
                              headers={**as_(ALICE), "Content-Type": "application/json"})
        took = time.monotonic() - started
    assert_problem(refused, 400, f"source.rows.{last}.score")
    probe.assert_never_stalled(took)


def test_a_46_mb_registration_does_not_stall_the_event_loop(keyed_server):
    row = {"messages": [{"role": "user", "content": "question " * 25}, {"role": "assistant", "content": "answer " * 25}]}
    body = rows_body("big-ok", [json.dumps(row).encode()] * 98_000)
    assert len(body) > 46e6
    with HealthProbe(keyed_server) as probe, client_from("127.0.0.8", keyed_server) as client:
        started = time.monotonic()
        registered = client.post("/v1/datasets", content=body, timeout=180,  # slow on a loaded machine: fine
                                 headers={**as_(ALICE), "Content-Type": "application/json"})
        took = time.monotonic() - started
    assert registered.status_code == 200, registered.text[:500]
    # Metadata only, as list and get answer: the rows are not sent back (they were, 46 MB of them).
    assert registered.json()["identifier"] == "big-ok" and registered.json()["source"] == {"type": "rows", "rows": []}
    assert len(registered.content) < 4096, len(registered.content)
    probe.assert_never_stalled(took)


BUDGET_BODY_BYTES = 1024 * 1024


@pytest.fixture(scope="module")
def budget_server(tmp_path_factory, tiny_model_path):
    """Keys for alice and bob; each key may send 2 MiB of bodies a minute, bursts of one 1 MiB body."""
    home = tmp_path_factory.mktemp("edge-budget-home")
    keys = home / "keys"
    keys.write_text(f"alice:{digest(ALICE)}\nbob:{digest(BOB)}\n")
    server = start_server(home, tiny_model_path, extra_env={
        "POSTTRAIN_WORKER_SLOTS": "0", "POSTTRAIN_API_KEYS_FILE": str(keys),
        "POSTTRAIN_MAX_BODY_BYTES": str(BUDGET_BODY_BYTES),
        "POSTTRAIN_BODY_BYTES_PER_MINUTE": str(2 * BUDGET_BODY_BYTES)})
    yield server
    stop_server(server)


def test_a_key_past_its_body_budget_is_refused_before_its_body_is_read(budget_server):
    """A tenant that streams big bodies at the server pays for them out of a byte budget: the
    body past it is answered 429 from its headers alone, and another key is not affected."""
    junk = b"x" * (BUDGET_BODY_BYTES - 4096)  # not JSON: cheap to refuse, but every byte is read
    with client_from("127.0.0.10", budget_server) as client:
        first = client.post("/v1/datasets", content=junk, headers={**as_(BOB), "Content-Type": "application/json"})
        assert first.status_code == 400, first.text  # read and refused as JSON: it was within the budget
        second = client.post("/v1/datasets", content=junk, headers={**as_(BOB), "Content-Type": "application/json"})
    assert_problem(second, 429, "request body bytes a minute with this key")
    assert 1 <= int(second.headers["Retry-After"]) <= 60

    # Refused from the headers: the server answers though not one byte of the body was sent.
    sock = connect_from("127.0.0.10", budget_server)
    sock.settimeout(10)
    sock.sendall(b"POST /v1/datasets HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + BOB.encode() + b"\r\nContent-Length: 1000000\r\n\r\n")
    answer = sock.recv(4096)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 429"), answer[:200]

    # A chunked body (no length) is counted as it is read.
    with client_from("127.0.0.10", budget_server) as client:
        chunked = client.post("/v1/datasets", content=iter([b"x" * 65536] * 4),
                              headers={**as_(BOB), "Content-Type": "application/json"})
    assert_problem(chunked, 429, "request body bytes a minute")

    with client_from("127.0.0.11", budget_server) as client:
        other = client.post("/v1/datasets", content=junk, headers={**as_(ALICE), "Content-Type": "application/json"})
    assert other.status_code == 400, other.text


def test_idle_and_slow_connections_are_closed(keyed_server):
    idle = connect_from("127.0.0.10", keyed_server)
    assert HEADER_SECONDS - 0.5 < seconds_until_closed(idle) < HEADER_SECONDS + 2

    # Headers sent a byte at a time are closed when their time is up, however steady the trickle.
    slow = connect_from("127.0.0.10", keyed_server)
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
    assert HEADER_SECONDS - 0.5 < seconds_until_closed(slow, trickle=b"X") < HEADER_SECONDS + 2

    # A body that stops half-way is closed after the body's idle time.
    stalled = connect_from("127.0.0.10", keyed_server)
    stalled.sendall(b"POST /v1/datasets HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer " + ALICE.encode()
                    + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"purpose\":")
    assert BODY_SECONDS - 0.5 < seconds_until_closed(stalled) < BODY_SECONDS + 2

    # Between requests a connection may idle for the keep-alive time only.
    kept = connect_from("127.0.0.10", keyed_server)
    kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    kept.settimeout(5)
    assert kept.recv(65536).startswith(b"HTTP/1.1 200")
    assert seconds_until_closed(kept) < KEEP_ALIVE_SECONDS + 2


def test_one_address_cannot_hold_every_connection(keyed_server):
    held = [connect_from("127.0.0.11", keyed_server) for _ in range(PER_ADDRESS)]
    try:
        extra = connect_from("127.0.0.11", keyed_server)
        extra.settimeout(HEADER_SECONDS)
        answer = extra.recv(65536)
        assert answer.startswith(b"HTTP/1.1 429"), answer
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["status"] == 429
        assert b"retry-after: 1" in answer.lower()
        extra.close()

        # Another address is not affected.
        with client_from("127.0.0.12", keyed_server) as other:
            assert other.get("/healthz").status_code == 200

        # Closing some makes room again.
        for sock in held[:2]:
            sock.close()
        time.sleep(0.3)
        with client_from("127.0.0.11", keyed_server) as again:
            assert again.get("/healthz").status_code == 200
    finally:
        for sock in held:
            sock.close()


def test_a_burst_of_wrong_keys_is_429_for_that_address_while_a_valid_key_works(keyed_server):
    wrong = as_("pt-guess")
    with client_from("127.0.0.2", keyed_server) as guesser, client_from("127.0.0.3", keyed_server) as other:
        for _ in range(FAILED_AUTH):
            assert_problem(guesser.get("/v1/datasets", headers=wrong), 401)
        limited = guesser.get("/v1/datasets", headers=wrong)
        assert_problem(limited, 429, f"{FAILED_AUTH} requests a minute without a valid API key")
        assert int(limited.headers["retry-after"]) >= 1
        assert_problem(guesser.get("/v1/datasets"), 429)  # no key at all counts the same
        assert guesser.get("/v1/datasets", headers=as_(ALICE)).status_code == 200
        assert_problem(other.get("/v1/datasets", headers=wrong), 401)


def test_sign_in_attempts_are_limited_per_address(keyed_server):
    form = {"api_key": "pt-guess", "csrf_token": "x"}
    with client_from("127.0.0.4", keyed_server) as guesser, client_from("127.0.0.5", keyed_server) as other:
        for _ in range(SIGN_INS):
            assert guesser.post("/ui/login", data=form).status_code == 403  # no CSRF cookie: refused by the page
        limited = guesser.post("/ui/login", data=form)
        assert_problem(limited, 429, f"{SIGN_INS} sign-in attempts a minute")
        assert "retry-after" in limited.headers
        assert other.post("/ui/login", data=form).status_code == 403


def test_without_keys_each_address_has_its_own_rate_limit(keyless_server):
    with client_from("127.0.0.2", keyless_server) as busy, client_from("127.0.0.3", keyless_server) as quiet:
        for _ in range(3):
            assert busy.get("/v1/datasets").status_code == 200
        limited = busy.get("/v1/datasets")
        assert quiet.get("/v1/datasets").status_code == 200  # one shared bucket gave everyone 429
        assert_problem(limited, 429, "3 requests a minute from this address")
        assert int(limited.headers["retry-after"]) >= 1


def test_limits_count_an_ipv6_host_by_its_64():
    from posttrain.services.access import address_key

    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert address_key("::ffff:10.0.0.1") == "10.0.0.1"
    assert address_key("127.0.0.2") != address_key("127.0.0.3")

