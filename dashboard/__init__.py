"""The operator dashboard (`outbox dashboard`) and `outbox status`.

The thresholds of the attention rules live here, light to import, because every `outbox` command
builds the `status` parser and should not load pandas to learn its defaults.
"""

# An event not in Kafka this long after its commit means the relay is behind or stuck.
MAX_IN_FLIGHT_AGE_S = 60.0
# A consumer with lag whose position has not moved for this long is stalled.
STALLED_AFTER_S = 300.0
