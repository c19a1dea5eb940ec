#!/usr/bin/env python3
"""Run meterproxy from another checkout of the repository (for an A/B against it):

  python bench/checkout_proxy.py /path/to/checkout serve --config x.yaml

e.g. ``bench/latency.py --before "$PWD/.venv/bin/python bench/checkout_proxy.py /work/main"``
(git worktree add /tmp/base <commit> for any other commit). The checkout's ``proxy`` package
is imported ahead of this one's; the dependencies are this venv's.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    root = Path(sys.argv.pop(1)).resolve()
    sys.path.insert(0, str(root))
    from proxy.cli import main

    assert Path(sys.modules["proxy"].__file__ or "").resolve().is_relative_to(root)
    sys.exit(main())
