"""The transport: the address guard and Retry-After parsing on their own, then real requests
to receivers on loopback (HTTPS behind a private CA, names, methods, a thousand-plus in flight,
read deadlines)."""

import asyncio
import ipaddress
import json
import os
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pycurl
import pytest
import trustme

from delivery import transport as transport_module
from delivery.address_policy import embedded_ipv4, is_allowed_address, refusal
from delivery.transport import (
    Limits,
    Request,
    Response,
    Transport,
    _Slot,
    parse_retry_after,
)
from postbackproject.settings import BASE_DIR
from tests.conftest import Receiver, Reply, wait_until

ALLOW_LOOPBACK = [ipaddress.ip_network("127.0.0.0/8")]


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # carrier-grade NAT
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
    ],
)
def test_non_public_addresses_are_refused(address):
    assert not is_allowed_address(ipaddress.ip_address(address), [])


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "::ffff:93.184.216.34"])
def test_public_addresses_are_allowed(address):
    assert is_allowed_address(ipaddress.ip_address(address), [])


@pytest.mark.parametrize(
    "address",
    [
        "::127.0.0.1",  # IPv4-compatible
        "::ffff:0:127.0.0.1",  # SIIT's IPv4-translated
        "64:ff9b::127.0.0.1",  # NAT64: a gateway on the way connects to 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254, the cloud metadata
        "64:ff9b:1::7f00:1",  # NAT64 local use: where the IPv4 address sits is the operator's choice
        "64:ff9b:1:7f00:1::",
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:a00:1::1",  # 6to4 of 10.0.0.1
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
        "192.0.0.8",  # IETF protocol assignments (192.0.0.0/24)
        "192.0.0.170",
        "198.18.0.1",  # benchmarking
        "192.88.99.1",  # 6to4 relay anycast
        "240.0.0.1",
        "255.255.255.255",
        "fec0::1",  # site-local (deprecated)
        "100::1",  # discard-only
        "2001:db8::1",  # documentation
        "3fff::1",  # documentation
        "4000::1",  # outside global unicast (2000::/3)
        "::",
    ],
)
def test_special_ranges_and_ipv6_forms_that_carry_a_private_ipv4_address_are_refused(address):
    assert not is_allowed_address(ipaddress.ip_address(address), [])


@pytest.mark.parametrize(
    "address", ["::93.184.216.34", "::ffff:0:93.184.216.34", "64:ff9b::93.184.216.34", "2002:5db8:d822::1"]
)
def test_ipv6_forms_that_carry_a_public_ipv4_address_are_allowed(address):
    assert embedded_ipv4(ipaddress.ip_address(address)) == ipaddress.IPv4Address("93.184.216.34")
    assert is_allowed_address(ipaddress.ip_address(address), [])


def test_the_refusal_names_the_ipv4_address_an_ipv6_form_carries():
    assert refusal(ipaddress.ip_address("64:ff9b::7f00:1")) == (
        "destination address 64:ff9b::7f00:1 is not public and not in DELIVERY_ALLOW_NETWORKS "
        "(it carries the IPv4 address 127.0.0.1)"
    )


def test_an_allowed_ipv4_network_does_not_open_the_ipv6_forms_that_carry_it():
    for address in ["::127.0.0.1", "64:ff9b::127.0.0.1", "2002:7f00:1::1"]:
        assert not is_allowed_address(ipaddress.ip_address(address), ALLOW_LOOPBACK)
    assert is_allowed_address(ipaddress.ip_address("64:ff9b::a00:1"), [ipaddress.ip_network("64:ff9b::a00:0/104")])


def test_allowed_networks_open_private_ranges_they_cover_only():
    assert is_allowed_address(ipaddress.ip_address("127.0.0.5"), ALLOW_LOOPBACK)
    assert is_allowed_address(ipaddress.ip_address("::ffff:127.0.0.1"), ALLOW_LOOPBACK)
    assert not is_allowed_address(ipaddress.ip_address("10.0.0.1"), ALLOW_LOOPBACK)


