"""Builds the configured usage sink: the one place that maps ``stripe.sink`` to a class.

The dry-run sink is used only when chosen (``stripe.sink: dry_run``). A Stripe sink without
``stripe.api_key`` is refused at start (ConfigError naming both settings): falling back to
dry-run would let usage silently never reach Stripe.
"""

from __future__ import annotations

import logging

from proxy.config import StripeConfig
from proxy.errors import ConfigError
from proxy.sinks.base import Sink
from proxy.sinks.dry_run import DryRunSink
from proxy.stripe.client import StripeClient
from proxy.stripe.meter_event_stream import MeterEventStreamSink
from proxy.stripe.meter_events import MeterEventsSink
from proxy.stripe.usage_records import UsageRecordsSink

log = logging.getLogger("meterproxy.sink")


def connect(cfg: StripeConfig) -> StripeClient:
    """A new :class:`StripeClient` for ``cfg`` (each owner closes its own)."""
    return StripeClient.from_config(cfg)


def sink_problem(cfg: StripeConfig) -> str | None:
    """Why ``cfg`` cannot run its sink, or None."""
    if cfg.sink != "dry_run" and not cfg.api_key:
        return (f"stripe.api_key is empty but stripe.sink is {cfg.sink}"
                f"{' (the default)' if 'sink' not in cfg.model_fields_set else ''}: set"
                " stripe.api_key (the container config reads it from STRIPE_API_KEY), or choose"
                " the dry-run sink explicitly with `stripe.sink: dry_run` (logs meter events,"
                " sends nothing; a real sink configured later sends them)")
    return None


def build_sink(cfg: StripeConfig) -> Sink:
    problem = sink_problem(cfg)
    if problem is not None:
        raise ConfigError([problem])
    if cfg.sink == "dry_run":
        log.warning("stripe.sink is dry_run: meter events are logged, nothing is sent to Stripe")
        return DryRunSink()
    if cfg.sink == "meter_events":
        return MeterEventsSink(connect(cfg))
    if cfg.sink == "meter_event_stream":
        return MeterEventStreamSink(connect(cfg))
    if cfg.sink == "usage_records":
        return UsageRecordsSink(connect(cfg), cfg.subscription_items,
                                stripe_version=cfg.usage_records_version)
    raise ValueError(f"unknown stripe.sink {cfg.sink!r}")
