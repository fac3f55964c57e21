"""Settings: one model, OUTBOX_* variables, .env files, and errors that name the variable and the fix."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from outbox.core.logs import RedactingFilter
from outbox.core.redact import Dsn, redact
from outbox.core.settings import ConfigError, load_settings

pytestmark = pytest.mark.usefixtures("clean_env")

SECRET = "s3cr3t-Pa55"


def test_defaults():
    s = load_settings()
    assert s.delivery == "at-least-once"
    assert s.topic_template == "outbox.event.{aggregate_type}"
    assert s.kafka_servers == ["127.0.0.1:9092"]
    assert s.database_url is None


def test_environment_variables_are_read(monkeypatch):
    monkeypatch.setenv("OUTBOX_DATABASE_URL", f"postgresql://app:{SECRET}@db:5432/app")
    monkeypatch.setenv("OUTBOX_DELIVERY", "exactly-once")
    monkeypatch.setenv("OUTBOX_KAFKA_BOOTSTRAP", "k1:9092, k2:9093")
    s = load_settings()
    assert s.delivery == "exactly-once"
    assert s.kafka_servers == ["k1:9092", "k2:9093"]
    assert s.database_url.secret() == f"postgresql://app:{SECRET}@db:5432/app"


def test_env_files_dev_env_then_dotenv_then_environment(tmp_path, monkeypatch):
    (tmp_path / ".outbox").mkdir()
    (tmp_path / ".outbox" / "dev.env").write_text(
        "export OUTBOX_DATABASE_URL='postgresql://postgres:pw@127.0.0.1:1/app'\nexport OUTBOX_SLOT_NAME=from_dev\n")
    (tmp_path / ".env").write_text("OUTBOX_SLOT_NAME=from_dotenv\nOUTBOX_PUBLICATION=pub_dotenv\n")
    monkeypatch.setenv("OUTBOX_PUBLICATION", "pub_env")
    s = load_settings()
    assert s.database_url.params()["port"] == "1"
    assert s.slot_name == "from_dotenv"
    assert s.publication == "pub_env"


@pytest.mark.parametrize(
    ("var", "value", "expected"),
    [
        ("OUTBOX_DELIVERY", "exactly_once", "OUTBOX_DELIVERY='exactly_once'"),
        ("OUTBOX_KAFKA_BOOTSTRAP", "localhost", "is not host:port"),
        ("OUTBOX_SLOT_NAME", "My-Slot", "not a safe PostgreSQL identifier"),
        ("OUTBOX_TOPIC_TEMPLATE", "events.{tenant}", "unknown placeholder(s) ['tenant']"),
        ("OUTBOX_TOPIC_TEMPLATE", "events.{aggregate_type", "not a valid format string"),
        ("OUTBOX_TOPIC_TEMPLATE", "order events.{aggregate_type}", "contains [' '], which Kafka does not allow"),
        ("OUTBOX_TOPIC_TEMPLATE", "__events.{aggregate_type}", "starts with '__'"),
        ("OUTBOX_TOPIC_TEMPLATE", "..", "is not a legal Kafka topic name"),
        ("OUTBOX_CHECKPOINT_TOPIC", "relay checkpoints", "is not a legal Kafka topic name"),
        ("OUTBOX_CHECKPOINT_TOPIC", "__consumer_offsets", "not starting with '__'"),
        ("OUTBOX_LINGER_MS", "-1", "OUTBOX_LINGER_MS='-1'"),
        ("OUTBOX_DATABASE_URL", "postgresql://u:pw@host:notaport/db", "not a valid PostgreSQL connection string"),
    ],
)
def test_invalid_values_name_the_variable_and_the_fix(monkeypatch, var, value, expected):
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    message = str(err.value)
    assert var in message
    assert expected in message
    assert "Fix:" in message


def test_several_errors_are_reported_at_once(monkeypatch):
    monkeypatch.setenv("OUTBOX_DELIVERY", "twice")
    monkeypatch.setenv("OUTBOX_COMPRESSION", "brotli")
    message = str(pytest.raises(ConfigError, load_settings).value)
    assert "OUTBOX_DELIVERY" in message and "OUTBOX_COMPRESSION" in message


def test_missing_database_url_says_how_to_get_one():
    with pytest.raises(ConfigError, match=r"OUTBOX_DATABASE_URL is not set\. Fix: .*outbox dev up"):
        load_settings().require_database_url()


@pytest.mark.parametrize(
    "dsn",
    [
        f"postgresql://app:{SECRET}@db.internal:5432/app?sslmode=require",
        f"host=db.internal port=5432 user=app password={SECRET} dbname=app",
        f"host=db.internal password='{SECRET}' dbname=app",
        f"postgresql://app@db.internal/app?password={SECRET}",
    ],
)
def test_dsn_password_never_appears_in_str_repr_or_settings_dump(dsn):
    d = Dsn(dsn)
    assert d.secret() == dsn
    for shown in (str(d), repr(d), f"{d}", d.masked, redact(dsn)):
        assert SECRET not in shown
        assert "***" in shown
    s = load_settings(database_url=dsn)
    assert SECRET not in repr(s) and SECRET not in str(s.model_dump()) and SECRET not in s.model_dump_json()


def test_invalid_dsn_error_does_not_echo_the_password(monkeypatch):
    monkeypatch.setenv("OUTBOX_DATABASE_URL", f"postgresql://app:{SECRET}@db:99999999/app")
    message = str(pytest.raises(ConfigError, load_settings).value)
    assert SECRET not in message and "OUTBOX_DATABASE_URL" in message


def test_logging_filter_redacts_messages_args_and_tracebacks():
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "connecting to %s", (f"postgresql://u:{SECRET}@h/db",),
                               None)
    try:
        raise RuntimeError(f"failed: password={SECRET} host=h")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    record.dsn = f"postgresql://u:{SECRET}@h/db"
    RedactingFilter().filter(record)
    rendered = logging.Formatter().format(record)
    assert SECRET not in rendered and SECRET not in record.dsn
    assert "postgresql://u:***@h/db" in rendered


def test_cli_exits_2_with_the_message_on_bad_configuration(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "OUTBOX_DELIVERY": "maybe",
           "OUTBOX_DATABASE_URL": f"postgresql://u:{SECRET}@127.0.0.1:1/db"}
    result = subprocess.run([sys.executable, "-m", "outbox.cli", "migrate"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "OUTBOX_DELIVERY='maybe'" in result.stderr and "Fix: use at-least-once" in result.stderr
    assert SECRET not in result.stderr


def test_a_metrics_port_already_taken_stops_the_relay_with_exit_2_and_the_fix(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"PATH": "/usr/bin:/bin", "OUTBOX_METRICS_PORT": str(port),
               "OUTBOX_DATABASE_URL": f"postgresql://u:{SECRET}@127.0.0.1:1/db"}
        result = subprocess.run([sys.executable, "-m", "outbox.cli", "relay"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"outbox: cannot serve /metrics on 127.0.0.1:{port}: Address already in use. Fix: another process (a second "
        f"relay or consumer on this host?) listens on {port}: set OUTBOX_METRICS_PORT to a free port, or to 0 to "
        f"turn the endpoint off"]


def test_cli_connection_failure_is_one_line_without_the_password(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "OUTBOX_DATABASE_URL": f"postgresql://u:{SECRET}@127.0.0.1:1/db"}
    result = subprocess.run([sys.executable, "-m", "outbox.cli", "migrate"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("outbox migrate: error: cannot connect to postgresql://u:***@127.0.0.1:1/db: ")
    assert "Connection refused" in line
    assert line.endswith("Fix: check that PostgreSQL runs there and that OUTBOX_DATABASE_URL is right")
    assert SECRET not in result.stderr and "Traceback" not in result.stderr


def test_sasl_without_credentials_names_both_variables(monkeypatch):
    monkeypatch.setenv("OUTBOX_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("OUTBOX_KAFKA_SASL_USERNAME", "relay")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert str(err.value) == (
        "invalid configuration:\n"
        "  OUTBOX_KAFKA_SASL_PASSWORD=None: is required with OUTBOX_KAFKA_SECURITY_PROTOCOL=SASL_SSL. "
        "Fix: set OUTBOX_KAFKA_SASL_USERNAME and OUTBOX_KAFKA_SASL_PASSWORD, or use a protocol without SASL.")
    monkeypatch.setenv("OUTBOX_KAFKA_SECURITY_PROTOCOL", "SASL")
    with pytest.raises(ConfigError, match="OUTBOX_KAFKA_SECURITY_PROTOCOL='SASL'.*Fix: use PLAINTEXT, SSL, "):
        load_settings()


def test_missing_ca_file_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("OUTBOX_KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("OUTBOX_KAFKA_SSL_CAFILE", str(tmp_path / "nope.pem"))
    with pytest.raises(ConfigError, match=r"OUTBOX_KAFKA_SSL_CAFILE=.*nope.pem.*is not a readable file"):
        load_settings()


def test_sasl_password_is_masked_everywhere_and_reaches_every_kafka_client(monkeypatch, tmp_path):
    password = "k4fka-Pa55'word"
    monkeypatch.setenv("OUTBOX_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("OUTBOX_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("OUTBOX_KAFKA_SASL_USERNAME", "relay")
    monkeypatch.setenv("OUTBOX_KAFKA_SASL_PASSWORD", password)
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("OUTBOX_KAFKA_SSL_CAFILE", str(tmp_path / "ca.pem"))
    s = load_settings()
    assert s.kafka_client_options() == {
        "bootstrap_servers": ["127.0.0.1:9092"], "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "relay", "sasl_plain_password": password, "ssl_cafile": str(tmp_path / "ca.pem")}
    assert s.kafka_description == "127.0.0.1:9092 (SASL_SSL, SCRAM-SHA-512 as 'relay')"
    for text in (repr(s), str(s.model_dump()), s.model_dump_json()):
        assert password not in text
    # kafka-python logs SASL frames as bytes reprs at DEBUG level: both forms are masked.
    frame = f"SaslAuthenticateRequest(auth_bytes={(b'relay' + bytes(1) + password.encode())!r})"
    assert "k4fka" not in redact(f"login with {password} failed; {frame}")


def test_security_settings_the_protocol_would_ignore_are_refused_not_dropped(monkeypatch, tmp_path):
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("OUTBOX_KAFKA_SSL_CAFILE", str(tmp_path / "ca.pem"))
    with pytest.raises(ConfigError) as err:  # PLAINTEXT by default: TLS was asked for, clear text would be used
        load_settings()
    assert str(err.value) == (
        f"invalid configuration:\n  OUTBOX_KAFKA_SSL_CAFILE='{tmp_path / 'ca.pem'}': is set but "
        "OUTBOX_KAFKA_SECURITY_PROTOCOL=PLAINTEXT does not encrypt, so the CA file would be ignored. "
        "Fix: use SSL or SASL_SSL, or unset OUTBOX_KAFKA_SSL_CAFILE.")
    monkeypatch.setenv("OUTBOX_KAFKA_SECURITY_PROTOCOL", "SSL")
    assert load_settings().kafka_security() == {"security_protocol": "SSL", "ssl_cafile": str(tmp_path / "ca.pem")}

    monkeypatch.setenv("OUTBOX_KAFKA_SASL_USERNAME", "relay")
    monkeypatch.setenv("OUTBOX_KAFKA_SASL_PASSWORD", "pw")  # too short for redact(): still never shown
    message = str(pytest.raises(ConfigError, load_settings).value)
    assert "OUTBOX_KAFKA_SASL_USERNAME='relay': is set but OUTBOX_KAFKA_SECURITY_PROTOCOL=SSL sends no credentials. " \
           "Fix: use SASL_SSL or SASL_PLAINTEXT, or unset OUTBOX_KAFKA_SASL_USERNAME and " \
           "OUTBOX_KAFKA_SASL_PASSWORD." in message
    assert "OUTBOX_KAFKA_SASL_PASSWORD='***': is set but" in message
    assert "'pw'" not in message
    monkeypatch.setenv("OUTBOX_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    assert load_settings().kafka_security()["sasl_plain_username"] == "relay"


def test_plaintext_clients_get_no_security_options():
    assert load_settings().kafka_security() == {"security_protocol": "PLAINTEXT"}


# ----- unknown OUTBOX_* variables and bind addresses (issue 11)


def test_a_misspelt_variable_is_named_once_with_the_closest_setting(monkeypatch, caplog, fresh_warnings):
    monkeypatch.setenv("OUTBOX_DELIVER", "exactly-once")
    monkeypatch.setenv("OUTBOX_KAFKA_SASL_PASSWORT", SECRET)
    monkeypatch.setenv("OUTBOX_ZZZ_NOTHING_LIKE_IT", "1")
    monkeypatch.setenv("OUTBOX_REQUIRE_BROWSER", "1")  # the test suite's own knob: not a typo
    with caplog.at_level(logging.WARNING, logger="outbox.settings"):
        s = load_settings()
        load_settings()  # logged once per process, not per load
    assert s.delivery == "at-least-once"  # the typo did not take effect; hence the warning
    messages = [r.getMessage() for r in caplog.records if r.name == "outbox.settings"]
    assert messages == [
        "OUTBOX_DELIVER is not a setting and is ignored; did you mean OUTBOX_DELIVERY? "
        "(docs/configuration.md lists them)",
        "OUTBOX_KAFKA_SASL_PASSWORT is not a setting and is ignored; did you mean OUTBOX_KAFKA_SASL_PASSWORD? "
        "(docs/configuration.md lists them)",
        "OUTBOX_ZZZ_NOTHING_LIKE_IT is not a setting and is ignored (docs/configuration.md lists them)",
    ]
    assert SECRET not in caplog.text


def test_misspelt_variables_in_env_files_are_named_too(tmp_path, caplog, fresh_warnings):
    (tmp_path / ".env").write_text("OUTBOX_SLOT_NAMES=x\nOUTBOX_SLOT_NAME=ok_slot\n")
    with caplog.at_level(logging.WARNING, logger="outbox.settings"):
        assert load_settings().slot_name == "ok_slot"
    assert "OUTBOX_SLOT_NAMES is not a setting and is ignored; did you mean OUTBOX_SLOT_NAME?" in caplog.text


def test_known_variables_raise_no_warning(monkeypatch, caplog, fresh_warnings):
    monkeypatch.setenv("OUTBOX_METRICS_HOST", "0.0.0.0")
    monkeypatch.setenv("OUTBOX_DASHBOARD_HOST", "::")
    with caplog.at_level(logging.WARNING, logger="outbox.settings"):
        s = load_settings()
    assert (s.metrics_host, s.dashboard_host) == ("0.0.0.0", "::")
    assert not [r for r in caplog.records if r.name == "outbox.settings"]


def test_the_cli_prints_the_warning_at_start_up(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OUTBOX_")}
    env["OUTBOX_METRICS_PROT"] = "9999"
    result = subprocess.run([sys.executable, "-m", "outbox.cli", "migrate"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2  # no OUTBOX_DATABASE_URL
    assert "OUTBOX_METRICS_PROT is not a setting and is ignored; did you mean OUTBOX_METRICS_PORT?" in result.stderr
    assert result.stderr.count("OUTBOX_METRICS_PROT") == 1
    env["OUTBOX_LOG_FORMAT"] = "json"  # a container's log collector gets it as one JSON record
    result = subprocess.run([sys.executable, "-m", "outbox.cli", "migrate"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    record = next(json.loads(line) for line in result.stderr.splitlines() if "OUTBOX_METRICS_PROT" in line)
    assert record["level"] == "warning" and "did you mean OUTBOX_METRICS_PORT?" in record["msg"]


@pytest.mark.parametrize("value", ["localhost", "0.0.0.0.0", "my host"])
def test_bind_hosts_must_be_ip_addresses(monkeypatch, value):
    monkeypatch.setenv("OUTBOX_METRICS_HOST", value)
    with pytest.raises(ConfigError, match=r"OUTBOX_METRICS_HOST=.*is not an IP address.*Fix: use an IP address"):
        load_settings()
