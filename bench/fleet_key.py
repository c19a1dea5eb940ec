"""For bench/instructions.sh's fleet target: wait for a member's admin port (it may run
under valgrind: slow), create customer ``bench`` and print a new API key for it.

usage: python bench/fleet_key.py ADMIN_URL TOKEN
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request


def call(url: str, token: str, path: str, body: object) -> dict[str, str]:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        out: dict[str, str] = json.loads(r.read())
        return out


def main(url: str, token: str) -> None:
    for _ in range(2000):
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5):
                break
        except OSError:
            time.sleep(0.2)
    call(url, token, "/admin/customers", {"id": "bench"})
    print(call(url, token, "/admin/customers/bench/keys", {"name": "bench"})["key"])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
