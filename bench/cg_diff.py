"""Per-function instructions per request from the callgrind outputs ``bench/instructions.sh``
keeps with ``KEEP=DIR``: for each target, (I(800) - I(200)) / 600 per function (inclusive or
self), and for two targets the difference (what the second costs over the first).

usage: KEEP=/tmp/cg bench/instructions.sh free strict
       python bench/cg_diff.py /tmp/cg free strict [--self] [--top N]
       python bench/cg_diff.py /tmp/cg strict                # one target's breakdown

C functions only: CPython 3.11 runs Python code inside ``_PyEval_EvalFrameDefault``, so the
Python layer shows as the C it calls (sqlite3, orjson, uvloop, object allocation, ...).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

_LINE = re.compile(r"^\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(\S.*)$")


def per_function(path: Path, inclusive: bool) -> dict[str, int]:
    out = subprocess.run(
        ["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}",
         "--threshold=100", str(path)],
        check=True, capture_output=True, text=True).stdout
    res: dict[str, int] = {}
    started = False
    for line in out.splitlines():
        if not started:
            started = "file:function" in line
            continue
        m = _LINE.match(line)
        if m is None:
            continue
        name = re.sub(r" \[[^\]]*\]$", "", m.group(2).strip())
        name = re.sub(r"^/tmp/python-build[^/]*/Python-[^/]*/", "", name)
        res[name] = res.get(name, 0) + int(m.group(1).replace(",", ""))
    return res


def per_request(d: Path, target: str, inclusive: bool) -> dict[str, float]:
    a = per_function(d / f"{target}-200.out", inclusive)
    b = per_function(d / f"{target}-800.out", inclusive)
    return {k: (b.get(k, 0) - a.get(k, 0)) / 600 for k in set(a) | set(b)}


def main(argv: list[str]) -> None:
    inclusive = "--self" not in argv
    top = 60
    if "--top" in argv:
        top = int(argv[argv.index("--top") + 1])
        argv = [a for i, a in enumerate(argv) if a != "--top" and argv[i - 1] != "--top"]
    args = [a for a in argv if not a.startswith("--")]
    d = Path(args[0])
    targets = args[1:]
    if len(targets) == 1:
        r = per_request(d, targets[0], inclusive)
        for k, v in sorted(r.items(), key=lambda kv: -abs(kv[1]))[:top]:
            print(f"{v:12,.0f}  {k}")
        return
    base, other = (per_request(d, t, inclusive) for t in targets[:2])
    diff = {k: other.get(k, 0) - base.get(k, 0) for k in set(base) | set(other)}
    print(f"{'diff':>12}  {targets[0]:>12}  {targets[1]:>12}  function")
    for k, v in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:top]:
        print(f"{v:12,.0f}  {base.get(k, 0):12,.0f}  {other.get(k, 0):12,.0f}  {k}")


if __name__ == "__main__":
    main(sys.argv[1:])
