"""The fake payment provider honours Idempotency-Key like Stripe and the IETF draft, and runs
standalone (`python -m outbox.demo.fake_provider`) for the demo."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import urllib.parse

import pytest

from outbox.demo.fake_provider import FakeProvider, ProviderClient, ProviderUnavailable
from tests.support.helpers import wait_for
from tests.support.paths import REPO


def post(url, body, key=None):
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    headers = {"Content-Type": "application/json", **({"Idempotency-Key": key} if key else {})}
    conn.request("POST", "/v1/charges", body=json.dumps(body), headers=headers)
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read()), resp.getheader("Idempotent-Replayed")
    conn.close()
    return out


def test_idempotency_key_semantics():
    with FakeProvider(hang_s=1.0) as provider:
        assert post(provider.url, {"amount": 1}) == (400, {"error": "idempotency_key_missing"}, None)
        status, first, replayed = post(provider.url, {"amount": 5, "currency": "EUR"}, "k1")
        assert (status, replayed) == (201, None)
        assert post(provider.url, {"currency": "EUR", "amount": 5}, "k1") == (201, first, "true")
        assert post(provider.url, {"amount": 6, "currency": "EUR"}, "k1")[:2] == (
            422, {"error": "idempotency_key_reused", "idempotency_key": "k1"})

        provider.script("slow")  # the first request holds the key for a second
        slow = threading.Thread(target=post, args=(provider.url, {"amount": 7, "currency": "EUR"}, "k2"))
        slow.start()
        try:
            wait_for(lambda: any(r["key"] == "k2" for r in provider.requests()), 5, "the slow request")
            with pytest.raises(ProviderUnavailable, match="HTTP 409 idempotency_key_in_use"):
                ProviderClient(provider.url, timeout_s=5).charge("k2", 7, "EUR")
        finally:
            slow.join(5)
        assert [c["idempotency_key"] for c in provider.charges()] == ["k1", "k2"]
        with pytest.raises(ValueError, match="unknown behaviour"):
            provider.script("explode")


def test_stall_charges_before_holding_the_answer_and_the_log_keeps_metadata():
    """`stall` is the demo's crash window: the charge is in the log while the caller still waits."""
    with FakeProvider(hang_s=1.0) as provider:
        client = ProviderClient(provider.url, timeout_s=0.3)
        provider.script("stall")
        with pytest.raises(ProviderUnavailable, match="no answer"):
            client.charge("charge:order-7", 500, "EUR", metadata={"order_id": "7"})
        assert [(c["idempotency_key"], c["metadata"]) for c in provider.charges()] == [
            ("charge:order-7", {"order_id": "7"})]
        assert client.lookup("charge:order-7").outcome == "succeeded"
        # Asked again with the same key (and body), the provider replays: still one charge.
        assert ProviderClient(provider.url, timeout_s=5).charge(
            "charge:order-7", 500, "EUR", metadata={"order_id": "7"})["id"] == provider.charges()[0]["id"]
        assert len(provider.charges()) == 1


def test_standalone_server_is_scriptable_over_http_and_stops_on_sigterm():
    proc = subprocess.Popen([sys.executable, "-m", "outbox.demo.fake_provider", "--port", "0", "--hang-s", "0.2"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "fake provider listening on http://127.0.0.1:" in line
        url = line.split()[4]
        client = ProviderClient(url, timeout_s=2)
        client.script("drop")
        with pytest.raises(ProviderUnavailable, match="no answer"):
            client.charge("k-drop", 100, "EUR")
        found = client.lookup("k-drop")
        assert found.outcome == "succeeded" and found.response["amount"] == 100
        assert client.charge("k-drop", 100, "EUR") == found.response  # replayed by the provider
    finally:
        proc.terminate()
    assert proc.wait(10) == 0
