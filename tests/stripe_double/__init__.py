"""A faithful in-process Stripe test double for meterproxy's billing paths.

It behaves as ``docs/stripe-notes.md`` describes. Start it with
:func:`tests.stripe_double.fixture.run_stripe_double` or the pytest fixtures in
``tests.stripe_double.fixture``; run it by hand with
``python -m tests.stripe_double --port 12111``.
"""

from .app import create_app
from .faults import FAULT_KINDS, ROUTES, Faults
from .state import DoubleError, Meter, MeterEvent, StripeDoubleState

__all__ = [
    "FAULT_KINDS",
    "ROUTES",
    "DoubleError",
    "Faults",
    "Meter",
    "MeterEvent",
    "StripeDoubleState",
    "create_app",
]
