"""The FastAPI example app of clients/HTTP-MIDDLEWARE.md §6 (the conformance suite's contract),
served by uvicorn: ``PORT=8000 IDEMD_ADDR=http://127.0.0.1:50051 NAMESPACE=orders-api
LEASE_MS=1000 IDEMD_TIMEOUT_MS=5000 EFFECTS_FILE=/tmp/effects python3 fastapi_app.py``."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import uuid

import uvicorn
from fastapi import FastAPI, Request, Response

from idemd_client import AsyncClient
from idemd_client.http import IdempotencyMiddleware

logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

PORT = int(os.environ["PORT"])
IDEMD_ADDR = os.environ["IDEMD_ADDR"]
NAMESPACE = os.environ["NAMESPACE"]
LEASE = int(os.environ.get("LEASE_MS", "30000")) / 1000
IDEMD_TIMEOUT = int(os.environ.get("IDEMD_TIMEOUT_MS", "5000")) / 1000
EFFECTS_FILE = os.environ["EFFECTS_FILE"]

# gRPC targets have no scheme: "http://127.0.0.1:50051" -> "127.0.0.1:50051".
client = AsyncClient(IDEMD_ADDR.split("://", 1)[-1], token=os.environ.get("IDEMD_TOKEN") or None)


def tenant(scope) -> str:
    """The scope of a key: the caller's tenant (in a real app, the authenticated identity)."""
    for name, value in scope["headers"]:
        if name == b"x-tenant":
            return value.decode("latin-1")
    return "anonymous"


app = FastAPI()
common = {"client": client, "namespace": NAMESPACE, "lease_ttl": LEASE, "idemd_timeout": IDEMD_TIMEOUT}
# One middleware per set of options, each on its own paths.
app.add_middleware(IdempotencyMiddleware, paths={"/orders"}, key_required=True, scope=tenant, **common)
app.add_middleware(IdempotencyMiddleware, paths={"/orders-wait"}, key_required=True, scope=tenant, wait=10, **common)
app.add_middleware(IdempotencyMiddleware, paths={"/notes"}, **common)
app.add_middleware(IdempotencyMiddleware, paths={"/open"}, key_required=True, fail_open=True, **common)


def effect(route: str, body: bytes) -> str:
    """Appends ``route <id>`` to the effects file (one write, O_APPEND); returns the id."""
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    order_id = document.get("id") if isinstance(document, dict) else None
    order_id = str(order_id) if order_id is not None else "-"
    fd = os.open(EFFECTS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{route} {order_id}\n".encode())
    finally:
        os.close(fd)
    return order_id


def json_response(status: int, document, headers=None) -> Response:
    return Response(json.dumps(document), status_code=status, media_type="application/json", headers=headers)


@app.get("/health")
async def health() -> Response:
    return Response("ok", media_type="text/plain")


async def order(request: Request) -> Response:
    order_id = effect("orders", await request.body())
    delay = request.headers.get("x-delay-ms")
    if delay:
        await asyncio.sleep(int(delay) / 1000)
    run = str(uuid.uuid4())
    if request.headers.get("x-fail") == "1":
        return json_response(500, {"error": "failed"})
    status = request.headers.get("x-status")
    if status:
        return json_response(int(status), {"status": int(status), "run": run})
    tenant_name = request.headers.get("x-tenant", "anonymous")
    return json_response(
        201,
        {"run": run, "id": order_id, "tenant": tenant_name},
        headers={"Location": f"/orders/{run}", "Set-Cookie": f"s={run}", "X-Run": run},
    )


app.add_api_route("/orders", order, methods=["POST"])
app.add_api_route("/orders-wait", order, methods=["POST"])


@app.post("/notes")
async def notes(request: Request) -> Response:
    effect("notes", await request.body())
    return json_response(201, {"run": str(uuid.uuid4())})


@app.post("/open")
async def open_route(request: Request) -> Response:
    effect("open", await request.body())
    return json_response(201, {"run": str(uuid.uuid4())})


@app.get("/orders")
async def list_orders(request: Request) -> Response:
    effect("list", await request.body())
    return json_response(200, {"run": str(uuid.uuid4())})


@app.put("/orders/{order_id}")
async def put_order(order_id: str, request: Request) -> Response:
    effect("put", await request.body())
    return json_response(200, {"run": str(uuid.uuid4())})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=PORT, log_level="warning")
