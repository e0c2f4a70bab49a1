"""A real S3-compatible server on 127.0.0.1 and a TCP fault-injection proxy, for tests.

``MotoServer`` runs moto's server mode in a subprocess, so requests go through real sockets,
real HTTP and botocore's real signing, exactly as against AWS. ``FaultProxy`` sits between a
client and that server and can make the endpoint die the way a dead S3 endpoint does: open
connections are reset (RST, not a clean FIN) and new connections are refused.

Typical use (see the ``s3_server`` and ``fault_proxy`` fixtures in conftest.py)::

    with MotoServer() as server, FaultProxy(server.host, server.port) as proxy:
        make_bucket(server.endpoint_url, "shards")
        fs = s3fs.S3FileSystem(**s3_storage_options(proxy.endpoint_url), skip_instance_cache=True)
        proxy.down()   # every request now fails with a connection error
        proxy.up()
"""

from __future__ import annotations

import collections
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import weakref
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

LOOPBACK = "127.0.0.1"
TEST_ACCESS_KEY = "testing"
TEST_SECRET_KEY = "testing"
TEST_REGION = "us-east-1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free a moment ago (the kernel picks it; another process may race us)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _tail(path: Path, num_chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-num_chars:]
    except FileNotFoundError:
        return "<no log written>"