NOW = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("Sun, 29 Nov 2026 12:01:30 GMT", 90.0),
        ("Sun, 29 Nov 2026 11:00:00 GMT", 0.0),
        ("soon", None),
        ("-5", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_takes_seconds_or_a_date(header, seconds):
    assert parse_retry_after(header, NOW) == seconds


# --- against real receivers ------------------------------------------------------------------

LIMITS = Limits(connect_timeout=5, read_timeout=10, total_timeout=30, body_max_bytes=1000)


def deliver(transport: Transport, requests: list[Request], limits: Limits = LIMITS) -> dict[object, Response]:
    """Send every request and drive the loop until each has an outcome (keyed by its index)."""
    for index, request in enumerate(requests):
        transport.start(request, limits, token=index)
    outcomes: dict[object, Response] = {}

    def all_in() -> bool:
        outcomes.update(transport.poll(0.05))
        return len(outcomes) == len(requests)

    wait_until(all_in, timeout=60, what="every request's outcome")
    return outcomes


def get(url: str, postback_id: str = "p") -> Request:
    return Request(postback_id, 1, "GET", url, None)


@pytest.fixture
def transport() -> Iterator[Transport]:
    made = Transport(tuple(ALLOW_LOOPBACK))
    yield made
    made.close()


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def https_receiver(authority) -> Iterator[Receiver]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    server = Receiver(tls=context)
    yield server
    server.close()


@pytest.fixture
def ca_bundle(authority, tmp_path) -> str:
    path = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return str(path)


def test_an_https_receiver_behind_a_private_ca_is_reached_with_the_ca_bundle(https_receiver, ca_bundle):
    transport = Transport(tuple(ALLOW_LOOPBACK), ca_bundle)
    try:
        outcomes = deliver(transport, [get(https_receiver.url("/tls"))])
    finally:
        transport.close()

    assert outcomes[0].status == 200
    assert https_receiver.targets == ["/tls"]


def test_a_certificate_the_service_does_not_trust_fails_for_good(transport, https_receiver):
    [outcome] = deliver(transport, [get(https_receiver.url("/tls"))]).values()

    assert outcome.status is None
    assert outcome.error.startswith("TLS certificate not accepted: ")
    assert not outcome.transient  # never retried: sending again changes nothing
    assert https_receiver.requests == []


def test_a_certificate_for_another_name_fails_for_good(ca_bundle, authority):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("other.example").configure_cert(context)
    receiver = Receiver(tls=context)
    transport = Transport(tuple(ALLOW_LOOPBACK), ca_bundle)
    try:
        [outcome] = deliver(transport, [get(receiver.url("/tls"))]).values()
    finally:
        transport.close()
        receiver.close()

    assert outcome.error.startswith("TLS certificate not accepted: ")
    assert not outcome.transient


def test_tls_sessions_are_resumed_on_new_connections(https_receiver, ca_bundle, monkeypatch):
    """A receiver that closes each connection makes every request a new one. After one full
    handshake, later ones resume its session, also on handles that never connected before and
    belong to another multi handle (with one request a shard, two at once use two)."""
    monkeypatch.setattr(transport_module, "CONNECTIONS_PER_SHARD", 1)
    https_receiver.default = Reply(headers={"Connection": "close"})
    transport = Transport(tuple(ALLOW_LOOPBACK), ca_bundle, concurrency=2)
    try:
        deliver(transport, [get(https_receiver.url("/first"))])
        deliver(transport, [get(https_receiver.url("/second")), get(https_receiver.url("/third"))])
    finally:
        transport.close()

    reused = {request.target: request.tls_session_reused for request in https_receiver.requests}
    assert reused == {"/first": False, "/second": True, "/third": True}


def test_a_name_that_does_not_resolve_is_a_transient_failure_saying_so(transport):
    limits = Limits(connect_timeout=3, read_timeout=10, total_timeout=30, body_max_bytes=100)
    [outcome] = deliver(transport, [get("http://no-such-host.invalid/x")], limits).values()

    assert outcome.status is None
    assert outcome.error.startswith("name not resolved")
    assert outcome.transient


@pytest.mark.parametrize(
    "raw",
    [
        b"not HTTP at all\r\n\r\n",
        b"\x00\x01\x02\x03",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
    ],
    ids=["text", "binary", "another-protocol", "header-without-colon"],
)
def test_a_reply_that_is_not_http_is_a_transient_protocol_error_and_a_url_that_cannot_be_sent_is_not(
    transport, receiver, raw
):
    receiver.answer(Reply(raw=raw))
    outcomes = deliver(transport, [get(receiver.url("/garbled")), get("gopher2://127.0.0.1/x")])
    garbled, unsendable = outcomes[0], outcomes[1]

    assert garbled.status is None
    assert garbled.error.startswith("protocol error: the reply is not HTTP (")
    assert garbled.transient
    assert receiver.targets == ["/garbled"]
    assert unsendable.error.startswith("invalid URL: ")
    assert not unsendable.transient


def test_one_handle_carries_any_sequence_of_methods_without_leftovers(receiver):
    """Handles are reused without a reset: each request sets only what differs, so a POST's
    body, or a PUT's method, must not leak into the next request on the same handle."""
    transport = Transport(tuple(ALLOW_LOOPBACK))
    sequence = [
        Request("a", 1, "POST", receiver.url("/a"), b'{"a":1}'),
        Request("b", 1, "GET", receiver.url("/b"), None),
        Request("c", 1, "PUT", receiver.url("/c"), b'{"c":3}'),
        Request("d", 1, "DELETE", receiver.url("/d"), None),
        Request("e", 1, "PATCH", receiver.url("/e"), b"{}"),
        Request("f", 1, "GET", receiver.url("/f"), None),
        Request("g", 1, "POST", receiver.url("/g"), None),
    ]
    try:
        for request in sequence:  # one at a time: the same handle each time
            deliver(transport, [request])
    finally:
        transport.close()

    seen = [(r.method, r.target, r.body, r.headers.get("Content-Type")) for r in receiver.requests]
    assert seen == [
        ("POST", "/a", b'{"a":1}', "application/json"),
        ("GET", "/b", b"", None),
        ("PUT", "/c", b'{"c":3}', "application/json"),
        ("DELETE", "/d", b"", None),
        ("PATCH", "/e", b"{}", "application/json"),
        ("GET", "/f", b"", None),
        ("POST", "/g", b"", "application/json"),
    ]


class HoldingServer:
    """An asyncio HTTP server in a thread that holds every request until released: it shows
    how many requests a client has in flight at once."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.holding = 0
        self.released = asyncio.Event()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=4096))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        self.holding += 1
        await self.released.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    def release(self) -> None:
        self.loop.call_soon_threadsafe(self.released.set)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop)
        self.thread.join(10)
        self.loop.close()

    async def _stop(self) -> None:
        """Cancel the requests still held (their clients are gone), then stop the loop."""
        held = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        self.loop.stop()


def test_more_requests_than_select_could_watch_are_in_flight_at_once():
    """1,100 requests out together (select() stops at descriptor 1,024): the server holds them
    all at the same time, then every one is answered."""
    count = 1100
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 3 * count:
        pytest.skip(f"needs {3 * count} open files (client and server ends here); the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 3 * count), hard))
    server = HoldingServer()
    transport = Transport(tuple(ALLOW_LOOPBACK), concurrency=count)
    try:
        for index in range(count):
            transport.start(get(f"http://127.0.0.1:{server.port}/{index}", str(index)), LIMITS, token=index)

        def all_held() -> bool:
            transport.poll(0.05)
            return server.holding == count

        wait_until(all_held, timeout=60, what=f"the server to hold {count} requests at once")
        assert transport.in_flight == count
        server.release()
        outcomes: dict[object, Response] = {}

        def all_answered() -> bool:
            outcomes.update(transport.poll(0.05))
            return len(outcomes) == count

        wait_until(all_answered, timeout=60, what="every answer")
    finally:
        transport.close()
        server.close()

    assert {outcome.status for outcome in outcomes.values()} == {200}


def test_a_read_deadline_is_looked_at_when_it_falls_not_on_every_turn(receiver, monkeypatch):
    """Among requests in flight, only the one whose read timeout falls is looked at; the loop
    does not walk the others each turn to find it."""
    looked_at: list[str] = []
    check = _Slot.read_deadline

    def counting(slot: _Slot, now: float) -> float | None:
        looked_at.append(slot.request.postback_id)
        return check(slot, now)

    monkeypatch.setattr(_Slot, "read_deadline", counting)
    server = HoldingServer()
    transport = Transport(tuple(ALLOW_LOOPBACK))
    quick = Limits(connect_timeout=5, read_timeout=0.3, total_timeout=30, body_max_bytes=100)
    try:
        for index in range(50):
            transport.start(get(f"http://127.0.0.1:{server.port}/{index}", f"slow-{index}"), LIMITS, token=index)
        transport.start(get(f"http://127.0.0.1:{server.port}/quick", "quick"), quick, token="quick")
        outcomes: dict[object, Response] = {}

        def quick_timed_out() -> bool:
            outcomes.update(transport.poll(0.05))
            return "quick" in outcomes

        wait_until(quick_timed_out, timeout=20, what="the short read timeout")
    finally:
        server.release()
        transport.close()
        server.close()

    assert outcomes["quick"].error == "read timeout"
    assert set(looked_at) == {"quick"}  # the 50 with 10 s deadlines were never looked at


# A transport in a process of its own whose /etc/resolv.conf names a server that never
# answers: one request to a name there, five to an address. Prints each outcome as it lands.
_SILENT_RESOLVER_CLIENT = """
import ipaddress, json, sys, time
import django
django.setup()
from delivery.transport import Limits, Request, Transport
port = sys.argv[1]
transport = Transport((ipaddress.ip_network("127.0.0.0/8"),))
limits = Limits(connect_timeout=4, read_timeout=10, total_timeout=30, body_max_bytes=100)
transport.start(Request("named", 1, "GET", f"http://slow.example.test:{port}/n", None), limits, token="named")
for index in range(5):
    transport.start(Request(str(index), 1, "GET", f"http://127.0.0.1:{port}/{index}", None), limits, token=str(index))
landed = []
deadline = time.monotonic() + 30
while len(landed) < 6 and time.monotonic() < deadline:
    for token, response in transport.poll(0.05):
        landed.append([token, response.status, response.error, response.transient])
print(json.dumps(landed))
"""


def test_a_name_server_that_never_answers_holds_up_only_the_postbacks_to_its_names(receiver, tmp_path):
    """Names resolve on libcurl's resolver threads: while one name waits on a silent name
    server, requests to other hosts go out and come back; the named one then fails as
    "name not resolved", to be retried."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to give a process a resolv.conf of its own")
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # reads queries, answers none
    try:
        silent.bind(("127.0.0.53", 53))
    except OSError as exc:
        pytest.skip(f"cannot listen on 127.0.0.53:53 for the silent name server: {exc}")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.53\noptions timeout:2 attempts:1\n")
    script = tmp_path / "client.py"
    script.write_text(_SILENT_RESOLVER_CLIENT)
    command = f'mount --bind "{resolv}" /etc/resolv.conf && exec "{sys.executable}" "{script}" {receiver.port}'
    try:
        done = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", command],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=BASE_DIR,
            env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PYTHONPATH": str(BASE_DIR)},
        )
    finally:
        silent.close()
    if done.returncode != 0 and "unshare" in done.stderr:
        pytest.skip(f"unshare refused: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    landed = json.loads(done.stdout.strip().splitlines()[-1])

    assert sorted(token for token, *_ in landed[:5]) == ["0", "1", "2", "3", "4"]  # first, all of them
    assert [status for _, status, *_ in landed[:5]] == [200] * 5
    named = landed[5]
    assert named[0] == "named"
    assert named[1] is None
    assert named[2].startswith("name not resolved")
    assert named[3] is True  # transient: retried later


def test_a_socket_libcurl_let_go_of_while_acting_on_another_is_skipped(monkeypatch):
    """Events come in batches: acting on one socket can make libcurl close another whose event
    is further down the same batch (its cache full, it closes the oldest idle connection)."""
    transport = Transport(tuple(ALLOW_LOOPBACK))
    first, first_peer = socket.socketpair()
    second, second_peer = socket.socketpair()
    shard = transport._shards[0]
    first_fd, second_fd = first.fileno(), second.fileno()
    acted: list[int] = []

    def act(fd: int, flags: int) -> None:
        acted.append(fd)
        if fd == first_fd:  # libcurl lets go of the second socket meanwhile
            transport.watch_socket(shard, pycurl.POLL_REMOVE, second_fd)

    try:
        for ours, peer in ((first, first_peer), (second, second_peer)):
            transport.watch_socket(shard, pycurl.POLL_IN, ours.fileno())
            peer.send(b"x")  # both readable: one batch
        monkeypatch.setattr(shard, "act", act)
        transport._active[object()] = None  # type: ignore[index, assignment]  # in flight: poll looks
        transport.poll(0)
    finally:
        transport._active.clear()
        transport.close()
        for sock in (first, first_peer, second, second_peer):
            sock.close()

    assert acted in ([first_fd], [second_fd, first_fd])  # the second only if its event came first


def test_a_host_keeps_to_its_own_shard_until_it_has_a_shards_worth_in_flight(monkeypatch):
    """Its idle connections are then where its next request looks for them, and libcurl's
    search for one covers at most a shard's worth."""
    monkeypatch.setattr(transport_module, "CONNECTIONS_PER_SHARD", 2)
    server = HoldingServer()
    transport = Transport(tuple(ALLOW_LOOPBACK), concurrency=8)  # four shards
    try:
        for index in range(5):
            transport.start(get(f"http://127.0.0.1:{server.port}/{index}", str(index)), LIMITS, token=index)
        shards = [transport._shards.index(slot.shard) for slot in transport._active.values()]
    finally:
        server.release()
        transport.close()
        server.close()

    assert shards[0] == shards[1]
    assert shards[2] == shards[3] == (shards[0] + 1) % 4
    assert shards[4] == (shards[0] + 2) % 4


def test_replies_are_read_before_a_handle_with_no_room_to_wait_is_closed(monkeypatch, refused_url):
    """With one idle handle a shard at most, the second and third of three failed requests
    have their handles closed: their errors are read first."""
    monkeypatch.setattr(transport_module, "CONNECTIONS_PER_SHARD", 1)
    transport = Transport(tuple(ALLOW_LOOPBACK), concurrency=1)
    try:
        outcomes = deliver(transport, [get(refused_url, str(index)) for index in range(3)])
    finally:
        transport.close()

    assert {outcome.error for outcome in outcomes.values()} == {"connection error: [Errno 111] Connection refused"}


class Landed:
    """What giving a place back needs of a slot."""

    def __init__(self, host: str, step: int) -> None:
        self.host, self.step = host, step


def test_a_request_that_lands_frees_its_place_for_the_next_request_to_its_host(monkeypatch):
    """The next request goes where the landed one's connection now waits idle, not to a shard
    picked by how many are out at that moment."""
    monkeypatch.setattr(transport_module, "CONNECTIONS_PER_SHARD", 2)
    transport = Transport(tuple(ALLOW_LOOPBACK), concurrency=8)
    try:
        assert [transport._take_a_place("h") for _ in range(5)] == [0, 0, 1, 1, 2]
        transport._give_back_the_place(Landed("h", 0))  # type: ignore[arg-type]
        assert transport._take_a_place("h") == 0
        for step in (0, 0, 1, 1, 2):
            transport._give_back_the_place(Landed("h", step))  # type: ignore[arg-type]
        assert "h" not in transport._host_in_flight  # nothing kept for a host with nothing out
    finally:
        transport.close()
