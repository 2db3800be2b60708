"""One caller's state-changing calls run two at a time (``api/gate.py`` ``WRITES_PER_CALLER``),
shown against a real ``posttrain serve`` over real sockets: while two of alice's registrations
hold her slots (their bodies still coming), her third write waits, bob's write and alice's own
status reads and chats do not, and the third runs as soon as one of the first two ends."""

from __future__ import annotations

import time

import httpx
import pytest

from posttrain.services.access import digest
from tests.conftest import start_server, stop_server
from tests.integration.test_access import ALICE, BOB, as_
from tests.integration.test_edge_limits import client_from, connect_from

#: Each side speaks from a loopback address of its own.
ALICE_ADDRESS, BOB_ADDRESS = "127.0.0.31", "127.0.0.32"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_path):
    home = tmp_path_factory.mktemp("write-slots-home")
    keys = home / "keys"
    keys.write_text(f"alice:{digest(ALICE)}\nbob:{digest(BOB)}\n")
    server = start_server(home, tiny_model_path, extra_env={
        "POSTTRAIN_WORKER_SLOTS": "0", "POSTTRAIN_API_KEYS_FILE": str(keys),
        "POSTTRAIN_BODY_TIMEOUT_SECONDS": "60"})  # the held bodies stay held for the whole test
    yield server
    stop_server(server)


def _hold_a_registration(server):
    """A registration of alice's whose headers are sent and whose body never finishes."""
    sock = connect_from(ALICE_ADDRESS, server)
    host = server.base_url.removeprefix("http://")
    sock.sendall(f"POST /v1/datasets HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {ALICE}\r\n"
                 "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"purpose\": ".encode())
    return sock


def _unregister(client: httpx.Client, key: str, timeout: float) -> httpx.Response:
    return client.delete("/v1/datasets/no-such-dataset", headers=as_(key), timeout=timeout)


def test_a_callers_third_write_waits_for_one_of_its_two_while_others_go_on(server):
    alice, bob = client_from(ALICE_ADDRESS, server), client_from(BOB_ADDRESS, server)
    held = [_hold_a_registration(server), _hold_a_registration(server)]
    try:
        time.sleep(0.5)  # both are inside, reading their bodies
        with pytest.raises(httpx.ReadTimeout):
            _unregister(alice, ALICE, timeout=2.0)

        started = time.monotonic()
        assert _unregister(bob, BOB, timeout=10).status_code == 404  # bob's slots are his own
        status = alice.get("/v1/post-training/jobs", headers=as_(ALICE), timeout=10)  # reads take no slot
        assert status.status_code == 200, status.text
        assert time.monotonic() - started < 5

        held.pop().close()  # one of alice's two ends: her next write goes in
        answer = _unregister(alice, ALICE, timeout=10)
        assert answer.status_code == 404 and "no-such-dataset" in answer.text
    finally:
        for sock in held:
            sock.close()
        alice.close()
        bob.close()
    listed = client_from(ALICE_ADDRESS, server).get("/v1/datasets", headers=as_(ALICE), timeout=10)
    assert listed.status_code == 200 and listed.json()["data"] == []  # the held registrations made nothing