class MotoServer:
    """moto's S3-compatible server (``python -m moto.server``) as a subprocess on 127.0.0.1.

    The process runs in its own process group with stdout/stderr in ``log_path``; ``stop()``
    kills that group by id and reaps the process, and is safe to call more than once.
    """

    def __init__(self, *, host: str = LOOPBACK, port: int | None = None, start_timeout_s: float = 30.0,
                 log_dir: str | os.PathLike[str] | None = None) -> None:
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.start_timeout_s = start_timeout_s
        self.log_dir = Path(log_dir if log_dir is not None else tempfile.mkdtemp(prefix="moto_server_"))
        self.log_path = self.log_dir / "moto_server.log"
        self.process: subprocess.Popen[bytes] | None = None
        # Ignore any http_proxy in the environment: the server is on loopback.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> MotoServer:
        if self.process is not None:
            raise RuntimeError(f"MotoServer on {self.endpoint_url} already started (pid {self.process.pid})")
        env = dict(os.environ)
        env.setdefault("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)
        env.setdefault("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY)
        env.setdefault("AWS_DEFAULT_REGION", TEST_REGION)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # own process group: stop() kills exactly this tree
            )
        try:
            self._wait_until_serving()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_serving(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"moto server exited with code {self.process.returncode} before serving on "
                    f"{self.endpoint_url}; log {self.log_path}:\n{_tail(self.log_path)}")
            try:
                # Any HTTP answer (moto answers GET / with a ListBuckets document) means it serves.
                with self._opener.open(self.endpoint_url + "/", timeout=1.0) as response:
                    response.read()
                return
            except urllib.error.HTTPError:
                return
            except (urllib.error.URLError, OSError) as exc:
                last_error = exc
            time.sleep(0.1)  # polling interval while the interpreter imports moto
        raise RuntimeError(
            f"moto server did not answer HTTP on {self.endpoint_url} within {self.start_timeout_s} s "
            f"(last error: {last_error!r}); log {self.log_path}:\n{_tail(self.log_path)}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``timeout_s``, reap it. Idempotent."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            pgid = process.pid  # start_new_session=True made the child a group leader
            try:
                os.killpg(pgid, signal.SIGTERM)
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                process.wait(timeout=timeout_s)
            except ProcessLookupError:
                pass
        process.wait()

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class _Connection:
    """One proxied client connection: the client socket, the target socket, and bytes in flight."""

    __slots__ = ("client", "target", "to_target", "to_client", "client_eof", "target_eof")

    def __init__(self, client: socket.socket, target: socket.socket) -> None:
        self.client = client
        self.target = target
        self.to_target = bytearray()  # read from the client, not yet written to the target
        self.to_client = bytearray()  # read from the target, not yet written to the client
        self.client_eof = False
        self.target_eof = False


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0, so the kernel sends RST instead of FIN and drops unsent data."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


_PROXIES: "weakref.WeakSet[FaultProxy]"


def _close_proxy_sockets_in_child() -> None:
    """A process forked from one running a proxy (a dataloader worker) drops its copies of the
    proxy's sockets; otherwise they keep the port bound and swallow connections while it is down."""
    for proxy in list(_PROXIES):
        proxy._forget_sockets()


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of ``(target_host, target_port)`` that can fail on demand.

    All socket work happens on one background thread with non-blocking sockets, so ``down()`` can
    close sockets that no other thread is blocked on: that is what makes the kernel send RST at once
    (a socket closed while another thread sits in ``recv`` on it is only released later).

    - ``down()``: every open connection is reset on both sides (SO_LINGER 0, then close) and the
      listening socket is closed, so new connections are refused. Returns once that has happened.
    - ``up()``: listen again on the same port (SO_REUSEADDR).
    - ``fail_for(seconds)``: ``down()`` now and ``up()`` from a timer thread later.
    - ``down_after_bytes(n)``: forward at most ``n`` more bytes from the target to clients, then
      ``down()``; a deterministic way to fail in the middle of a response body.
    - ``connections``: number of client connections accepted so far; ``bytes_to_client``: bytes
      forwarded from the target to clients so far.
    """

    def __init__(self, target_host: str, target_port: int, *, host: str = LOOPBACK, port: int = 0,
                 connect_timeout_s: float = 2.0) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.connect_timeout_s = connect_timeout_s
        self.connections = 0
        self.bytes_to_client = 0
        self._is_up = False
        self._closed = False
        self._listener: socket.socket | None = None
        self._conns: list[_Connection] = []
        self._down_after: int | None = None
        self._running = True
        self._pending_listener: socket.socket | None = None
        self._timers: list[threading.Timer] = []
        self._state_lock = threading.Lock()  # serialises down/up/close/fail_for callers
        self._calls: collections.deque[tuple[Callable[[], Any], list[Any], threading.Event]] = collections.deque()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self.port = self._bind(port)
        _PROXIES.add(self)
        self._thread = threading.Thread(target=self._loop, name=f"FaultProxy:{self.port}", daemon=True)
        self._thread.start()
        self._call(self._start_listening)

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._is_up

    # -- public controls (any thread) --------------------------------------------------------

    def down(self) -> None:
        """Reset every open connection (both sides) and refuse new ones until ``up()``."""
        with self._state_lock:
            self._check_open()
            self._call(self._go_down)

    def up(self) -> None:
        """Accept connections again on the same port. A no-op when already up or closed."""
        with self._state_lock:
            if self._closed or self._is_up:
                return
            self._bind(self.port)
            self._call(self._start_listening)

    def fail_for(self, seconds: float) -> threading.Timer:
        """``down()`` now, ``up()`` after ``seconds`` from a timer thread (cancelled by ``close()``)."""
        self.down()
        timer = threading.Timer(seconds, self.up)
        timer.daemon = True
        with self._state_lock:
            self._timers.append(timer)
        timer.start()
        return timer

    def down_after_bytes(self, num_bytes: int) -> None:
        """Go down once ``num_bytes`` more bytes have been forwarded from the target to clients.

        The client receives at most ``num_bytes`` of them: bytes still in the proxy's kernel send
        queue when the RST goes out are dropped, as they would be by a dying endpoint.
        """
        if num_bytes < 0:
            raise ValueError(f"down_after_bytes: num_bytes={num_bytes}, must be >= 0")
        with self._state_lock:
            self._check_open()

            def arm() -> None:
                self._down_after = num_bytes

            self._call(arm)

    def close(self) -> None:
        """Stop the proxy: cancel timers, reset all connections, close the listener, end the thread."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()
        self._call(self._shutdown)
        self._thread.join(timeout=10.0)
        assert not self._thread.is_alive(), "FaultProxy thread did not stop"
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _forget_sockets(self) -> None:
        socks = [self._listener, self._pending_listener, self._wake_r, self._wake_w]
        socks += [s for conn in self._conns for s in (conn.client, conn.target)]
        for sock in socks:
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass

    # -- plumbing between callers and the I/O thread -----------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"FaultProxy on port {self.port} is closed")

    def _bind(self, port: int) -> int:
        """Bind a new listening socket (in the caller's thread, so bind errors raise there)."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, port))
            listener.listen(128)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._pending_listener = listener
        return listener.getsockname()[1]

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the I/O thread and wait for it; re-raise its exception here."""
        if threading.current_thread() is self._thread:
            return fn()
        done = threading.Event()
        result: list[Any] = []
        self._calls.append((fn, result, done))
        self._wake_w.send(b"\0")
        if not done.wait(timeout=10.0):
            raise RuntimeError("FaultProxy I/O thread did not answer within 10 s")
        if result and isinstance(result[0], BaseException):
            raise result[0]
        return result[0] if result else None

    # -- everything below runs on the I/O thread ---------------------------------------------

    def _start_listening(self) -> None:
        listener, self._pending_listener = self._pending_listener, None
        assert listener is not None, "_bind() must run before _start_listening()"
        self._listener = listener
        self._selector.register(listener, selectors.EVENT_READ, "accept")
        self._is_up = True

    def _go_down(self) -> None:
        self._is_up = False
        self._down_after = None
        if self._listener is not None:
            self._selector.unregister(self._listener)
            # Closing the listener makes the kernel reset connections still in its accept
            # backlog and refuse (RST) new SYNs: the client sees ECONNREFUSED.
            self._listener.close()
            self._listener = None
        for conn in list(self._conns):
            self._drop(conn)

    def _shutdown(self) -> None:
        self._go_down()
        self._running = False

    def _drop(self, conn: _Connection) -> None:
        """Reset both sides of ``conn``."""
        for sock in (conn.client, conn.target):
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            _reset(sock)
        if conn in self._conns:
            self._conns.remove(conn)

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            self.connections += 1
            try:
                # Blocking connect with a short timeout: the target is on loopback, so this is
                # immediate or refused at once.
                target = socket.create_connection(self.target, timeout=self.connect_timeout_s)
            except OSError:
                _reset(client)  # the target is dead: the client sees a reset, as from a dead LB
                continue
            for sock in (client, target):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(client, target)
            self._conns.append(conn)
            self._update(conn)

    def _update(self, conn: _Connection) -> None:
        """(Re)register both sockets for the events they need now (read only into empty buffers)."""
        for sock, want_read, want_write in (
            (conn.client, not conn.client_eof and not conn.to_target, bool(conn.to_client)),
            (conn.target, not conn.target_eof and not conn.to_client, bool(conn.to_target)),
        ):
            if sock.fileno() < 0:
                continue
            events = (selectors.EVENT_READ if want_read else 0) | (selectors.EVENT_WRITE if want_write else 0)
            try:
                key = self._selector.get_key(sock)
            except KeyError:
                key = None
            if events and key is None:
                self._selector.register(sock, events, conn)
            elif events and key is not None and key.events != events:
                self._selector.modify(sock, events, conn)
            elif not events and key is not None:
                self._selector.unregister(sock)

    def _service(self, conn: _Connection, sock: socket.socket, mask: int) -> None:
        from_client = sock is conn.client
        other = conn.target if from_client else conn.client
        try:
            if mask & selectors.EVENT_READ:
                data = sock.recv(65536)
                if not data:  # clean EOF: pass the half-close on
                    if from_client:
                        conn.client_eof = True
                    else:
                        conn.target_eof = True
                    if not (conn.to_target if from_client else conn.to_client):
                        other.shutdown(socket.SHUT_WR)
                elif from_client:
                    conn.to_target += data
                else:
                    if self._down_after is not None:
                        data = data[:self._down_after]
                        self._down_after -= len(data)
                    conn.to_client += data
            if mask & selectors.EVENT_WRITE:
                pending = conn.to_client if sock is conn.client else conn.to_target
                sent = sock.send(pending)
                del pending[:sent]
                if sock is conn.client:
                    self.bytes_to_client += sent
                if not pending and (conn.target_eof if sock is conn.client else conn.client_eof):
                    sock.shutdown(socket.SHUT_WR)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            # One side reset or failed: reset the other too, as a real middlebox would.
            self._drop(conn)
            return
        if conn.client_eof and conn.target_eof and not conn.to_client and not conn.to_target:
            self._conns.remove(conn)
            for s in (conn.client, conn.target):
                try:
                    self._selector.unregister(s)
                except (KeyError, ValueError):
                    pass
                s.close()
            return
        self._update(conn)
        if self._down_after == 0 and not any(c.to_client for c in self._conns):
            self._go_down()

    def _loop(self) -> None:
        while self._running:
            for key, mask in self._selector.select():
                if key.fileobj is self._wake_r:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, InterruptedError):
                        pass
                    while self._calls:
                        fn, result, done = self._calls.popleft()
                        try:
                            result.append(fn())
                        except BaseException as exc:  # handed to the caller, which re-raises it
                            result.append(exc)
                        done.set()
                elif key.data == "accept":
                    if self._listener is not None:
                        self._accept()
                else:
                    conn = key.data
                    # An earlier event in this batch may have dropped this connection.
                    if conn in self._conns and key.fileobj.fileno() >= 0:
                        self._service(conn, key.fileobj, mask)
        for conn in list(self._conns):
            self._drop(conn)


def s3_storage_options(endpoint_url: str, *, connect_timeout_s: float | None = None,
                       read_timeout_s: float | None = None, max_attempts: int | None = None) -> dict[str, Any]:
    """fsspec/s3fs ``storage_options`` for a test endpoint (test credentials, path-style URLs).

    ``connect_timeout_s`` / ``read_timeout_s`` / ``max_attempts`` go to botocore's ``Config`` through
    ``config_kwargs``; ``max_attempts`` is botocore's total attempts per request (1 = no retry by
    botocore). s3fs retries some errors again on top of that (``S3FileSystem.retries``, a class
    attribute, default 5; it is not a constructor argument).
    """
    config_kwargs: dict[str, Any] = {}
    if connect_timeout_s is not None:
        config_kwargs["connect_timeout"] = connect_timeout_s
    if read_timeout_s is not None:
        config_kwargs["read_timeout"] = read_timeout_s
    if max_attempts is not None:
        config_kwargs["retries"] = {"total_max_attempts": max_attempts, "mode": "standard"}
    options: dict[str, Any] = {
        "endpoint_url": endpoint_url,
        "key": TEST_ACCESS_KEY,
        "secret": TEST_SECRET_KEY,
        "client_kwargs": {"region_name": TEST_REGION},
    }
    if config_kwargs:
        options["config_kwargs"] = config_kwargs
    return options


def _filesystem(storage_options: dict[str, Any]):
    import s3fs

    # A fresh instance: a cached one may hold pooled connections a FaultProxy has since reset.
    return s3fs.S3FileSystem(**storage_options, skip_instance_cache=True)


def make_bucket(endpoint_url: str, name: str) -> None:
    """Create bucket ``name`` on the server at ``endpoint_url``."""
    # Not fs.mkdir(name): s3fs sends LocationConstraint=<client region>, and S3 (moto too) rejects
    # LocationConstraint=us-east-1 with InvalidLocationConstraint.
    fs = _filesystem(s3_storage_options(endpoint_url))
    fs.call_s3("create_bucket", Bucket=name)
    fs.invalidate_cache()


def upload_tree(local_dir: str | os.PathLike[str], s3_url: str, storage_options: dict[str, Any]) -> list[str]:
    """Upload every file under ``local_dir`` to ``s3_url`` (``s3://bucket/prefix``), keeping relative paths.

    Returns the uploaded object URLs, sorted.
    """
    root = Path(local_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"upload_tree: local_dir {str(root)!r} is not a directory")
    if not s3_url.startswith("s3://"):
        raise ValueError(f"upload_tree: s3_url={s3_url!r}, must start with 's3://'")
    fs = _filesystem(storage_options)
    prefix = s3_url.rstrip("/")
    uploaded = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        url = f"{prefix}/{path.relative_to(root).as_posix()}"
        fs.put_file(str(path), url)
        uploaded.append(url)
    return uploaded


__all__ = ["FaultProxy", "MotoServer", "free_port", "make_bucket", "s3_storage_options", "upload_tree"]


_PROXIES = weakref.WeakSet()
os.register_at_fork(after_in_child=_close_proxy_sockets_in_child)
