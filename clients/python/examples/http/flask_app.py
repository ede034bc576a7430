"""The Flask example app of clients/HTTP-MIDDLEWARE.md §6 (the conformance suite's contract),
served by waitress with enough threads that concurrent duplicates are served at once:
``PORT=8000 IDEMD_ADDR=http://127.0.0.1:50051 NAMESPACE=orders-api LEASE_MS=1000
IDEMD_TIMEOUT_MS=5000 EFFECTS_FILE=/tmp/effects python3 flask_app.py``."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid

import waitress
from flask import Flask, Response, request

from idemd_client import Client
from idemd_client.http import WsgiIdempotencyMiddleware

logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

PORT = int(os.environ["PORT"])
IDEMD_ADDR = os.environ["IDEMD_ADDR"]
NAMESPACE = os.environ["NAMESPACE"]
LEASE = int(os.environ.get("LEASE_MS", "30000")) / 1000
IDEMD_TIMEOUT = int(os.environ.get("IDEMD_TIMEOUT_MS", "5000")) / 1000
EFFECTS_FILE = os.environ["EFFECTS_FILE"]

# gRPC targets have no scheme: "http://127.0.0.1:50051" -> "127.0.0.1:50051".
client = Client(IDEMD_ADDR.split("://", 1)[-1], token=os.environ.get("IDEMD_TOKEN") or None)


def tenant(environ) -> str:
    """The scope of a key: the caller's tenant (in a real app, the authenticated identity)."""
    return environ.get("HTTP_X_TENANT", "anonymous")


app = Flask(__name__)
common = {"client": client, "namespace": NAMESPACE, "lease_ttl": LEASE, "idemd_timeout": IDEMD_TIMEOUT}
# One middleware per set of options, each on its own paths.
wsgi = app.wsgi_app
wsgi = WsgiIdempotencyMiddleware(wsgi, paths={"/orders"}, key_required=True, scope=tenant, **common)
wsgi = WsgiIdempotencyMiddleware(wsgi, paths={"/orders-wait"}, key_required=True, scope=tenant, wait=10, **common)
wsgi = WsgiIdempotencyMiddleware(wsgi, paths={"/notes"}, **common)
wsgi = WsgiIdempotencyMiddleware(wsgi, paths={"/open"}, key_required=True, fail_open=True, **common)
app.wsgi_app = wsgi


def effect(route: str) -> str:
    """Appends ``route <id>`` to the effects file (one write, O_APPEND); returns the id."""
    document = request.get_json(silent=True, force=True)
    order_id = document.get("id") if isinstance(document, dict) else None
    order_id = str(order_id) if order_id is not None else "-"
    fd = os.open(EFFECTS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{route} {order_id}\n".encode())
    finally:
        os.close(fd)
    return order_id


def json_response(status: int, document, headers=None) -> Response:
    return Response(json.dumps(document), status=status, mimetype="application/json", headers=headers)


@app.get("/health")
def health() -> Response:
    return Response("ok", mimetype="text/plain")


@app.post("/orders", endpoint="orders")
@app.post("/orders-wait", endpoint="orders_wait")
def order() -> Response:
    order_id = effect("orders")
    delay = request.headers.get("X-Delay-Ms")
    if delay:
        time.sleep(int(delay) / 1000)  # a thread of its own: the server's others go on
    run = str(uuid.uuid4())
    if request.headers.get("X-Fail") == "1":
        return json_response(500, {"error": "failed"})
    status = request.headers.get("X-Status")
    if status:
        return json_response(int(status), {"status": int(status), "run": run})
    tenant_name = request.headers.get("X-Tenant", "anonymous")
    return json_response(
        201,
        {"run": run, "id": order_id, "tenant": tenant_name},
        headers={"Location": f"/orders/{run}", "Set-Cookie": f"s={run}", "X-Run": run},
    )


@app.post("/notes")
def notes() -> Response:
    effect("notes")
    return json_response(201, {"run": str(uuid.uuid4())})


@app.post("/open")
def open_route() -> Response:
    effect("open")
    return json_response(201, {"run": str(uuid.uuid4())})


@app.get("/orders")
def list_orders() -> Response:
    effect("list")
    return json_response(200, {"run": str(uuid.uuid4())})


@app.put("/orders/<order_id>")
def put_order(order_id: str) -> Response:
    effect("put")
    return json_response(200, {"run": str(uuid.uuid4())})


if __name__ == "__main__":
    # waitress exits on SIGTERM (its default handler); 64 threads serve the 50 duplicates at once.
    waitress.serve(app, host="127.0.0.1", port=PORT, threads=64)
