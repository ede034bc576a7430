"""Canonical request fingerprints shared by every idemd client:
``sha256(rfc8785(json))``, i.e. SHA-256 over the RFC 8785 (JCS) canonical JSON of the request."""
from __future__ import annotations

import hashlib
from typing import Any

import rfc8785

from .errors import NotCanonicalizable

__all__ = ["canonical_json", "fingerprint", "to_fingerprint"]


def canonical_json(obj: Any) -> bytes:
    """The RFC 8785 canonical JSON (UTF-8) of a JSON-like value (dict with string keys, list, str,
    int, float, bool, None). Raises :class:`NotCanonicalizable` for what JCS cannot represent:
    integers beyond ±(2^53-1), non-finite floats, other types."""
    try:
        return rfc8785.dumps(obj)
    except rfc8785.CanonicalizationError as exc:
        raise NotCanonicalizable(f"request cannot be canonicalized (RFC 8785): {exc}") from exc


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
