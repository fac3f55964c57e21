"""The small HTTP server every component exposes its metrics and probes on (the relay's and the
inbox Runner's), in a daemon thread:

    GET /metrics   Prometheus text format of the component's own registry
    GET /healthz   liveness, JSON: 200 while the component's loop is alive, 503 otherwise
    GET /readyz    readiness, JSON: 200 when it does its work right now, 503 with the reasons otherwise

What healthy and ready mean is the component's business (relay/metrics.py, inbox/metrics.py);
this module only serves them. Loopback unless told otherwise (OUTBOX_METRICS_HOST).
"""

from __future__ import annotations

import errno
import json
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from outbox.core.settings import ConfigError

DEFAULT_HOST = "127.0.0.1"

Probe = Callable[[], tuple[int, dict]]  # () -> (HTTP status, JSON body)


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6  # "::" also accepts IPv4 where net.ipv6.bindv6only is 0 (Linux default)


def serve(registry: CollectorRegistry, health: Probe, readiness: Probe, port: int, host: str | None = None, *,
          name: str = "outbox-metrics", setting: str = "OUTBOX_METRICS_PORT") -> ThreadingHTTPServer:
    """Listen on host:port (port 0: a free port, see server.server_address) and serve until
    server.shutdown(). Raises ConfigError, naming `setting` and the fix, when it cannot listen there."""
    host = host or DEFAULT_HOST

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.startswith("/metrics"):
                code, body, ctype = 200, generate_latest(registry), CONTENT_TYPE_LATEST
            elif self.path.startswith("/healthz"):
                code, doc = health()
                body, ctype = json.dumps(doc).encode(), "application/json"
            elif self.path.startswith("/readyz"):
                code, doc = readiness()
                body, ctype = json.dumps(doc).encode(), "application/json"
            else:
                code, body, ctype = 404, b"try /metrics, /healthz or /readyz\n", "text/plain"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # scrapes every few seconds would flood the log
            pass

    try:
        server = (_IPv6Server if ":" in host else ThreadingHTTPServer)((host, port), Handler)
    except OSError as exc:
        raise ConfigError(f"cannot serve /metrics on {host}:{port}: {exc.strerror or exc}. Fix: "
                          f"{_bind_fix(exc.errno, setting, port)}") from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    return server


def _bind_fix(code: int | None, setting: str, port: int) -> str:
    if code == errno.EADDRINUSE:
        return (f"another process (a second relay or consumer on this host?) listens on {port}: set {setting} to "
                f"a free port, or to 0 to turn the endpoint off")
    if code == errno.EADDRNOTAVAIL:
        return "set OUTBOX_METRICS_HOST to an address of this machine (127.0.0.1, or 0.0.0.0 in a container)"
    if code == errno.EACCES:
        return f"ports below 1024 need privileges: set {setting} to 1024 or above"
    return f"choose another {setting} or OUTBOX_METRICS_HOST"
