"""What the components stand on and the tooling around them.

outbox.core      shared by relay, inbox and dashboard; imports none of them
outbox.cli       the `outbox` command: wires each component's subcommands together
outbox.devstack  embedded PostgreSQL + Kafka for demos and tests (the `embedded` extra)
outbox.demo      the demo: a shop, a payment worker against a fake provider, faults on purpose
"""

__version__ = "0.1.0"
