"""The scaling model's arithmetic (bench/scaling_model.py), on made-up costs."""

from __future__ import annotations

import pytest

from bench.scaling_model import Costs, costs_from, plan

COSTS = Costs(walsender_us=10.0, relay_us=50.0, inbox_us=20.0)  # 100k / 20k / 50k events/s per core


def test_slots_follow_the_relay_capacity_with_headroom_and_consumers_the_handler_time():
    p = plan(30_000, COSTS, headroom=0.5)  # a relay carries 20k/s, 10k/s at half load
    assert (p.slots, round(p.relay_load, 3)) == (3, 0.5)
    assert p.consumers == p.partitions == 2  # 50k/s per Runner, 25k/s at half load
    assert plan(30_000, COSTS, headroom=0.5, handler_ms=1.0).consumers == 62  # 1,020 us an event


def test_shards_of_one_outbox_pay_the_decoding_once_per_slot_on_the_same_server():
    separate = plan(40_000, COSTS, headroom=0.5, layout="databases")
    sharded = plan(40_000, COSTS, headroom=0.5, layout="shards")
    assert separate.slots == sharded.slots == 4
    assert separate.decode_cores_per_server == pytest.approx(0.1)  # 10k/s x 10 us on each server
    assert sharded.decode_cores_per_server == pytest.approx(1.6)  # 4 slots x 40k/s x 10 us


def test_costs_come_from_the_saved_benchmark_results_of_the_chosen_client():
    relay = {"results": {"pg_recvlogical_events_per_s": 100_000, "relay_e2e_events_per_s_with_delivery_rows": 10_000,
                         "relay_e2e_events_per_s_without_delivery_rows": 20_000,
                         "relay_e2e_events_per_s_with_delivery_rows_confluent_kafka": 40_000}}
    inbox = {"inbox_events_per_s": 50_000}
    assert costs_from(relay, inbox).relay_us == 50.0  # without delivery rows when measured
    assert costs_from(relay, inbox, "confluent-kafka").relay_us == 25.0
    assert (costs_from(relay, inbox).walsender_us, costs_from(relay, inbox).inbox_us) == (10.0, 20.0)


def test_nonsense_is_refused():
    for kwargs in ({"headroom": 0}, {"headroom": 1.5}, {"handler_ms": -1}, {"layout": "cloud"}):
        with pytest.raises(ValueError):
            plan(1000, COSTS, **kwargs)
