"""Cost of body inspection, per body, on this machine (no network):

    python bench/body_inspect.py

- a 2.3 MB chat completion with logprobs: buffered+orjson (cap raised) vs the over-cap key scan;
- the same body gzip-compressed: decoded for inspection;
- a 20-event openai_chat stream: inspected, and through the usage-chunk filter.
"""

from __future__ import annotations

import gzip
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.rules.sse import (
    JsonInspector,
    Probe,
    SseInspector,
    UsageChunkFilter,
    new_inspector,
)

TOTAL = Probe("t", ("usage", "total_tokens"))


def best(fn: Callable[[], object], n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def feed_json(body: bytes, cap: int, encoding: str | None = None) -> object:
    insp = new_inspector((TOTAL,), (TOTAL,), "application/json", cap, encoding)
    assert insp is not None
    for i in range(0, len(body), 65536):
        insp.feed(body[i:i + 65536])
    view = insp.result()
    assert view.get("t") == 321, view
    return view


def main() -> None:
    doc = {"choices": [{"logprobs": {"content": [
        {"token": "tok", "logprob": -0.5, "top_logprobs": [{"token": "x", "logprob": -1}]}
    ] * 30000}}], "usage": {"total_tokens": 321}}
    body = orjson.dumps(doc)
    gz = gzip.compress(body)
    mb = len(body) / 1e6
    buffered = best(lambda: feed_json(body, 1 << 30), 5)
    scanned = best(lambda: feed_json(body, 1 << 20), 5)
    decoded = best(lambda: feed_json(gz, 1 << 20, "gzip"), 5)
    print(f"{mb:.1f} MB JSON, buffered + orjson:  {buffered * 1e3:7.1f} ms")
    print(f"{mb:.1f} MB JSON, over-cap key scan:  {scanned * 1e3:7.1f} ms")
    print(f"{mb:.1f} MB JSON, gzip ({len(gz) // 1024} KiB) decoded + scanned: "
          f"{decoded * 1e3:7.1f} ms")
    assert isinstance(JsonInspector((TOTAL,), 1), JsonInspector)

    events = [b"data: " + orjson.dumps({"id": "c", "choices": [{"delta": {"content": f"w{i}"}}],
                                        "usage": None}) + b"\n\n" for i in range(20)]
    events.append(b'data: {"id":"c","choices":[],"usage":{"total_tokens":321}}\n\n')
    events.append(b"data: [DONE]\n\n")

    def inspect() -> None:
        s = SseInspector((TOTAL,), 1 << 20)
        for e in events:
            s.feed(e)
        assert s.result().get("t") == 321

    def strip() -> None:
        f = UsageChunkFilter(1 << 20)
        out = [f.feed(e) for e in events]
        assert len(b"".join(out)) == sum(map(len, events)) - len(events[-2])

    n = len(events)
    print(f"{n}-event openai_chat stream, inspected: {best(inspect, 200) * 1e6:7.1f} us")
    print(f"{n}-event openai_chat stream, usage chunk filtered: "
          f"{best(strip, 200) * 1e6:7.1f} us")


if __name__ == "__main__":
    main()
