"""Run the Stripe double by hand: ``python -m tests.stripe_double --port 12111``."""

from __future__ import annotations

import argparse
import asyncio
import sys

from .fixture import start_stripe_double


async def _main(args: argparse.Namespace) -> None:
    double = await start_stripe_double(
        host=args.host,
        port=args.port,
        seed=args.seed,
        processing_delay=args.processing_delay,
        summary_lag=args.summary_lag,
        session_ttl=args.session_ttl,
        hang_seconds=args.hang_seconds,
        log=lambda line: print(line, flush=True),
    )
    for event_name in args.meter:
        meter = double.state.add_meter(event_name)
        print(f"meter {meter.id} event_name={event_name}", flush=True)
    print(double.url, flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await double.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.stripe_double")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=12111)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processing-delay", type=float, default=0.0)
    parser.add_argument("--summary-lag", type=float, default=0.0)
    parser.add_argument("--session-ttl", type=float, default=15 * 60)
    parser.add_argument("--hang-seconds", type=float, default=2.0)
    parser.add_argument(
        "--meter", action="append", default=[], help="seed an active sum meter for EVENT_NAME"
    )
    args = parser.parse_args(argv)
    try:
        asyncio.run(_main(args))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
