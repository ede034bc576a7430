"""The Python worker of the cross-language test (tests/suite/cross_language.rs).

    python3 xlang_worker.py ADDRESS

reads commands from stdin, one JSON line each: {"namespace", "repeats", "calls": [{"key",
"request"}]}; it answers {"ready": true} and starts on the next line ("go"), so that every
language starts at once. For every call it runs the sync ``Client.idempotent`` helper ``repeats`` times, all
runs of all calls at once (one thread each), with the fingerprint this client computes from
``request``. The work returns "python:KEY:N" (N counts this worker's work runs, so two runs never
return the same bytes). It prints one JSON line per run: {"key", "work_runs", "error" (a kind of
clients/BEHAVIOUR.md, or null), "body", "replayed"}, then {"done": number of runs}. It ends when
stdin closes.
"""
from __future__ import annotations

import itertools
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from behaviour_runner import kind_of
from idemd_client import Client, fingerprint

LANGUAGE = "python"


def run_command(client: Client, command: dict, runs: itertools.count, lock: threading.Lock) -> list:
    namespace = command["namespace"]

    def one(call: dict) -> dict:
        executed = 0

        def work(_lease):
            nonlocal executed
            executed += 1
            with lock:
                n = next(runs)
            # The work takes a moment, as real work does, so other callers meet the key held.
            time.sleep(0.02)
            return f"{LANGUAGE}:{call['key']}:{n}".encode("utf-8")

        try:
            outcome = client.idempotent(namespace, call["key"], fingerprint(call["request"]), work)
            return {
                "key": call["key"],
                "work_runs": executed,
                "error": None,
                "body": outcome.result.body.decode("utf-8", "replace"),
                "replayed": outcome.replayed,
            }
        except Exception as exc:  # noqa: BLE001 - every failure is an outcome to report
            return {
                "key": call["key"],
                "work_runs": executed,
                "error": kind_of(exc),
                "body": None,
                "replayed": None,
                "detail": f"{type(exc).__name__}: {exc}",
            }

    jobs = [call for call in command["calls"] for _ in range(command["repeats"])]
    with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
        return list(pool.map(one, jobs))


def main(argv: list) -> int:
    address = argv[1]
    runs = itertools.count(1)
    lock = threading.Lock()
    with Client(address) as client:
        # Bytes, decoded here: the requests carry unicode, whatever the locale says.
        while raw := sys.stdin.buffer.readline():
            if not raw.strip():
                continue
            command = json.loads(raw.decode("utf-8"))
            print(json.dumps({"ready": True}), flush=True)
            if not sys.stdin.buffer.readline():
                break
            lines = run_command(client, command, runs, lock)
            for line in lines:
                print(json.dumps(line))
            print(json.dumps({"done": len(lines)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
