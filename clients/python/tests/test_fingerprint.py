import hashlib
import json
import os

import pytest

from idemd_client import NotCanonicalizable, canonical_json, fingerprint
from idemd_client.fingerprint import to_fingerprint

VECTORS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "fingerprint-vectors.json")


def _vectors():
    with open(VECTORS_PATH, encoding="utf-8") as f:
        data = json.load(f)
    assert data["algorithm"] == "sha256(rfc8785(json))"
    assert data["vectors"], "no vectors"
    return data["vectors"]


@pytest.mark.parametrize("vector", _vectors(), ids=lambda v: v["canonical"][:40])
def test_fingerprint_vector(vector):
    assert canonical_json(vector["input"]).decode("utf-8") == vector["canonical"]
    fp = fingerprint(vector["input"])
    assert fp.hex() == vector["sha256"]
    assert fp == hashlib.sha256(vector["canonical"].encode("utf-8")).digest()
    assert to_fingerprint(vector["input"]) == fp


def test_to_fingerprint_passes_bytes_and_none():
    assert to_fingerprint(b"\x01\x02") == b"\x01\x02"
    assert to_fingerprint(bytearray(b"ab")) == b"ab"
    assert to_fingerprint(None) == b""


def test_integers_up_to_2_53_minus_1_are_accepted():
    assert canonical_json({"n": 2**53 - 1, "m": -(2**53 - 1)}) == b'{"m":-9007199254740991,"n":9007199254740991}'


@pytest.mark.parametrize(
    "value, why",
    [
        ({"n": 2**53}, "exceeds safe integer domain"),
        ({"n": -(2**53)}, "exceeds safe integer domain"),
        ({"x": float("nan")}, "not representable"),
        ({"x": float("inf")}, "not representable"),
        ({1: "non-string key"}, "keys must be strings"),
        ({"s": {1, 2}}, "unsupported type"),
    ],
    ids=["2^53", "-2^53", "nan", "inf", "int key", "set"],
)
def test_values_without_canonical_json_raise_not_canonicalizable(value, why):
    for function in (canonical_json, fingerprint, to_fingerprint):
        with pytest.raises(NotCanonicalizable, match=why) as raised:
            function(value)
        assert isinstance(raised.value, ValueError)
