"""A worker that charges through the effects ledger and is killed after the provider charged but
before the result was recorded: the seed's payment worker crash, for real.

    python -m tests.workers.effect_worker --provider URL --key K --amount N [--lease-s S]

OUTBOX_DATABASE_URL comes from the environment. Exits only by SIGKILL (it kills itself).
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys

from inbox import Effects
from outbox.core.settings import load_settings
from outbox.demo.fake_provider import ProviderClient


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--provider", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--amount", type=int, required=True)
    parser.add_argument("--lease-s", type=float, default=1.0)
    args = parser.parse_args()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # tests.workers.process dumps a hung worker
    provider = ProviderClient(args.provider)
    effects = Effects(load_settings().require_database_url(), lease_s=args.lease_s, owner="doomed-worker")

    def charge_then_die(key: str):
        provider.charge(key, args.amount, "EUR")  # the provider has charged and answered...
        os.kill(os.getpid(), signal.SIGKILL)  # ...and the worker dies before recording it

    effects.run(args.key, {"amount": args.amount, "currency": "EUR"}, charge_then_die)
    return 1  # unreachable: the call never returns


if __name__ == "__main__":
    sys.exit(main())
