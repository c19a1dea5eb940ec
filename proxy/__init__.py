"""meterproxy: a metering, prepaid-credit, Stripe-billing reverse proxy sidecar."""

__version__ = "0.1.0"
