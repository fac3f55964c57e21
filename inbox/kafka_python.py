"""The inbox's kafka-python consumer, with the two kafka-python 3.0 defects that would otherwise
stall or misconfigure it worked around on the instance (nothing is patched globally).

Each workaround is a no-op when the private attribute it relies on is missing, so a kafka-python
that fixes or renames it is used as it is; tests/inbox/test_dedupe_window.py and
tests/inbox/test_fetch_stall.py fail if one stops working."""

from kafka import KafkaConsumer


def consumer(config: dict) -> KafkaConsumer:
    kc = KafkaConsumer(**config)
    _no_topic_creation(kc, config)
    _rejoin_while_a_join_is_pending(kc)
    return kc


def _no_topic_creation(kc: KafkaConsumer, config: dict) -> None:
    """kafka-python 3.0 accepts allow_auto_create_topics but builds its cluster metadata without
    it, so every metadata request still asks the broker to create missing subscribed topics
    (with one partition and the broker's replication factor). Hand the setting on ourselves;
    tests/inbox/test_dedupe_window.py fails if a Runner creates its topic."""
    cluster = getattr(getattr(kc, "_client", None), "cluster", None)
    if cluster is not None and "allow_auto_create_topics" in getattr(cluster, "config", {}):
        cluster.config["allow_auto_create_topics"] = config["allow_auto_create_topics"]


def _rejoin_while_a_join_is_pending(kc: KafkaConsumer) -> None:
    """kafka-python 3.0.12 drives a JoinGroup/SyncGroup round only `while need_rejoin()`; Java's
    client loops while a rejoin is needed *or a join is pending* (rejoinNeededOrPending). A
    rebalance started by a metadata change (partitions added to a subscribed topic, or the
    topic's metadata arriving just after the first assignment) is not recorded in rejoin_needed,
    and the leader's own assignment makes need_rejoin() false again in the middle of the round.
    When a poll's timeout ends inside that round (our revoke listener settles the batch in flight
    first, which takes longer than a poll), the next poll returns without collecting the
    assignment: every partition stays "pending revocation", fetches nothing, and the group looks
    healthy. It failed a CI run and about one local run in ten. Counting a pending join as
    needing one makes the next poll finish the round."""
    coordinator = getattr(kc, "_coordinator", None)
    if coordinator is None or not hasattr(coordinator, "_join_task"):
        return
    need_rejoin = coordinator.need_rejoin
    coordinator.need_rejoin = lambda: need_rejoin() or coordinator._join_task is not None
