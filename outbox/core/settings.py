"""The one settings model every component reads (relay, inbox, dashboard, CLI, dev stack).

Values come from `OUTBOX_*` environment variables, then `.env`, then `.outbox/dev.env` (written
by `outbox dev up`), in that order of precedence. A bad value stops the program at start-up with
a `ConfigError` that names the variable, says what was wrong and how to fix it.
"""

from __future__ import annotations

import os
import re
import socket
import string
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    PlainSerializer,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from outbox.core.envelope import is_topic_name
from outbox.core.redact import MASK, Dsn, redact, register_secret

ENV_PREFIX = "OUTBOX_"
TOPIC_FIELDS = frozenset({"aggregate_type", "event_type"})
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class ConfigError(Exception):
    """A setting is missing or invalid; the message is meant for the operator as is."""


def _to_dsn(value: Any) -> Any:
    if value is None or isinstance(value, Dsn):
        return value
    if isinstance(value, str):
        return Dsn(value) if value.strip() else None
    raise ValueError("must be a string")


DsnSetting = Annotated[Dsn | None, BeforeValidator(_to_dsn), PlainSerializer(lambda d: d.masked if d else None)]

_SASL_CREDENTIALS = ("set OUTBOX_KAFKA_SASL_USERNAME and OUTBOX_KAFKA_SASL_PASSWORD, or use a protocol "
                     "without SASL")
# What to tell the operator when a variable is wrong: the fix, not the validator's internals.
_HINTS: dict[str, str] = {
    "database_url": "set it to a libpq URL such as postgresql://user:password@127.0.0.1:5432/app "
    "(run `outbox dev up` for a local one)",
    "kafka_bootstrap": "set it to a comma-separated list of host:port, e.g. 127.0.0.1:9092",
    "kafka_security_protocol": "use PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (what the broker's listener speaks)",
    "kafka_sasl_mechanism": "use PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
    "kafka_sasl_username": _SASL_CREDENTIALS,
    "kafka_sasl_password": _SASL_CREDENTIALS,
    "kafka_ssl_cafile": "point it to the PEM file of the CA that signed the brokers' certificates, or unset it "
    "to use the system's CAs",
    "kafka_client": "use kafka-python (default) or confluent-kafka (needs the confluent extra: "
    "pip install 'pg-outbox-relay[confluent]')",
    "delivery": "use at-least-once (default) or exactly-once",
    "slot_failover": "use auto, on or off",
    "slot_name": "use lower-case letters, digits and underscores, at most 63 characters, e.g. outbox_relay",
    "publication": "use lower-case letters, digits and underscores, at most 63 characters, e.g. outbox_events",
    "topic_template": "use a Python format string with only {aggregate_type} and {event_type}, "
    "e.g. outbox.event.{aggregate_type}",
    "compression": "use one of auto, zstd, lz4, gzip, snappy, none",
    "checkpoint_topic": "use a topic name such as outbox.relay.checkpoints",
    "dev_kafka": "use auto, apache or tansu",
    "log_format": "use text or json",
    "log_level": "use DEBUG, INFO, WARNING or ERROR",
    "metrics_host": "use an IP address to listen on: 127.0.0.1 (default) or 0.0.0.0 inside a container",
    "dashboard_host": "use an IP address to listen on: 127.0.0.1 (default) or 0.0.0.0 inside a container",
}


