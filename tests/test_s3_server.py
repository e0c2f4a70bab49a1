"""Tests for the S3 test infrastructure: moto in a subprocess and the TCP fault-injection proxy."""

from __future__ import annotations

import os
import socket
import threading
import uuid
from typing import Any, Callable

import pytest

s3fs = pytest.importorskip("s3fs")
aiohttp = pytest.importorskip("aiohttp")
botocore_exceptions = pytest.importorskip("botocore.exceptions")

from s3_server import FaultProxy, MotoServer, make_bucket, s3_storage_options, upload_tree  # noqa: E402

# Generous bound for "did not hang": with the short timeouts below a failure surfaces in well under
# a second; s3fs's defaults (5 botocore attempts with back-off) take ~9 s.
HANG_GUARD_S = 10.0


def _fail_fast_fs(endpoint_url: str) -> Any:
    """A fresh s3fs filesystem with short timeouts and no retries, by botocore nor by s3fs."""
    fs = s3fs.S3FileSystem(**s3_storage_options(endpoint_url, connect_timeout_s=1.0, read_timeout_s=2.0,
                                                max_attempts=1), skip_instance_cache=True)
    fs.retries = 1  # s3fs's own retry loop (a class attribute, not a constructor argument)
    return fs


def _run_guarded(fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    """Run ``fn`` in a thread; fail the test if it is still blocked after HANG_GUARD_S."""
    outcome: list[Any] = [None, None]

    def target() -> None:
        try:
            outcome[0] = fn()
        except BaseException as exc:  # handed back to the test, which asserts on its type
            outcome[1] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(HANG_GUARD_S)
    assert not thread.is_alive(), f"call still blocked after {HANG_GUARD_S} s"
    return outcome[0], outcome[1]


def _bucket(s3_server: MotoServer) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    make_bucket(s3_server.endpoint_url, name)
    return name


@pytest.fixture
def echo_target():
    """A one-connection TCP server that records what happens to its side of the connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    events: dict[str, Any] = {}
    accepted = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        events["conn"] = conn
        accepted.set()
        try:
            while data := conn.recv(4096):
                conn.sendall(data)
            events["end"] = "eof"
        except OSError as exc:
            events["end"] = exc

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname(), accepted, events, thread
    listener.close()
    if "conn" in events:
        events["conn"].close()


def test_upload_tree_and_read_back_through_proxy(s3_server, fault_proxy, tmp_path):
    files = {"a.txt": b"alpha", "sub/b.bin": os.urandom(3000), "sub/deeper/c.tar": b"\0" * 70_000}
    for rel, payload in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(payload)
    bucket = _bucket(s3_server)
    options = s3_storage_options(fault_proxy.endpoint_url)

    uploaded = upload_tree(tmp_path, f"s3://{bucket}/shards/", options)

    assert uploaded == sorted(f"s3://{bucket}/shards/{rel}" for rel in files)
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    assert sorted(fs.find(f"{bucket}/shards")) == sorted(f"{bucket}/shards/{rel}" for rel in files)
    for rel, payload in files.items():
        assert fs.cat(f"{bucket}/shards/{rel}") == payload
        with fs.open(f"{bucket}/shards/{rel}", "rb") as f:
            assert f.read() == payload
    assert fault_proxy.connections >= 1
    assert fault_proxy.bytes_to_client > sum(len(p) for p in files.values())


def test_down_fails_fast_with_connection_error_and_up_recovers(s3_server, fault_proxy):
    bucket = _bucket(s3_server)
    payload = os.urandom(10_000)
    fs = _fail_fast_fs(fault_proxy.endpoint_url)
    fs.pipe(f"{bucket}/obj.bin", payload)
    assert fs.cat(f"{bucket}/obj.bin") == payload  # leaves a pooled keep-alive connection

    fault_proxy.down()

    assert not fault_proxy.is_up
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", fault_proxy.port), timeout=2.0)
    # The pooled connection was reset, so aiohttp reconnects and is refused.
    _, error = _run_guarded(lambda: fs.cat(f"{bucket}/obj.bin"))
    assert isinstance(error, botocore_exceptions.EndpointConnectionError), repr(error)
    _, error = _run_guarded(lambda: _fail_fast_fs(fault_proxy.endpoint_url).cat(f"{bucket}/obj.bin"))
    assert isinstance(error, botocore_exceptions.EndpointConnectionError), repr(error)
    assert isinstance(error.kwargs["error"], aiohttp.ClientConnectorError)  # the refused connect
    assert isinstance(error.kwargs["error"].os_error, ConnectionRefusedError)

    fault_proxy.up()

    assert fault_proxy.is_up
    result, error = _run_guarded(lambda: _fail_fast_fs(fault_proxy.endpoint_url).cat(f"{bucket}/obj.bin"))
    assert error is None, repr(error)
    assert result == payload


def test_reset_in_the_middle_of_a_body(s3_server, fault_proxy):
    bucket = _bucket(s3_server)
    payload = os.urandom(2 << 20)
    _fail_fast_fs(fault_proxy.endpoint_url).pipe(f"{bucket}/big.bin", payload)
    fs = _fail_fast_fs(fault_proxy.endpoint_url)
    fs.info(f"{bucket}/big.bin")  # the next response through the proxy is the object's body

    fault_proxy.down_after_bytes(256 << 10)
    _, error = _run_guarded(lambda: fs.cat(f"{bucket}/big.bin"))

    # s3fs reads GetObject bodies itself, so aiohttp's error reaches the caller untranslated.
    assert isinstance(error, aiohttp.ClientPayloadError), repr(error)
    assert not fault_proxy.is_up
    assert fault_proxy.bytes_to_client < len(payload)

    # With s3fs's default retry loop the payload error is retried, and the retry is refused.
    retrying_fs = _fail_fast_fs(fault_proxy.endpoint_url)
    retrying_fs.retries = 5
    fault_proxy.up()
    retrying_fs.info(f"{bucket}/big.bin")
    fault_proxy.down_after_bytes(256 << 10)
    _, error = _run_guarded(lambda: retrying_fs.cat(f"{bucket}/big.bin"))
    assert isinstance(error, botocore_exceptions.EndpointConnectionError), repr(error)

    fault_proxy.up()
    assert _fail_fast_fs(fault_proxy.endpoint_url).cat(f"{bucket}/big.bin") == payload


def test_down_resets_both_sides_of_an_open_connection(echo_target):
    address, accepted, events, server_thread = echo_target
    with FaultProxy(*address) as proxy:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5.0)
        client.sendall(b"ping")
        assert client.recv(4) == b"ping"
        assert accepted.wait(5.0)

        proxy.down()

        with pytest.raises(ConnectionResetError):
            client.recv(4)  # RST, not a clean EOF (which would return b"")
        server_thread.join(5.0)
        assert isinstance(events.get("end"), ConnectionResetError), events.get("end")
        assert proxy.connections == 1
        client.close()


def test_fail_for_comes_back_on_the_same_port(echo_target):
    address, *_ = echo_target
    with FaultProxy(*address) as proxy:
        port = proxy.port
        timer = proxy.fail_for(0.3)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2.0)
        timer.join(HANG_GUARD_S)
        assert proxy.is_up and proxy.port == port
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as client:
            client.sendall(b"back")
            assert client.recv(4) == b"back"
        proxy.up()  # already up: no-op


def test_closed_proxy_refuses_and_rejects_controls(echo_target):
    address, *_ = echo_target
    proxy = FaultProxy(*address)
    port = proxy.port
    proxy.close()
    proxy.close()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2.0)
    with pytest.raises(RuntimeError, match="closed"):
        proxy.down()
    proxy.up()  # a no-op after close, so a pending fail_for timer cannot reopen it
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2.0)


def test_stop_kills_the_server_process(tmp_path):
    pytest.importorskip("moto.server")
    server = MotoServer(log_dir=tmp_path).start()
    pid = server.process.pid
    os.kill(pid, 0)  # alive

    server.stop()
    server.stop()  # idempotent

    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((server.host, server.port), timeout=2.0)


def test_start_failure_reports_the_log_tail(tmp_path):
    pytest.importorskip("moto.server")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        server = MotoServer(port=taken.getsockname()[1], log_dir=tmp_path)
        with pytest.raises(RuntimeError, match="(?s)exited with code.*Address already in use"):
            server.start()
    assert not server.running
