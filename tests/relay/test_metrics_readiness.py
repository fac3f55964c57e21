"""/healthz (liveness) and /readyz (readiness) of the relay's metrics server, without servers of
our own: the daemon's part is played by setting RelayMetrics' attributes as the daemon does."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from outbox.devstack.procs import free_port
from relay.metrics import RelayMetrics, serve


def get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_starting_relay_is_live_but_not_ready(served):
    metrics, port = served
    assert get(port, "/healthz") == (200, {"status": "ok", "role": "starting", "last_error": None,
                                           "seconds_since_loop": 0.0, "publishing_stalled": False})
    code, body = get(port, "/readyz")
    assert code == 503 and body["status"] == "not ready" and body["role"] == "starting"
    assert body["streaming"] is False and body["kafka_ok"] is False


def test_standby_is_live_and_answers_503_with_its_role(served):
    metrics, port = served
    metrics.role = "standby"
    metrics.tick()
    assert get(port, "/healthz")[0] == 200
    code, body = get(port, "/readyz")
    assert code == 503 and body["role"] == "standby"
    assert any("another relay holds the slot" in r for r in body["reasons"])


def test_ready_needs_active_streaming_and_kafka(served):
    metrics, port = served
    metrics.role = "active"
    metrics.active.set(1)
    metrics.streaming = True
    assert get(port, "/readyz")[0] == 503  # explicit flags: Kafka not confirmed yet
    metrics.kafka_ok = True
    assert get(port, "/readyz") == (200, {"status": "ready", "role": "active", "streaming": True, "kafka_ok": True,
                                          "reasons": [], "last_error": None})
    metrics.kafka_ok = False  # one failed round trip: out of rotation at once, still alive
    metrics.last_error = "KafkaTimeoutError: Batch for TopicPartition expired"
    code, body = get(port, "/readyz")
    assert code == 503 and body["reasons"] == ["last contact with Kafka failed or none yet"]
    assert body["last_error"].startswith("KafkaTimeoutError")
    assert get(port, "/healthz")[0] == 200
    metrics.kafka_ok = True
    metrics.streaming = False
    assert get(port, "/readyz")[0] == 503


def test_unhealthy_is_never_ready(served):
    metrics, port = served
    metrics.role, metrics.streaming, metrics.kafka_ok = "active", True, True
    metrics.healthy = False
    assert get(port, "/healthz")[0] == 503
    assert get(port, "/readyz")[0] == 503


def test_readiness_inferred_from_a_daemon_that_does_not_report_the_flags(served):
    """Today's daemon sets role + outbox_relay_active only once its stream is open, and clears the
    gauge when the session ends: without the explicit flags that is what /readyz goes by."""
    metrics, port = served
    metrics.role = "active"
    assert get(port, "/readyz")[0] == 503
    metrics.active.set(1)
    assert get(port, "/readyz")[0] == 200
    metrics.active.set(0)  # the session failed; the daemon restarts it
    assert get(port, "/readyz")[0] == 503


def test_ready_gauge_is_exported(served):
    metrics, port = served
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert "outbox_relay_ready 0.0" in text
    metrics.role, metrics.streaming, metrics.kafka_ok = "active", True, True
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert "outbox_relay_ready 1.0" in resp.read().decode()


def test_ready_gauge_of_a_daemon_that_does_not_report_the_flags(served):
    """The inferred readiness reads outbox_relay_active while /metrics collects the registry."""
    metrics, port = served
    metrics.role = "active"
    metrics.active.set(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert "outbox_relay_ready 1.0" in resp.read().decode()


def test_bind_host_comes_from_the_metrics_object():
    metrics = RelayMetrics()
    metrics.bind_host = "0.0.0.0"
    port = free_port()
    server = serve(metrics, port)
    try:
        assert server.server_address[0] == "0.0.0.0"
        assert get(port, "/healthz")[0] == 200
    finally:
        server.shutdown()
        server.server_close()
    assert serve(metrics, 0) is None
