"""The dedupe window must cover the replay horizon: checked when a Runner starts.

An inbox row purged after OUTBOX_INBOX_RETENTION_DAYS no longer suppresses a redelivery of its
event. Kafka can hand a consumer any record it still keeps (a group reset, a replay from the
start, a restored database re-reading from old offsets), so a window shorter than the topic's
retention lets an event be applied twice without anyone doing anything wrong. The Runner reads
each topic's retention.ms (and cleanup.policy: a compacted topic keeps the latest record of each
key forever) and refuses to start when its window is shorter, unless told the risk is accepted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping

from inbox.errors import InboxError

log = logging.getLogger("inbox")

DAY_S = 86_400.0
# What the fix suggests on top of the topic's retention: redeliveries trail the first delivery by
# up to the retention plus however long a backlog or outage lasts (docs/inbox.md, retention).
MARGIN_S = 2 * DAY_S


# A topic the relay has not created yet holds nothing to redeliver: it is checked once it exists,
# when its partitions get assigned (the Runner re-checks every topic on assignment until it has).
MISSING = None


def topic_horizons(admin_config: Mapping, topics: Iterable[str]) -> dict[str, float | str | None]:
    """Seconds each topic keeps records (math.inf when forever), MISSING for a topic that does not
    exist yet, or why its configuration could not be read."""
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

    topics = sorted(set(topics))
    admin = KafkaAdminClient(**admin_config)
    try:
        # "all": a topic without its own retention.ms inherits the broker's, which "modified" omits.
        described = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, t, ["retention.ms", "cleanup.policy"]) for t in topics],
            config_filter="all").get("topic", {})
        configs = {t: described.get(t) or {} for t in topics}
        retentions = {t: (c.get("retention.ms") or {}).get("value") for t, c in configs.items()}
        # Asked only now: a topic created a moment ago can be missing from the broker's metadata
        # for a while although its configuration is already there.
        existing = set(admin.list_topics()) if None in retentions.values() else set()
    finally:
        admin.close()
    out: dict[str, float | str | None] = {}
    for topic in topics:
        retention = retentions[topic]
        policy = (configs[topic].get("cleanup.policy") or {}).get("value") or "delete"
        if retention is None and topic not in existing:
            out[topic] = MISSING
        elif retention is None:
            # kafka-python reports a per-topic error (no DESCRIBE_CONFIGS, ...) as no configs.
            out[topic] = "its configuration could not be read (the consumer's principal needs DESCRIBE_CONFIGS " \
                         "on it)"
        elif "delete" not in policy.split(","):
            out[topic] = math.inf  # compacted only: the latest record of every key is kept forever
        else:
            ms = int(retention)
            out[topic] = math.inf if ms < 0 else ms / 1000
    return out


def check_window(consumer: str, window_s: float, horizons: Mapping[str, float | str | None], *,
                 allow_short: bool) -> set[str]:
    """Raise InboxError (or only warn, with allow_short) when the window cannot cover a topic.
    Returns the topics it checked (a MISSING one is not: its turn comes when it exists)."""
    problems = []
    checked = {t for t, h in horizons.items() if h is not MISSING}
    for topic, horizon in sorted(horizons.items()):
        if horizon is MISSING:
            log.info("consumer %s: topic %s does not exist yet; its retention is checked against the dedupe "
                     "window once it is assigned", consumer, topic)
        elif isinstance(horizon, str):
            problems.append(f"topic {topic}: {horizon}")
        elif horizon > window_s:
            problems.append(_too_short(topic, horizon, window_s))
        elif horizon + MARGIN_S > window_s:
            log.warning("consumer %s: the dedupe window (%s) covers topic %s's retention (%s) with less than %s "
                        "to spare; a redelivery after a backlog or an outage could outlive its inbox row. "
                        "Consider OUTBOX_INBOX_RETENTION_DAYS=%s", consumer, _days(window_s), topic,
                        _days(horizon), _days(MARGIN_S), _suggest(horizon))
    if not problems:
        return checked
    text = (f"consumer {consumer}: the dedupe window (inbox retention, {_days(window_s)}) is shorter than what "
            f"Kafka can redeliver, so an event redelivered after its inbox row is purged would be applied "
            f"again: " + "; ".join(problems))
    if allow_short:
        log.warning("%s. STARTING ANYWAY because allow_short_dedupe_window=True: duplicates older than the "
                    "window WILL be handled again", text)
        return checked
    raise InboxError(f"{text}. Or, if the handler tolerates those duplicates, pass allow_short_dedupe_window=True.")


def _too_short(topic: str, horizon: float, window_s: float) -> str:
    if math.isinf(horizon):
        return (f"topic {topic} keeps records forever (retention.ms=-1 or cleanup.policy=compact), which no "
                f"finite window covers. Fix: give the topic a finite retention.ms "
                f"(kafka-configs --alter --entity-type topics --entity-name {topic} --add-config retention.ms=...), "
                f"or never purge this consumer's inbox and pass retention_window_s=math.inf")
    return (f"topic {topic} keeps records for {_days(horizon)} (retention.ms={int(horizon * 1000)}). Fix: raise "
            f"OUTBOX_INBOX_RETENTION_DAYS (or retention_window_s) to at least the topic's retention plus a "
            f"margin, e.g. OUTBOX_INBOX_RETENTION_DAYS={_suggest(horizon)}, or lower the topic's retention.ms "
            f"below {int(window_s * 1000)}")


def _suggest(horizon: float) -> str:
    return f"{math.ceil((horizon + MARGIN_S) / DAY_S)}"


def _days(seconds: float) -> str:
    if math.isinf(seconds):
        return "forever"
    days, hours = seconds / DAY_S, seconds / 3600
    if days >= 1:
        return f"{days:g} day" + ("" if days == 1 else "s")
    return f"{hours:g} hour" + ("" if hours == 1 else "s")
