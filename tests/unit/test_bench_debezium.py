"""The Debezium benchmark's pure parts: ratios, rates, the printed row and the engine configuration."""

from bench.debezium_bench import client_tag, engine_properties, format_row, rate, ratio
from outbox.core.redact import Dsn


def test_ratio_is_ours_over_theirs_rounded_and_none_without_a_debezium_figure():
    assert ratio(20_000, 10_000) == 2.0
    assert ratio(10_000, 30_000) == 0.33
    assert ratio(10_000, 0) is None


def test_rate_is_zero_for_a_zero_duration():
    assert rate(50_000, 2.5) == 20_000
    assert rate(50_000, 0) == 0.0


def test_format_row_shows_both_rates_and_the_ratio():
    row = format_row("backlog", 12_345, 6_000)
    assert "12,345/s" in row and "6,000/s" in row and "ratio 2.06x" in row
    assert "ratio -x" in format_row("backlog", 1, 0)


def test_engine_properties_route_our_outbox_columns_and_match_the_relay_producer(tmp_path):
    props = engine_properties(Dsn("postgresql://u:pw@127.0.0.1:5555/app"), "127.0.0.1:9092",
                              tmp_path / "offsets.dat", "zstd", 5)
    assert props["database.port"] == "5555" and props["database.dbname"] == "app"
    assert props["plugin.name"] == "pgoutput" and props["publication.name"] == "outbox_events"
    assert props["transforms.outbox.type"] == "io.debezium.transforms.outbox.EventRouter"
    assert props["transforms.outbox.table.field.event.id"] == "event_id"
    assert props["transforms.outbox.table.field.event.key"] == "aggregate_id"
    assert props["transforms.outbox.route.by.field"] == "aggregate_type"
    assert props["producer.acks"] == "all" and props["producer.enable.idempotence"] == "true"
    assert props["producer.compression.type"] == "zstd"
    assert engine_properties(Dsn("postgresql://u@h/app"), "b", tmp_path / "o", None, 5)["producer.compression.type"] == "none"


def test_client_tag_keeps_the_default_clients_keys_unsuffixed():
    assert client_tag("kafka-python") == ""
    assert client_tag("confluent-kafka") == "_confluent_kafka"


def test_the_debezium_lock_pins_the_engine_connector_and_a_matching_slf4j_binding_by_sha256():
    from bench.debezium_bench import DEBEZIUM_VERSION
    from outbox.devstack.jars import DEBEZIUM_SLF4J, debezium_lockfile, parse_lock

    jars = {(j.group, j.artifact): j for j in parse_lock(debezium_lockfile(DEBEZIUM_VERSION))}
    assert jars[("io.debezium", "debezium-embedded")].version == DEBEZIUM_VERSION
    assert jars[("io.debezium", "debezium-connector-postgres")].version == DEBEZIUM_VERSION
    assert jars[("org.slf4j", "slf4j-api")].version == jars[("org.slf4j", "slf4j-simple")].version == DEBEZIUM_SLF4J
    assert all(len(j.sha256) == 64 and j.size > 0 for j in jars.values())


def test_client_tag_names_the_delivery_mode_except_the_default():
    assert client_tag("kafka-python", "at-least-once") == ""
    assert client_tag("kafka-python", "exactly-once") == "_exactly_once"
    assert client_tag("confluent-kafka", "exactly-once") == "_confluent_kafka_exactly_once"
