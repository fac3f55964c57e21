"""Embedded PostgreSQL + Kafka for demos and tests (`outbox dev`)."""

from relay.devstack.procs import StackError
from relay.devstack.stack import DevStack, StackUrls

__all__ = ["DevStack", "StackError", "StackUrls"]
