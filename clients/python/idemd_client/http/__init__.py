"""Idempotency-Key middleware for HTTP APIs: one behaviour in every framework
(clients/HTTP-MIDDLEWARE.md), as a thin layer over this client.

ASGI (FastAPI, Starlette; on :class:`~idemd_client.AsyncClient`)::

    from idemd_client import AsyncClient
    from idemd_client.http import IdempotencyMiddleware

    app.add_middleware(IdempotencyMiddleware, client=AsyncClient("idemd:50051"), namespace="orders-api")

WSGI (Flask; on :class:`~idemd_client.Client`)::

    from idemd_client import Client
    from idemd_client.http import WsgiIdempotencyMiddleware

    app.wsgi_app = WsgiIdempotencyMiddleware(app.wsgi_app, client=Client("idemd:50051"), namespace="orders-api")

No web framework is a dependency: both are plain ASGI/WSGI callables. Options: :class:`Settings`.
"""
from __future__ import annotations

from ._core import (
    DEFAULT_KEEP_HEADERS,
    DEFAULT_METHODS,
    PROBLEM_BASE,
    InvalidKey,
    Settings,
    default_storable,
    idemd_key,
    parse_key,
    request_fingerprint,
)
from .asgi import IdempotencyMiddleware
from .wsgi import WsgiIdempotencyMiddleware

__all__ = [
    "DEFAULT_KEEP_HEADERS",
    "DEFAULT_METHODS",
    "IdempotencyMiddleware",
    "InvalidKey",
    "PROBLEM_BASE",
    "Settings",
    "WsgiIdempotencyMiddleware",
    "default_storable",
    "idemd_key",
    "parse_key",
    "request_fingerprint",
]
