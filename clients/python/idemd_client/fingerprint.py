"""Canonical request fingerprints shared by every idemd client:
``sha256(rfc8785(json))``, i.e. SHA-256 over the RFC 8785 (JCS) canonical JSON of the request."""
from __future__ import annotations

import hashlib
from typing import Any

import rfc8785

__all__ = ["canonical_json", "fingerprint", "to_fingerprint"]


def canonical_json(obj: Any) -> bytes:
    """The RFC 8785 canonical JSON (UTF-8) of a JSON-like value (dict, list, str, int, float,
    bool, None). Integers beyond 2^53-1 and non-finite floats are rejected."""
    return rfc8785.dumps(obj)


def fingerprint(obj: Any) -> bytes:
    """SHA-256 (32 bytes) of the canonical JSON of ``obj``."""
    return hashlib.sha256(canonical_json(obj)).digest()


def to_fingerprint(request_or_fingerprint: Any) -> bytes:
    """``bytes``-like values are taken as a ready fingerprint, ``None`` as no fingerprint, and
    anything else is canonicalised and hashed with :func:`fingerprint`."""
    if request_or_fingerprint is None:
        return b""
    if isinstance(request_or_fingerprint, (bytes, bytearray, memoryview)):
        return bytes(request_or_fingerprint)
    return fingerprint(request_or_fingerprint)
