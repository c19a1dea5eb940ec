"""The metered SSE request's own reading cost, without a proxy around it: deterministic under
callgrind, so a change to the stream inspector or to the quantity extraction is measured in
seconds instead of a full ``PAYLOAD=sse bench/instructions.sh`` run.

Per stream, the benchmark origin's 20-event stream (``bench/origin.py``: 19 content events,
the last one carrying ``usage.total_tokens``) of the ``bench/instructions.sh`` rule ``sse``
(preset openai_chat plus a constant api_calls):

- ``inspect``: the inspector made for the response, fed the 20 chunks, then its view;
- ``compute``: the measurement and the quantities of that view (``Measurement`` +
  ``compute``);
- ``body``: the same through ``body_measurement`` (what the proxy builds for this rule,
  whose usages read only the body and constants);
- ``head``: only the inspector's construction for the response (``Rule.new_inspector``);
- ``joined``: the inspector fed the 20 chunks joined in one piece (as the proxy's stream
  loop hands them over when they arrived together), then its view.

    for n in 200 1200; do valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python bench/sse_cost.py $n inspect 2>&1 | grep Collected; done
    # instructions per stream = (I(1200) - I(200)) / 1000

usage: python bench/sse_cost.py N inspect|compute|body|head|joined
"""

from __future__ import annotations

import sys
import tempfile
from decimal import Decimal
from pathlib import Path

from multidict import CIMultiDict, CIMultiDictProxy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from origin import SSE_CHUNKS  # (bench/ is the script's directory: on sys.path)

from proxy.rules import UNREADABLE, Measurement, body_measurement, compute, load_rules

JOINED = b"".join(SSE_CHUNKS)

RULES = """\
version: 1
meters: {api_calls: {stripe_event_name: api_calls}, llm_tokens: {stripe_event_name: llm_tokens}}
rules:
  - name: sse
    match: {path: /sse}
    usage: [{meter: llm_tokens, preset: openai_chat}, {meter: api_calls, quantity: 1}]
"""


def main(n: int, what: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "r.yaml"
        p.write_text(RULES)
        rule = load_rules([p]).rules[0]
    headers = CIMultiDictProxy(CIMultiDict([("Content-Type", "text/event-stream"),
                                            ("Transfer-Encoding", "chunked")]))
    insp = rule.new_inspector("text/event-stream", 1 << 20)
    assert insp is not None
    for c in SSE_CHUNKS:
        insp.feed(c)
    view = insp.result()
    for _ in range(n):
        if what == "inspect":
            insp = rule.new_inspector("text/event-stream", 1 << 20)
            assert insp is not None
            for c in SSE_CHUNKS:
                insp.feed(c)
            view = insp.result()
        elif what == "body":
            qs = compute(rule, body_measurement(200, view, False))
        elif what == "head":
            insp = rule.new_inspector("text/event-stream", 1 << 20, None)
        elif what == "joined":
            insp = rule.new_inspector("text/event-stream", 1 << 20, None)
            assert insp is not None
            insp.feed(JOINED)
            view = insp.result()
        else:
            m = Measurement(status=200, request_headers=headers, response_headers={},
                            query={}, path_params={}, request_json=UNREADABLE,
                            response_body=view, request_bytes=0, response_bytes=1420,
                            duration_ms=Decimal(1))
            qs = compute(rule, m)
    if what in ("inspect", "joined"):
        assert view.get("openai_chat.total") == 42
    elif what == "head":
        assert insp is not None
    else:
        assert [q.micro for q in qs] == [42_000_000, 1_000_000]


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
