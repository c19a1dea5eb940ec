"""Instructions per request by function, from two callgrind runs of one target that differ
only in the number of requests (bench/instructions.sh with CG_KEEP=DIR keeps them):

    .venv/bin/python bench/cg_diff.py DIR/free-200.out DIR/free-800.out 600 [--top 40] [--inclusive]

Each function's count in the small run is subtracted from the large run's and divided by the
difference in requests, which cancels start-up and shutdown like instructions.sh does. Self
cost by default (the instructions executed in the function itself); ``--inclusive`` adds
its callees'. CPython's functions are C functions here: ``_PyEval_EvalFrameDefault`` is the
interpreter running Python code, the rest names where the C-level work goes (dict and
object allocation, multidict, httptools, uvloop, the kernel's system calls are not counted).
"""

from __future__ import annotations

import argparse
import re
import subprocess
from collections import Counter

LINE = re.compile(r"^\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(?:\*\s+)?(.+?)\s*$")


def costs(path: str, inclusive: bool) -> Counter[str]:
    out = subprocess.run(
        ["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}",
         "--threshold=100", path], capture_output=True, text=True, check=True).stdout
    got: Counter[str] = Counter()
    started = False
    for line in out.splitlines():
        if "file:function" in line:
            started = True
            continue
        if not started:
            continue
        m = LINE.match(line)
        if m and ":" in m.group(2):
            name = m.group(2)
            name = re.sub(r" \[[^\]]*\]$", "", name)     # the object file
            name = re.sub(r"^/tmp/python-build[^/]*/Python-[^/]*/", "", name)   # CPython's build
            got[name] += int(m.group(1).replace(",", ""))
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("small")
    ap.add_argument("large")
    ap.add_argument("requests", type=int, help="requests in large minus requests in small")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--inclusive", action="store_true")
    a = ap.parse_args()
    small, large = costs(a.small, a.inclusive), costs(a.large, a.inclusive)
    per = {k: (large[k] - small.get(k, 0)) / a.requests for k in large}
    total = sum(v for v in per.values()) if not a.inclusive else None
    if total is not None:
        print(f"total (sum of self costs): {total:,.0f} per request")
    for name, v in sorted(per.items(), key=lambda kv: -kv[1])[:a.top]:
        print(f"{v:>10,.0f}  {name}")


if __name__ == "__main__":
    main()
