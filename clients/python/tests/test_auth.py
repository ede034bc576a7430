"""Bearer-token authentication (memory store)."""
import hashlib
import uuid

import grpc
import pytest

from conftest import IdemdServer
from idemd_client import Client, IdemdError

TOKEN = "py-client-test-token-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    policy = tmp_path_factory.mktemp("auth") / "policy.toml"
    policy.write_text(
        "[[callers]]\n"
        'name = "pytest"\n'
        f'token_sha256 = ["{hashlib.sha256(TOKEN.encode()).hexdigest()}"]\n'
        "  [[callers.grants]]\n"
        '  namespaces = ["pytest-*"]\n'
        '  rpcs = ["*"]\n'
    )
    server = IdemdServer("--auth-config", str(policy))
    yield server
    server.stop()


def test_token_is_sent(auth_server):
    with Client(auth_server.address, token=TOKEN) as client:
        out = client.idempotent("pytest-auth", uuid.uuid4().hex, None, lambda ctx: b"ok")
        assert out.body == b"ok"
        with pytest.raises(IdemdError) as info:
            client.idempotent("other", uuid.uuid4().hex, None, lambda ctx: b"ok")
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_missing_token_is_rejected(auth_server):
    with Client(auth_server.address) as client:
        with pytest.raises(IdemdError) as info:
            client.idempotent("pytest-auth", "k", None, lambda ctx: b"never")
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
