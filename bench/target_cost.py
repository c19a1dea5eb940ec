"""CPU cost of turning the request target into the matched path and the upstream URL,
counted by callgrind (deterministic, unlike wall-clock on a shared machine).

    before: request.path + request.path_qs + URL(base + path_qs)   (what the handler did)
    after:  proxy.target.canonical(raw_path) + Upstream's URL memo  (what it does now)

Both include what aiohttp does either way (URL.build by the parser, path_safe by the
router). Instructions per request = (I(n=12000) - I(n=2000)) / 10000, which cancels start-up:

    for m in none before after; do for n in 2000 12000; do
      valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python bench/target_cost.py $m /v1/items?count_all=1 $n 2>&1 | grep Collected
    done; done

A target ending in '=' gets a unique suffix per request (every memo misses).
"""

from __future__ import annotations

import sys

from yarl import URL

from proxy.target import canonical

BASE = "http://127.0.0.1:9000"


def main(mode: str, raw0: str, n: int) -> None:
    urls: dict[str, URL] = {}
    for i in range(n):
        raw = raw0 + str(i) if raw0.endswith("=") else raw0[:1] + raw0[1:]   # a fresh str
        p, _, q = raw.partition("?")
        u = URL.build(path=p, query_string=q, encoded=True)    # aiohttp's parser, both
        _ = u.path_safe                                         # aiohttp's router, both
        if mode == "before":
            _ = u.path
            URL(BASE + str(u))
        elif mode == "after":
            _, target = canonical(raw)
            url = urls.get(target)                              # as proxy.request.forward.Upstream
            if url is None:
                url = URL(BASE + target, encoded=True)
                if len(target) <= 256:
                    if len(urls) >= 4096:
                        urls.clear()
                    urls[target] = url


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
