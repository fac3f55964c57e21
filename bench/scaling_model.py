"""How many slots, relays, partitions and consumers a target event rate needs, from measured costs.

    python -m bench.scaling_model --rate 50000 [--client confluent-kafka] [--handler-ms 2]
                                  [--layout databases|shards] [--headroom 0.6]

The costs come from the newest bench/results/relay-*.json and inbox-*.json on this machine kind
(re-run `make bench` on yours: the model is only as good as the numbers under it). docs/scaling.md
explains the model and what it leaves out. Pure arithmetic below; only main() reads files.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Costs:
    """Microseconds of one CPU per event, per stage."""

    walsender_us: float  # PostgreSQL: decoding + sending one outbox insert, per slot (pg_recvlogical)
    relay_us: float  # one relay process, end to end (it is bound to one core by the GIL)
    inbox_us: float  # one inbox Runner with an empty handler
    source: str = ""


@dataclass(frozen=True)
class Plan:
    rate: float
    slots: int  # = active relays (each with a standby that costs nothing until it takes over)
    relay_load: float  # fraction of its measured capacity each relay runs at
    decode_cores_per_server: float  # walsender CPU on the (busiest) PostgreSQL server
    consumers: int  # Runner instances for one consumer group
    partitions: int  # per topic, at least one per consumer instance

    def rows(self) -> list[tuple[str, str]]:
        return [("target", f"{self.rate:,.0f} events/s"),
                ("slots = active relays (+1 standby each)", f"{self.slots}"),
                ("each relay at", f"{self.relay_load:.0%} of its measured capacity"),
                ("walsender CPU on the busiest PostgreSQL server", f"{self.decode_cores_per_server:.2f} cores"),
                ("consumer instances (one consumer group)", f"{self.consumers}"),
                ("partitions per topic, at least", f"{self.partitions}")]


def costs_from(relay: dict, inbox: dict, client: str = "kafka-python") -> Costs:
    """Per-event costs from one relay and one inbox benchmark result (their JSON as saved)."""
    r = relay["results"]
    suffix = "" if client == "kafka-python" else "_" + client.replace("-", "_")
    e2e = r.get(f"relay_e2e_events_per_s_without_delivery_rows{suffix}") or r[f"relay_e2e_events_per_s_with_delivery_rows{suffix}"]
    return Costs(walsender_us=1e6 / r["pg_recvlogical_events_per_s"], relay_us=1e6 / e2e,
                 inbox_us=1e6 / inbox["inbox_events_per_s"],
                 source=f"{relay.get('when', '?')} ({client}), inbox {inbox.get('timestamp', '?')}")


def plan(rate: float, costs: Costs, *, layout: str = "databases", headroom: float = 0.6,
         handler_ms: float = 0.0) -> Plan:
    """`layout`: "databases" puts each slot on its own database server (the outboxes are separate);
    "shards" splits one outbox into slots on one server, where every slot's walsender decodes
    the whole WAL, so the server pays the decoding once per slot."""
    if rate <= 0 or not 0 < headroom <= 1 or handler_ms < 0:
        raise ValueError("rate > 0, 0 < headroom <= 1 and handler_ms >= 0")
    if layout not in ("databases", "shards"):
        raise ValueError(f"layout must be 'databases' or 'shards', not {layout!r}")
    relay_capacity = 1e6 / costs.relay_us
    slots = math.ceil(rate / (relay_capacity * headroom))
    per_slot = rate / slots
    if layout == "databases":
        decode = per_slot * costs.walsender_us / 1e6
    else:
        decode = slots * rate * costs.walsender_us / 1e6
    consumer_capacity = 1e6 / (costs.inbox_us + handler_ms * 1000)
    consumers = math.ceil(rate / (consumer_capacity * headroom))
    return Plan(rate, slots, per_slot / relay_capacity, decode, consumers, consumers)


def _newest(pattern: str) -> dict:
    files = sorted(RESULTS.glob(pattern))
    if not files:
        raise SystemExit(f"no {pattern} in {RESULTS}. Fix: run `make bench` first")
    return json.loads(files[-1].read_text())


def _newest_relay_with(client: str) -> dict:
    suffix = "" if client == "kafka-python" else "_" + client.replace("-", "_")
    for path in sorted(RESULTS.glob("relay-*.json"), reverse=True):
        doc = json.loads(path.read_text())
        if f"relay_e2e_events_per_s_with_delivery_rows{suffix}" in doc.get("results", {}):
            return doc
    raise SystemExit(f"no relay benchmark with {client} in {RESULTS}. Fix: python -m bench.relay_bench --clients {client}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, required=True, help="events per second to carry")
    parser.add_argument("--client", default="kafka-python", choices=["kafka-python", "confluent-kafka"])
    parser.add_argument("--layout", default="databases", choices=["databases", "shards"])
    parser.add_argument("--headroom", type=float, default=0.6, help="run each part at most at this share of capacity")
    parser.add_argument("--handler-ms", type=float, default=0.0, help="your handler's time per event")
    parser.add_argument("--relay-result", type=Path, help="a bench/results/relay-*.json (default: the newest)")
    parser.add_argument("--inbox-result", type=Path, help="a bench/results/inbox-*.json (default: the newest)")
    args = parser.parse_args()
    relay = json.loads(args.relay_result.read_text()) if args.relay_result else _newest_relay_with(args.client)
    inbox = json.loads(args.inbox_result.read_text()) if args.inbox_result else _newest("inbox-*.json")
    costs = costs_from(relay, inbox, args.client)
    print(f"costs per event from {costs.source}: walsender {costs.walsender_us:.1f} us, relay {costs.relay_us:.1f} us, "
          f"inbox {costs.inbox_us:.1f} us + handler {args.handler_ms * 1000:.0f} us")
    for name, value in plan(args.rate, costs, layout=args.layout, headroom=args.headroom,
                            handler_ms=args.handler_ms).rows():
        print(f"  {name:<48} {value}")


if __name__ == "__main__":
    main()
