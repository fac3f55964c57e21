"""A consumer process for the crash tests: applies deposits through the inbox Runner.

    python -m tests.workers.inbox_worker --topic T --consumer C [--kill-after N] [--handler-sleep-ms X]
                                         [--parallel N] [--typed] [--client kafka-python|confluent-kafka]

The database and broker come from OUTBOX_DATABASE_URL / OUTBOX_KAFKA_BOOTSTRAP (not argv, which
`ps` shows to everyone). --kill-after N makes the process SIGKILL itself right after the N-th
handler call made its writes and before the batch commits: the "between handler and commit" crash.
SIGTERM stops it gracefully (exit 0).
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
import threading
import time

from pydantic import BaseModel

from inbox import Handlers, RetryPolicy, Runner, run_consumer
from outbox.core.settings import load_settings
from tests.support.inbox import apply_deposit


class Deposited(BaseModel):
    account: str
    amount: int


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--topic", required=True)
    parser.add_argument("--consumer", required=True)
    parser.add_argument("--kill-after", type=int, default=0)
    parser.add_argument("--handler-sleep-ms", type=float, default=0)
    parser.add_argument("--poll-records", type=int, default=100)
    parser.add_argument("--parallel", type=int, default=1, help="Runner(parallel_partitions=N)")
    parser.add_argument("--typed", action="store_true",
                        help="dispatch through Handlers with a pydantic model per event type")
    parser.add_argument("--client", default="kafka-python", help="Runner(kafka_client=...)")
    args = parser.parse_args()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # tests.workers.process dumps a hung worker
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    # Warnings too: a worker that never gets records says why (coordinator, fencing, metadata).
    logging.getLogger("kafka").setLevel(logging.WARNING)
    settings = load_settings()
    handled = 0
    counting = threading.Lock()  # with --parallel the handler runs on several worker threads

    def handler(conn, msg):
        nonlocal handled
        apply_deposit(conn, msg)
        if args.handler_sleep_ms:
            time.sleep(args.handler_sleep_ms / 1000)
        with counting:
            handled += 1
            kill = handled == args.kill_after
        if kill:
            os.kill(os.getpid(), signal.SIGKILL)

    if args.typed:
        handlers = Handlers(unknown="dead-letter")
        handlers.on("Deposited", Deposited)(lambda conn, msg, deposited: handler(conn, msg))
        handle = handlers
    else:
        handle = handler
    runner = Runner(args.consumer, handle, dsn=settings.require_database_url(), bootstrap=settings.kafka_servers,
                    topics=[args.topic], max_poll_records=args.poll_records, poll_timeout_s=0.2,
                    parallel_partitions=args.parallel, kafka_client=args.client,
                    fetch_stall_s=10,  # well inside the tests' 60 s waits
                    policy=RetryPolicy(max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.05),
                    # Static membership: a restarted worker takes its partitions back at once instead
                    # of waiting for the killed member's session to time out.
                    kafka_config={"group_instance_id": f"{args.consumer}-worker", "session_timeout_ms": 10_000})
    return run_consumer(runner)


if __name__ == "__main__":
    sys.exit(main())