def _check_identifier(value: str) -> str:
    if not _IDENTIFIER.match(value):
        raise ValueError(f"{value!r} is not a safe PostgreSQL identifier")
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        # Later files win; real environment variables beat both.
        env_file=(".outbox/dev.env", ".env"),
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    # --- connections
    database_url: DsnSetting = None
    kafka_bootstrap: str = "127.0.0.1:9092"
    # Every Kafka client (relay, inbox, dashboard) connects with these.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    # The relay's producer only (issue 12): librdkafka moves the per-record cost out of Python, whose
    # one GIL caps kafka-python. Admin, checkpoint reader, inbox and dashboard stay on kafka-python.
    kafka_client: Literal["kafka-python", "confluent-kafka"] = "kafka-python"

    # --- relay
    delivery: Literal["at-least-once", "exactly-once"] = "at-least-once"
    slot_name: str = "outbox_relay"
    publication: str = "outbox_events"
    topic_template: str = "outbox.event.{aggregate_type}"
    relay_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    checkpoint_topic: str = "outbox.relay.checkpoints"
    compression: Literal["auto", "zstd", "lz4", "gzip", "snappy", "none"] = "auto"
    linger_ms: int = Field(default=5, ge=0, le=10_000)
    batch_max_events: int = Field(default=5_000, ge=1, le=1_000_000)
    batch_max_age_ms: int = Field(default=200, ge=1, le=60_000)
    max_record_bytes: int = Field(default=1_048_576, ge=1024)
    max_inflight_bytes: int = Field(default=64 * 1024 * 1024, ge=1024 * 1024)
    max_inflight_events: int = Field(default=20_000, ge=100)
    heartbeat_interval_s: float = Field(default=10.0, gt=0, le=3600)
    status_interval_s: float = Field(default=5.0, gt=0, le=60)
    track_deliveries: bool = True
    # Topics the relay sends to are created on first use (managed services often turn the broker's
    # auto-creation off). Unset partitions / replication factor = the broker's defaults.
    topic_create: bool = True
    topic_partitions: int | None = Field(default=None, ge=1, le=100_000)
    topic_replication_factor: int | None = Field(default=None, ge=1, le=32)
    # Failover slot (PostgreSQL 17+): synchronized to standbys with sync_replication_slots=on.
    slot_failover: Literal["auto", "on", "off"] = "auto"
    # /healthz turns unhealthy when events wait and nothing was acknowledged for this long.
    stall_timeout_s: float = Field(default=60.0, gt=0, le=86_400)
    metrics_port: int = Field(default=9464, ge=0, le=65535)
    # --- deployment: bind addresses (issue 11). Loopback by default so a laptop exposes nothing;
    # containers set 0.0.0.0 because their network namespace is the boundary, and probes come from outside it.
    metrics_host: str = "127.0.0.1"

    # --- inbox (consumers)
    inbox_max_attempts: int = Field(default=5, ge=1, le=100)
    inbox_backoff_initial_s: float = Field(default=0.2, gt=0, le=60)
    inbox_backoff_max_s: float = Field(default=10.0, gt=0, le=600)
    inbox_poll_records: int = Field(default=2_000, ge=1, le=100_000)  # max per poll = per PG transaction
    inbox_retention_days: float = Field(default=7.0, gt=0)
    inbox_purge_batch: int = Field(default=5_000, ge=1, le=1_000_000)  # rows per DELETE: bounds lock time
    effect_lease_s: float = Field(default=30.0, gt=0, le=86_400)
    effect_retention_days: float = Field(default=30.0, gt=0)  # settled keys; unknown/in-progress are kept
    # A Runner built by from_settings serves /metrics, /healthz, /readyz here (on metrics_host); 0: off.
    inbox_metrics_port: int = Field(default=0, ge=0, le=65535)
    inbox_parallel_partitions: int = Field(default=1, ge=1, le=64)

    # --- dashboard
    dashboard_port: int = Field(default=8501, ge=1, le=65535)
    dashboard_host: str = "127.0.0.1"  # deployment (issue 11): 0.0.0.0 in a container, see metrics_host
    # A login for the dashboard alone (default: database_url). Either way the dashboard switches to
    # dashboard_role, which can only read plus call outbox.resolve_effect (sql/004_dashboard.sql).
    dashboard_database_url: DsnSetting = None
    dashboard_role: str = Field(default="outbox_dashboard", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    dashboard_refresh_s: float = Field(default=10.0, ge=1, le=3600)

    # --- logging
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    # --- embedded dev stack
    dev_dir: Path = Path(".outbox")
    dev_kafka: Literal["auto", "apache", "tansu"] = "auto"
    dev_kafka_version: str = "4.1.1"
    dev_cache_dir: Path | None = None
    dev_pg_user: str = "outbox-dev"
    maven_repo: str = "https://repo1.maven.org/maven2"

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap(cls, value: str) -> str:
        servers = [s.strip() for s in value.split(",") if s.strip()]
        if not servers:
            raise ValueError("is empty")
        for server in servers:
            host, _, port = server.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{server!r} is not host:port")
        return ",".join(servers)

    @field_validator("metrics_host", "dashboard_host")
    @classmethod
    def _bind_host(cls, value: str) -> str:
        # An IP literal only: a host name would resolve at bind time, and to an address nobody expected.
        import ipaddress

        try:
            return str(ipaddress.ip_address(value.strip()))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address") from None

    @field_validator("kafka_sasl_username", "kafka_sasl_password")
    @classmethod
    def _sasl_credentials(cls, value: Any, info: ValidationInfo) -> Any:
        protocol = info.data.get("kafka_security_protocol", "")
        given = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(value, SecretStr) and given:
            register_secret(given)  # masked in every log line from now on, this validator's errors included
        if protocol.startswith("SASL") and not given:
            raise ValueError(f"is required with OUTBOX_KAFKA_SECURITY_PROTOCOL={protocol}")
        if given and protocol and not protocol.startswith("SASL"):
            # Ignoring it would log in with no credentials at all: refuse rather than guess the intent.
            raise ValueError(f"is set but OUTBOX_KAFKA_SECURITY_PROTOCOL={protocol} sends no credentials. Fix: use "
                             f"SASL_SSL or SASL_PLAINTEXT, or unset OUTBOX_KAFKA_SASL_USERNAME and "
                             f"OUTBOX_KAFKA_SASL_PASSWORD")
        return value

    @field_validator("kafka_client")
    @classmethod
    def _client_installed(cls, value: str) -> str:
        # At start-up, not at the first session: a missing extra is a configuration error like any other.
        import importlib.util

        if value == "confluent-kafka" and importlib.util.find_spec("confluent_kafka") is None:
            raise ValueError("confluent-kafka is not installed")
        return value

    @field_validator("kafka_ssl_cafile")
    @classmethod
    def _cafile(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return value
        protocol = info.data.get("kafka_security_protocol", "")
        if protocol and not protocol.endswith("SSL"):
            # The user asked for TLS; connecting in clear text instead would be a silent downgrade.
            raise ValueError(f"is set but OUTBOX_KAFKA_SECURITY_PROTOCOL={protocol} does not encrypt, so the CA "
                             f"file would be ignored. Fix: use SSL or SASL_SSL, or unset OUTBOX_KAFKA_SSL_CAFILE")
        if not value.is_file():
            raise ValueError(f"{str(value)!r} is not a readable file")
        return value

    @field_validator("slot_name", "publication")
    @classmethod
    def _identifier(cls, value: str) -> str:
        return _check_identifier(value)

    @field_validator("topic_template")
    @classmethod
    def _template(cls, value: str) -> str:
        try:
            parsed = list(string.Formatter().parse(value))
        except ValueError as exc:
            raise ValueError(f"is not a valid format string ({exc})") from None
        fields = {name for _, name, _, _ in parsed if name is not None}
        if any(spec or conversion for _, name, spec, conversion in parsed if name is not None):
            # {aggregate_type:d} fails on every event and {aggregate_type!r} adds quotes: plain fields only.
            raise ValueError("uses a format spec or conversion (':...' or '!...'); write the plain "
                             "{aggregate_type} and {event_type}")
        unknown = fields - TOPIC_FIELDS
        if unknown:
            raise ValueError(f"uses unknown placeholder(s) {sorted(unknown)}")
        # Its fixed text alone must already be legal, or every event would be dead-lettered.
        literal = "".join(text for text, _, _, _ in parsed)
        bad = sorted(set(re.sub(r"[a-zA-Z0-9._-]", "", literal)))
        if bad:
            raise ValueError(f"contains {bad}, which Kafka does not allow in topic names (only letters, digits, "
                             f"'.', '_' and '-')")
        if not fields and not is_topic_name(value):
            raise ValueError("is not a legal Kafka topic name")
        if value.startswith("__"):
            raise ValueError("starts with '__', which Kafka keeps for its internal topics")
        return value

    @field_validator("checkpoint_topic")
    @classmethod
    def _topic_name(cls, value: str) -> str:
        if not is_topic_name(value) or value.startswith("__"):
            raise ValueError("is not a legal Kafka topic name of our own (1-249 letters, digits, '.', '_' or '-', "
                             "not '.' or '..', not starting with '__')")
        return value

    def require_database_url(self) -> Dsn:
        if self.database_url is None:
            raise ConfigError(
                f"{ENV_PREFIX}DATABASE_URL is not set. Fix: {_HINTS['database_url']}, "
                f"or `source {self.dev_dir / 'dev.env'}` after `outbox dev up`."
            )
        return self.database_url

    @property
    def kafka_servers(self) -> list[str]:
        return self.kafka_bootstrap.split(",")

    def kafka_security(self) -> dict[str, Any]:
        """kafka-python options for authentication and encryption, the same for every client."""
        options: dict[str, Any] = {"security_protocol": self.kafka_security_protocol}
        if self.kafka_security_protocol.startswith("SASL"):
            options.update(sasl_mechanism=self.kafka_sasl_mechanism, sasl_plain_username=self.kafka_sasl_username,
                           sasl_plain_password=self.kafka_sasl_password.get_secret_value())
        if self.kafka_security_protocol.endswith("SSL") and self.kafka_ssl_cafile is not None:
            options["ssl_cafile"] = str(self.kafka_ssl_cafile)
        return options

    @property
    def kafka_description(self) -> str:
        """Where and how the Kafka clients connect, for logs (never the password)."""
        how = self.kafka_security_protocol
        if how.startswith("SASL"):
            how += f", {self.kafka_sasl_mechanism} as {self.kafka_sasl_username!r}"
        return f"{self.kafka_bootstrap} ({how})"

    def kafka_client_options(self) -> dict[str, Any]:
        """bootstrap_servers plus kafka_security(): what every KafkaProducer/Consumer/AdminClient gets."""
        return {"bootstrap_servers": self.kafka_servers, **self.kafka_security()}


def load_settings(*, warn_unknown: bool = True, **overrides: Any) -> Settings:
    """Build the settings, turning pydantic's validation report into one actionable ConfigError.
    warn_unknown=False: the caller calls warn_unknown_variables() itself once its logging is set up."""
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None
    if warn_unknown:
        warn_unknown_variables()
    return settings


# --- unknown OUTBOX_* variables (issue 11)
# extra="ignore" is what lets one environment serve every component, but it also made a typo such as
# OUTBOX_DELIVERY_MODE silently fall back to the default. So each unknown name is named once per
# process, with the closest setting. Values are never shown: the variable could hold a password.

# Read by the test suite, not by the settings model.
NOT_SETTINGS = frozenset({"OUTBOX_REQUIRE_BROWSER", "OUTBOX_REQUIRE_PROMTOOL", "OUTBOX_TEST_SEED",
                          "OUTBOX_UPDATE_SCREENSHOTS"})
_warned: set[str] = set()


def known_variables() -> frozenset[str]:
    return frozenset(ENV_PREFIX + name.upper() for name in Settings.model_fields)


def unknown_variables(environ: dict[str, str] | None = None) -> dict[str, str | None]:
    """Unknown OUTBOX_* names in the environment and the env files -> the closest known variable."""
    import difflib

    names = {k.upper() for k in (os.environ if environ is None else environ) if k.upper().startswith(ENV_PREFIX)}
    if environ is None:
        names |= _env_file_names()
    known = known_variables()
    return {name: next(iter(difflib.get_close_matches(name, known, n=1, cutoff=0.6)), None)
            for name in sorted(names - known - NOT_SETTINGS)}


def _env_file_names() -> set[str]:
    from dotenv import dotenv_values

    names: set[str] = set()
    for path in Settings.model_config["env_file"]:
        if Path(path).is_file():
            names |= {k.upper() for k in dotenv_values(path) if k.upper().startswith(ENV_PREFIX)}
    return names


def warn_unknown_variables() -> None:
    import logging

    log = logging.getLogger("outbox.settings")
    for name, closest in unknown_variables().items():
        if name in _warned:
            continue
        _warned.add(name)
        hint = f"; did you mean {closest}?" if closest else ""
        log.warning("%s is not a setting and is ignored%s (docs/configuration.md lists them)", name, hint)


def describe_validation_error(exc: ValidationError) -> str:
    lines = ["invalid configuration:"]
    for err in exc.errors(include_url=False):
        field = str(err["loc"][0]) if err["loc"] else "?"
        var = ENV_PREFIX + field.upper()
        shown = redact(repr(err.get("input"))) if "input" in err else "?"
        if field == "kafka_sasl_password" and err.get("input"):
            shown = repr(MASK)  # even a password too short for redact() to mask
        reason = err["msg"].removeprefix("Value error, ")
        fix = None if " Fix: " in reason else _HINTS.get(field)  # a reason may carry its own, more precise fix
        if fix is None and err["type"].startswith(("greater", "less")):
            fix = "choose a value within the allowed range"
        line = f"  {var}={shown}: {reason}."
        if fix:
            line += f" Fix: {fix}."
        lines.append(line)
    return "\n".join(lines)


# --- docs/configuration.md (issue 11), generated: python -m outbox.core.settings --markdown > docs/configuration.md
# One line per setting; tests/project/test_configuration_doc.py fails when the committed file is stale or a
# new setting has no line here.

SETTING_DOCS: dict[str, str] = {
    "database_url": "libpq URL or key=value DSN of the application database; its password is masked everywhere",
    "kafka_bootstrap": "comma-separated host:port list of Kafka brokers",
    "kafka_security_protocol": "what the brokers' listener speaks; used by the relay, inbox and dashboard alike",
    "kafka_sasl_mechanism": "SASL mechanism with a SASL_* protocol",
    "kafka_sasl_username": "SASL user (required with a SASL_* protocol)",
    "kafka_sasl_password": "SASL password (required with a SASL_* protocol); masked in every log line",
    "kafka_ssl_cafile": "PEM file of the CA that signed the brokers' certificates; system CAs when unset",
    "kafka_client": "the relay's Kafka producer and the inbox Runner's consumer (`Runner.from_settings`): "
                    "`confluent-kafka` (librdkafka, the `confluent` extra) moves the per-record cost out of Python; "
                    "same partitions, delivery and exactly-once semantics, positions still from PostgreSQL",
    "delivery": "`exactly-once` needs a broker with correct transactions (Apache Kafka)",
    "slot_name": "logical replication slot; relays with the same slot form one active/standby group",
    "publication": "publication over outbox.events",
    "topic_template": "Kafka topic per event, with {aggregate_type} and {event_type}",
    "relay_id": "name of this relay process in outbox.relay_instances and the dashboard",
    "checkpoint_topic": "topic of the exactly-once checkpoints",
    "compression": "Kafka compression; auto: zstd, else lz4 when installed (the codecs extra), else none",
    "linger_ms": "producer linger: how long a record waits for its batch to fill",
    "batch_max_events": "events per relay batch at most",
    "batch_max_age_ms": "a batch is closed after this long",
    "max_record_bytes": "larger events are dead-lettered instead of failing the batch",
    "max_inflight_bytes": "bytes sent to Kafka and not yet acknowledged at most (back-pressure)",
    "max_inflight_events": "events sent to Kafka and not yet acknowledged at most (back-pressure)",
    "heartbeat_interval_s": "how often a relay records that it is alive",
    "status_interval_s": "how often the relay sends its position to PostgreSQL (standby status update)",
    "track_deliveries": "record topic/partition/offset per event for the dashboard's trace view",
    "topic_create": "create the topics the relay sends to on first use (for brokers with auto-creation off)",
    "topic_partitions": "partitions of a topic the relay creates (default: the broker's)",
    "topic_replication_factor": "replication factor of a topic the relay creates (default: the broker's)",
    "slot_failover": "create the slot as a failover slot on PostgreSQL 17+ (auto), always (on) or never (off)",
    "stall_timeout_s": "/healthz turns unhealthy when events wait and nothing was acknowledged for this long",
    "metrics_port": "port of /metrics, /healthz (liveness) and /readyz (readiness); 0 turns the server off",
    "metrics_host": "address the metrics servers (relay and inbox Runner) listen on; 0.0.0.0 in a container",
    "inbox_max_attempts": "handler attempts before a record is dead-lettered",
    "inbox_backoff_initial_s": "first retry delay of a failing handler",
    "inbox_backoff_max_s": "longest retry delay of a failing handler",
    "inbox_poll_records": "records per poll, and so per PostgreSQL transaction, at most",
    "inbox_retention_days": "inbox rows older than this are purged",
    "inbox_purge_batch": "rows per DELETE when purging (bounds lock time)",
    "effect_lease_s": "how long an effect attempt holds its lease before another worker may take it",
    "effect_retention_days": "settled effect keys older than this are purged; unknown/in-progress ones are kept",
    "inbox_parallel_partitions": "worker threads processing different partitions of a poll at once (each its own "
                                 "PostgreSQL connection and transaction); for handlers that wait on I/O",
    "inbox_metrics_port": "port of a consumer Runner's /metrics, /healthz and /readyz (on OUTBOX_METRICS_HOST); "
                          "0 (default) turns its server off",
    "dashboard_port": "port of `outbox dashboard`",
    "dashboard_host": "address the dashboard listens on; 0.0.0.0 in a container (it has no login of its own)",
    "dashboard_database_url": "a login for the dashboard alone (default: OUTBOX_DATABASE_URL)",
    "dashboard_role": "the role the dashboard switches to: read-only plus outbox.resolve_effect",
    "dashboard_refresh_s": "how often the dashboard's pages refresh",
    "log_level": "log level of every component",
    "log_format": "`json` for structured logs",
    "dev_dir": "where `outbox dev` keeps the embedded servers and dev.env",
    "dev_kafka": "broker of the dev stack: Apache Kafka when Java 17+ is found (auto), or Tansu",
    "dev_kafka_version": "Apache Kafka version of the dev stack (its jars are pinned by SHA-256)",
    "dev_cache_dir": "where the Kafka jars are cached (default $XDG_CACHE_HOME or ~/.cache, then outbox/)",
    "dev_pg_user": "system user that runs the embedded PostgreSQL when started as root",
    "maven_repo": "Maven repository the Kafka jars are fetched from",
}

_SECTIONS = {"database_url": "Connections", "delivery": "Relay", "inbox_max_attempts": "Inbox (consumers)",
             "dashboard_port": "Dashboard", "log_level": "Logging", "dev_dir": "Embedded dev stack (`outbox dev`)"}


def _doc_default(name: str, field: Any) -> str:
    if name == "relay_id":
        return "host name-PID"
    default = field.default
    if default is None:
        return "—"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    return f"`{default}`"


def _doc_allowed(field: Any) -> str:
    from typing import get_args, get_origin

    if get_origin(field.annotation) is Literal:
        return ", ".join(f"`{v}`" for v in get_args(field.annotation))
    bounds = []
    for m in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                bounds.append(f"{sign} {getattr(m, attr):,}".replace(",", " "))
    return ", ".join(bounds)


def markdown() -> str:
    missing = set(Settings.model_fields) - set(SETTING_DOCS)
    if missing:
        raise SystemExit(f"SETTING_DOCS has no line for: {', '.join(sorted(missing))}")
    out = ["# Configuration", "",
           "<!-- Generated from outbox/core/settings.py by `python -m outbox.core.settings --markdown > docs/configuration.md`;"
           " do not edit by hand. -->", "",
           "Every component reads one settings model: `OUTBOX_*` environment variables, then `.env`, then",
           "`.outbox/dev.env` (written by `outbox dev up`). A bad value stops the program at start-up with the",
           "variable's name and the fix; an unknown `OUTBOX_*` name is named in a warning with the closest one."]
    for name, field in Settings.model_fields.items():
        if name in _SECTIONS:
            out += ["", f"## {_SECTIONS[name]}", "", "| Variable | Default | Allowed | |", "|---|---|---|---|"]
        out.append(f"| `{ENV_PREFIX}{name.upper()}` | {_doc_default(name, field)} | {_doc_allowed(field)} | "
                   f"{SETTING_DOCS[name]} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--markdown"]:
        raise SystemExit("usage: python -m outbox.core.settings --markdown > docs/configuration.md")
    sys.stdout.write(markdown())
