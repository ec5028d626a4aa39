"""`make bench`: run every benchmark module (hack/bench/bench_*.py) and print what each measured.

Each module exposes ``run() -> list[str]``: lines that state what was measured in this run, with
ratios against a baseline measured in the same run (never a number from elsewhere).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    from orchardist import log

    log.configure("WARNING", "console")  # the numbers, not the set-up's progress lines
    wanted = set(argv)
    here = Path(__file__).parent
    failed = 0
    for info in sorted(pkgutil.iter_modules([str(here)]), key=lambda m: m.name):
        if not info.name.startswith("bench_"):
            continue
        short = info.name.removeprefix("bench_")
        if wanted and short not in wanted:
            continue
        print(f"== {short}", flush=True)
        t0 = time.perf_counter()
        try:
            lines = importlib.import_module(f"hack.bench.{info.name}").run()
        except Exception as exc:  # a failed benchmark is reported, the others still run
            print(f"   FAILED: {type(exc).__name__}: {exc}", flush=True)
            failed += 1
            continue
        for line in lines:
            print(f"   {line}", flush=True)
        print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
