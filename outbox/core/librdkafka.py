"""kafka-python option names in librdkafka's (confluent-kafka's) names, shared by every component
that can run on either client (OUTBOX_KAFKA_CLIENT): the relay's producer and the inbox's consumer.

Components build their configuration in kafka-python's names (Settings.kafka_security(), the
inbox Runner's kafka_config) and translate here, so a setting means the same on both clients.
No confluent_kafka import: this module only renames.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Settings.kafka_security() -> librdkafka
SECURITY_NAMES = {
    "security_protocol": "security.protocol",
    "sasl_mechanism": "sasl.mechanism",
    "sasl_plain_username": "sasl.username",
    "sasl_plain_password": "sasl.password",
    "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location",
    "ssl_keyfile": "ssl.key.location",
    "ssl_password": "ssl.key.password",
}

# KafkaConsumer options -> librdkafka, where the meaning is the same.
CONSUMER_NAMES = {
    **SECURITY_NAMES,
    "client_id": "client.id",
    "group_id": "group.id",
    "group_instance_id": "group.instance.id",
    "auto_offset_reset": "auto.offset.reset",
    "isolation_level": "isolation.level",
    "enable_auto_commit": "enable.auto.commit",
    "allow_auto_create_topics": "allow.auto.create.topics",
    "session_timeout_ms": "session.timeout.ms",
    "heartbeat_interval_ms": "heartbeat.interval.ms",
    "max_poll_interval_ms": "max.poll.interval.ms",
    # librdkafka refreshes the metadata of subscribed topics on this interval (a topic created after
    # the subscription is noticed then); metadata.max.age.ms is only its cache's lifetime.
    "metadata_max_age_ms": "topic.metadata.refresh.interval.ms",
    "max_partition_fetch_bytes": "max.partition.fetch.bytes",
    "fetch_max_bytes": "fetch.max.bytes",
    "fetch_min_bytes": "fetch.min.bytes",
    "fetch_max_wait_ms": "fetch.wait.max.ms",
    "reconnect_backoff_ms": "reconnect.backoff.ms",
    "reconnect_backoff_max_ms": "reconnect.backoff.max.ms",
    "request_timeout_ms": "socket.timeout.ms",
    "receive_buffer_bytes": "socket.receive.buffer.bytes",
    "send_buffer_bytes": "socket.send.buffer.bytes",
    "connections_max_idle_ms": "connections.max.idle.ms",
    "partition_assignment_strategy": "partition.assignment.strategy",
}

# Options kafka-python has and librdkafka does without (or handles itself): accepted, not passed.
# max_poll_records is the adapter's batch size (consume(num_messages=...)), not a librdkafka option.
CONSUMER_IGNORED = {"api_version", "check_crcs", "max_poll_records", "consumer_timeout_ms", "retry_backoff_ms"}


class UnknownOption(ValueError):
    """A kafka-python option with no librdkafka counterpart here; the message names the fix."""


def security_config(options: Mapping[str, Any]) -> dict[str, Any]:
    """Settings.kafka_security() (kafka-python names) in librdkafka's names."""
    return {SECURITY_NAMES[k]: v for k, v in options.items()}


def consumer_config(options: Mapping[str, Any]) -> dict[str, Any]:
    """KafkaConsumer options (kafka-python names) as a confluent_kafka.Consumer configuration.

    Keys already in librdkafka's dotted form pass through unchanged, so a caller can set an option
    only librdkafka has. bootstrap_servers may be a list, as for kafka-python; None means "not set"
    in kafka-python and is left out. Anything else raises UnknownOption with the fix."""
    config: dict[str, Any] = {}
    for key, value in options.items():
        if key in CONSUMER_IGNORED:
            continue
        if "." in key:
            config[key] = value
        elif key == "bootstrap_servers":
            config["bootstrap.servers"] = value if isinstance(value, str) else ",".join(value)
        elif key == "partition_assignment_strategy" and not isinstance(value, str):
            raise UnknownOption("partition_assignment_strategy: give librdkafka's names as one string, e.g. "
                                "'partition.assignment.strategy': 'range,roundrobin' or 'cooperative-sticky'")
        elif key in CONSUMER_NAMES:
            if value is None:
                continue  # kafka-python's "not set"
            config[CONSUMER_NAMES[key]] = str(value) if CONSUMER_NAMES[key].startswith("ssl.") else value
        else:
            raise UnknownOption(f"kafka_config option {key!r} has no librdkafka counterpart here: with "
                                f"kafka_client='confluent-kafka' give librdkafka's own name instead (dotted, "
                                f"e.g. 'fetch.wait.max.ms'; see librdkafka's CONFIGURATION.md), or leave it out")
    return config
