"""The outbox relay: tails the outbox table through logical replication and publishes to Kafka."""

__version__ = "0.1.0"
