"""The lock-free loop histograms expose the standard Prometheus histogram."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from proxy.metrics import LoopHistogram


@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=50))
def test_buckets_are_cumulative_counts_of_values_at_or_below_each_bound(values: list[float]) -> None:
    h = LoopHistogram("t_seconds", "test", (0.001, 0.01, 1.0))
    for v in values:
        h.observe(v)
    [family] = list(h.collect())
    got = {s.labels["le"]: s.value for s in family.samples if s.name == "t_seconds_bucket"}
    for bound, label in ((0.001, "0.001"), (0.01, "0.01"), (1.0, "1.0")):
        assert got[label] == sum(1 for v in values if v <= bound)
    assert got["+Inf"] == len(values)


def test_exposed_in_text_format() -> None:
    reg = CollectorRegistry()
    h = LoopHistogram("x_seconds", "doc", (0.5,))
    reg.register(h)
    h.observe(0.2)
    text = generate_latest(reg).decode()
    assert 'x_seconds_bucket{le="0.5"} 1.0' in text and "x_seconds_count 1.0" in text


def test_before_scrape_hooks_run_before_the_counters_are_read_and_go_with_their_owner() -> None:
    import gc

    from proxy import metrics

    class Owner:
        def __init__(self) -> None:
            self.pending = 3

        def flush(self) -> None:
            metrics.requests_total.labels("hook-test", "2xx").inc(self.pending)
            self.pending = 0

    owner = Owner()
    metrics.before_scrape(owner.flush)
    line = b'meterproxy_requests_total{code_class="2xx",rule="hook-test"} 3.0'
    assert line in generate_latest(metrics.REGISTRY)        # counted at this very scrape
    assert line in generate_latest(metrics.REGISTRY)        # and only once
    ours = metrics._BEFORE_SCRAPE.hooks[-1]
    del owner
    gc.collect()
    generate_latest(metrics.REGISTRY)
    assert ours not in metrics._BEFORE_SCRAPE.hooks          # a dead owner's hook is dropped
    assert all(ref() is not None for ref in metrics._BEFORE_SCRAPE.hooks)
