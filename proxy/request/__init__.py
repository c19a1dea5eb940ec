"""The request path on the public port, one module per step, in the order a request meets
them (``pipeline.py`` runs them):

    context.py     RequestContext: the frozen per-request context the steps share
    auth.py        1. authentication: the API key -> key id and customer
    admission.py   2. admission: per-customer concurrency, metering available, credit hold
    forward.py     3. forwarding: the upstream head and the upstream pool (Upstream)
    stream.py      4. streaming and measuring: request body, response back, body inspector
    settle.py      5. settlement: quantities, credits settled, the usage row
    websocket.py   6. WebSocket relay (instead of 3-5 for a handshake)
    consumer.py    7. the consumer routes under the reserved prefix (``/_meter``)
    pipeline.py    the entry point that runs 1-6 and routes the proxy's own paths
"""
