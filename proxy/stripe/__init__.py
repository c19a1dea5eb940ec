"""Everything meterproxy does with Stripe, behind one client.

  client.py              :class:`~proxy.stripe.client.StripeClient`, one named method per
                         Stripe call, and ``translate``: the one mapping from the SDK's and
                         the network's exceptions to :class:`proxy.errors.StripeCallError`
  meter_events.py        the v1 meter events sink (one event per call)
  meter_event_stream.py  the v2 meter event stream sink (sessions, 100 events per call)
  usage_records.py       the legacy usage records sink (raw request, pinned API version)
  factory.py             ``stripe.sink`` -> the sink (the dry-run sink included)
  prices.py              fetching Stripe Prices and the refreshing price cache

No module outside this package imports the ``stripe`` SDK (tests/test_stripe_client.py
checks it). The sink interface and the dry-run sink live in :mod:`proxy.sinks`; the price
math in :mod:`proxy.pricing`.
"""
