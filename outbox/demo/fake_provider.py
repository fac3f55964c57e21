"""A fake payment provider: a real HTTP server on 127.0.0.1 for tests and the demo.

It behaves like Stripe's idempotent requests: `POST /v1/charges` needs an `Idempotency-Key`
header (400 without one); a repeated key returns the stored response with
`Idempotent-Replayed: true` without charging again; a key still being processed gets 409; a key
reused with another body gets 422. Every charge lands in the charge log, which is the proof
tests use ("charged exactly once"). `GET /v1/charges?idempotency_key=K` looks a key up (what a
reconcile hook asks).

It can be told to misbehave for the next requests (in process: `provider.script(...)`; over HTTP:
`POST /_control/script {"behaviours": [...]}`):
    ok        charge, 201
    slow      hold the request `hang_s` seconds, then charge, 201 (meanwhile the key is in use: 409)
    decline   402 card_declined, stored under the key (a definite failure; nothing charged)
    error     500, nothing charged, key not stored (an indeterminate error that did no harm)
    timeout   hold the request `hang_s` seconds, then close without answering; nothing charged
    drop      charge, then close the connection without answering (succeeded, but the caller
              cannot know: the case effects reconciliation exists for)
    stall     charge, then hold the answer `hang_s` seconds before sending it: the window in
              which the demo kills a worker after the provider charged and before it recorded

A charge may carry `metadata` (`{"order_id": "42"}`, like Stripe's): it is kept in the charge
log, so a test can count charges per order, not just per key (a new key per retry would be a
double charge that key-level dedupe can never see).

    python -m outbox.demo.fake_provider --port 8099
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import signal
import socket
import threading
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from inbox.effects import Reconciled
from inbox.errors import DefiniteFailure

BEHAVIOURS = ("ok", "slow", "decline", "error", "timeout", "drop", "stall")


@dataclass
class _State:
    charges: list[dict] = field(default_factory=list)  # the charge log, in order
    requests: list[dict] = field(default_factory=list)  # every POST /v1/charges with what happened
    keys: dict[str, dict] = field(default_factory=dict)  # key -> {fingerprint, status, body} or in flight
    script: deque = field(default_factory=deque)
    lock: threading.Lock = field(default_factory=threading.Lock)
    closing: threading.Event = field(default_factory=threading.Event)


class FakeProvider:
    def __init__(self, port: int = 0, *, hang_s: float = 5.0):
        self.hang_s = hang_s
        self.state = _State()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _make_handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeProvider":
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-provider", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.state.closing.set()  # wakes requests held by `timeout`
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "FakeProvider":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def script(self, *behaviours: str) -> None:
        """Behaviours for the next charge requests, in order; then back to `ok`."""
        unknown = set(behaviours) - set(BEHAVIOURS)
        if unknown:
            raise ValueError(f"unknown behaviour(s) {sorted(unknown)}; use {', '.join(BEHAVIOURS)}")
        with self.state.lock:
            self.state.script.extend(behaviours)

    def charges(self) -> list[dict]:
        with self.state.lock:
            return [dict(c) for c in self.state.charges]

    def requests(self) -> list[dict]:
        with self.state.lock:
            return [dict(r) for r in self.state.requests]


def _fingerprint(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _make_handler(provider: FakeProvider):
    state = provider.state

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            if url.path != "/v1/charges":
                return self._send(404, {"error": "not_found"})
            key = urllib.parse.parse_qs(url.query).get("idempotency_key", [None])[0]
            with state.lock:
                charges = [c for c in state.charges if key is None or c["idempotency_key"] == key]
            if key is not None and not charges:
                return self._send(404, {"error": "no_such_charge", "idempotency_key": key})
            self._send(200, {"charges": charges})

        def do_POST(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            except ValueError:
                return self._send(400, {"error": "invalid_json"})
            if url.path == "/_control/script":
                try:
                    provider.script(*body.get("behaviours", []))
                except ValueError as exc:
                    return self._send(400, {"error": str(exc)})
                if "hang_s" in body:
                    provider.hang_s = float(body["hang_s"])
                return self._send(200, {"queued": list(state.script)})
            if url.path != "/v1/charges":
                return self._send(404, {"error": "not_found"})
            self._charge(body)

        def _charge(self, body: dict) -> None:
            key = self.headers.get("Idempotency-Key")
            if not key:
                return self._send(400, {"error": "idempotency_key_missing"})
            fp = _fingerprint(body)
            with state.lock:
                known = state.keys.get(key)
                behaviour = None
                if known is None:
                    behaviour = state.script.popleft() if state.script else "ok"
                    state.keys[key] = {"fingerprint": fp, "in_flight": True}
                state.requests.append({"key": key, "body": body, "behaviour": behaviour or "replay",
                                       "at": time.time()})
            if known is not None:
                if known["fingerprint"] != fp:
                    return self._send(422, {"error": "idempotency_key_reused", "idempotency_key": key})
                if known.get("in_flight"):
                    return self._send(409, {"error": "idempotency_key_in_use", "idempotency_key": key})
                return self._send(known["status"], known["body"], replayed=True)

            if behaviour in ("error", "timeout"):
                with state.lock:
                    del state.keys[key]  # nothing happened: the same key may be sent again
                if behaviour == "error":
                    return self._send(500, {"error": "internal_error"})
                state.closing.wait(provider.hang_s)
                return self._drop()
            if behaviour == "slow":
                state.closing.wait(provider.hang_s)
            if behaviour == "decline":
                status, response = 402, {"error": "card_declined", "idempotency_key": key}
            else:
                with state.lock:
                    charge = {"id": f"ch_{len(state.charges) + 1:06d}", "amount": body.get("amount"),
                              "currency": body.get("currency"), "status": "succeeded", "idempotency_key": key,
                              "metadata": body.get("metadata") or {}, "created": time.time()}
                    state.charges.append(charge)
                status, response = 201, charge
            with state.lock:
                state.keys[key] = {"fingerprint": fp, "status": status, "body": response}
            if behaviour == "drop":
                return self._drop()
            if behaviour == "stall":
                state.closing.wait(provider.hang_s)
                try:
                    return self._send(status, response)
                except OSError:  # the caller gave up (timed out, or was killed): nobody to answer
                    return self._drop()
            self._send(status, response)

        def _send(self, status: int, body: dict, replayed: bool = False) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if replayed:
                self.send_header("Idempotent-Replayed", "true")
            self.end_headers()
            self.wfile.write(data)

        def _drop(self) -> None:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    return Handler


class ProviderClient:
    """What an application would write against the provider: charge under a key, look a key up.
    Maps answers to the effects ledger's vocabulary: 2xx is a result, 402/400/422 a definite
    failure (DefiniteFailure), everything else (409, 5xx, timeouts, dropped connections) raises
    ProviderUnavailable and leaves the outcome unknown."""

    def __init__(self, url: str, *, timeout_s: float = 2.0):
        parts = urllib.parse.urlsplit(url)
        self.host, self.port, self.timeout_s = parts.hostname, parts.port, timeout_s

    def charge(self, key: str, amount: int, currency: str, metadata: dict | None = None) -> dict:
        request: dict[str, Any] = {"amount": amount, "currency": currency}
        if metadata:
            request["metadata"] = metadata
        status, body, _ = self._request("POST", "/v1/charges", request, {"Idempotency-Key": key})
        if 200 <= status < 300:
            return body
        if status in (400, 402, 422):
            raise DefiniteFailure(body, f"provider refused the charge: HTTP {status} {body.get('error')}")
        raise ProviderUnavailable(f"provider answered HTTP {status} {body.get('error')}")

    def lookup(self, key: str, request: Any = None) -> Reconciled | None:
        """Reconcile hook for Effects.run: what the provider knows about `key`."""
        try:
            status, body, _ = self._request("GET", "/v1/charges?" + urllib.parse.urlencode({"idempotency_key": key}))
        except ProviderUnavailable:
            return None
        if status == 404:
            return Reconciled.absent()
        if status == 200 and body.get("charges"):
            return Reconciled.succeeded(body["charges"][0])
        return None

    def script(self, *behaviours: str, hang_s: float | None = None) -> None:
        body: dict[str, Any] = {"behaviours": list(behaviours)}
        if hang_s is not None:
            body["hang_s"] = hang_s
        self._request("POST", "/_control/script", body)

    def _request(self, method: str, path: str, body: Any = None, headers: dict | None = None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            payload = resp.read()
            return resp.status, json.loads(payload or b"{}"), resp.getheader("Idempotent-Replayed") == "true"
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise ProviderUnavailable(f"no answer from the provider: {type(exc).__name__}: {exc}") from exc
        finally:
            conn.close()


class ProviderUnavailable(Exception):
    """The provider gave no definite answer (timeout, dropped connection, 409, 5xx)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m outbox.demo.fake_provider",
                                     description="Fake payment provider on 127.0.0.1 (Idempotency-Key, charge log).")
    parser.add_argument("--port", type=int, default=8099, help="port on 127.0.0.1 (0 = any free port)")
    parser.add_argument("--hang-s", type=float, default=5.0, help="how long a `timeout` behaviour holds a request")
    args = parser.parse_args(argv)
    provider = FakeProvider(args.port, hang_s=args.hang_s).start()
    print(f"fake provider listening on {provider.url} (POST /v1/charges, GET /v1/charges?idempotency_key=K)",
          flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    provider.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
