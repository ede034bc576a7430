"""Fixtures: a live idemd (memory store and PostgreSQL) started from $IDEMD_BINARY."""
from __future__ import annotations

import os
import re
import subprocess
import threading
import time
import uuid
from collections import deque
from urllib.parse import urlsplit, urlunsplit

import pytest

from idemd_client import Client

DEFAULT_ADMIN_URL = "postgres://postgres@127.0.0.1:5432/postgres"
_SERVING = re.compile(r"serving gRPC on (\S+)")


def idemd_binary() -> str:
    """The idemd to test: $IDEMD_BINARY, never a guess (a binary left by an earlier run could be
    stale). ``cargo test`` sets it (tests/suite/clients.rs)."""
    path = os.environ.get("IDEMD_BINARY")
    if not path:
        pytest.fail(
            "IDEMD_BINARY is not set: set it to the idemd binary to test, e.g. "
            "IDEMD_BINARY=target/debug/idemd (cargo test sets it)",
            pytrace=False,
        )
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"IDEMD_BINARY={path} is not an executable file", pytrace=False)
    return path


class IdemdServer:
    """One idemd process; ``address`` is host:port of its gRPC listener."""

    def __init__(self, *extra_args: str, store: str = "memory") -> None:
        self.store = store
        self.args = [
            idemd_binary(),
            "serve",
            "--listen", "127.0.0.1:0",
            "--metrics-listen", "127.0.0.1:0",
            "--min-lease-ttl", "10ms",
            *extra_args,
        ]
        self.lines: deque = deque(maxlen=500)
        self.proc = subprocess.Popen(
            self.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self._found = threading.Event()
        self.address = None
        self._drain = threading.Thread(target=self._drain_stderr, daemon=True)
        self._drain.start()
        if not self._found.wait(30):
            self.stop()
            raise RuntimeError("idemd did not report its gRPC address in 30s:\n" + self.log())
        if self.address is None:
            self.stop()
            raise RuntimeError("idemd exited before serving:\n" + self.log())

    def _drain_stderr(self) -> None:
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            self.lines.append(line)
            if self.address is None:
                m = _SERVING.search(line)
                if m:
                    self.address = m.group(1)
                    self._found.set()
        self._found.set()  # EOF: the process ended

    def log(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._drain.join(5)


def _with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


@pytest.fixture(scope="session")
def postgres_url():
    """A fresh database for this test session, dropped at the end. Fails (never skips) when
    PostgreSQL cannot be reached."""
    import psycopg

    admin_url = os.environ.get("IDEMD_TEST_DATABASE_URL") or DEFAULT_ADMIN_URL
    name = f"idemd_py_{uuid.uuid4().hex}"
    try:
        admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=10)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"PostgreSQL unreachable at {admin_url}: {exc}", pytrace=False)
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session", params=["memory", "postgres"])
def idemd(request):
    """A running idemd, once per store."""
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
        server = IdemdServer("--database-url", url, store="postgres")
    else:
        server = IdemdServer(store="memory")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(idemd):
    with Client(idemd.address) as c:
        yield c


@pytest.fixture
def key():
    return f"key-{uuid.uuid4().hex}"


@pytest.fixture
def closed_port():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Counter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def incr(self) -> int:
        with self._lock:
            self.value += 1
            return self.value


@pytest.fixture
def counter():
    return Counter()


def wait_until(pred, timeout=5.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()
