"""The outbox relay: tails the outbox table through logical replication and publishes to Kafka."""
