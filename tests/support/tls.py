"""A SASL_SSL Kafka for the security tests: its users' passwords and a throwaway CA and broker certificate."""

from __future__ import annotations

import subprocess
from pathlib import Path

ADMIN_PASSWORD = "admin-Pa55-9f3k"


RELAY_PASSWORD = "relay-Pa55-x7Qz"


APP_PASSWORD = "app-Pa55-m2Lw"


def make_certificates(directory: Path) -> tuple[Path, Path]:
    """(broker key + certificate PEM, CA PEM): a throw-away CA and a certificate for 127.0.0.1."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=outbox test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key", "-out", "broker.csr",
            "-subj", "/CN=127.0.0.1")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "broker.crt", "-days", "2", "-extfile", "san.ext")
    keystore = directory / "broker-keystore.pem"
    keystore.write_text((directory / "broker.key").read_text() + (directory / "broker.crt").read_text())
    return keystore, directory / "ca.pem"
