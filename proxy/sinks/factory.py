"""Builds the configured usage sink: the one place that maps ``stripe.sink`` to a class.

No API key means the dry-run sink whatever ``stripe.sink`` says, so a fresh install never
reaches Stripe by accident.
"""

from __future__ import annotations

import logging

from proxy.config import StripeConfig
from proxy.sinks.base import Sink
from proxy.sinks.dry_run import DryRunSink
from proxy.sinks.meter_event_stream import MeterEventStreamSink
from proxy.sinks.meter_events import MeterEventsSink
from proxy.sinks.stripe_client import StripeConnection
from proxy.sinks.usage_records import UsageRecordsSink

log = logging.getLogger("meterproxy.sink")


def connect(cfg: StripeConfig) -> StripeConnection:
    return StripeConnection(cfg.api_key, api_base=cfg.api_base,
                            meter_events_base=cfg.meter_events_base, timeout=cfg.timeout)


def build_sink(cfg: StripeConfig) -> Sink:
    if cfg.sink == "dry_run" or not cfg.api_key:
        if cfg.sink != "dry_run":
            log.warning("stripe.api_key is empty: using the dry-run sink instead of %s", cfg.sink)
        return DryRunSink()
    if cfg.sink == "meter_events":
        return MeterEventsSink(connect(cfg))
    if cfg.sink == "meter_event_stream":
        return MeterEventStreamSink(connect(cfg))
    if cfg.sink == "usage_records":
        return UsageRecordsSink(connect(cfg), cfg.subscription_items,
                                stripe_version=cfg.usage_records_version)
    raise ValueError(f"unknown stripe.sink {cfg.sink!r}")
