"""``make bench``: run the ``main()`` of every ``tests/bench/bench_*.py``, one after another.

Usage: ``python -m tests.bench [NAME ...]`` (names without ``bench_``; default: all).
Exit status is non-zero when a benchmark raised or returned non-zero.
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    folder = Path(__file__).resolve().parent
    names = sorted(p.stem for p in folder.glob("bench_*.py"))
    if argv:
        wanted = {a.removeprefix("bench_") for a in argv}
        names = [n for n in names if n.removeprefix("bench_") in wanted]
    failures = []
    for name in names:
        print(f"=== {name} ===", flush=True)
        start = time.perf_counter()
        try:
            module = importlib.import_module(f"tests.bench.{name}")
            code = int(module.main([]) or 0)
        except Exception:  # report and go on with the other benchmarks
            traceback.print_exc()
            code = 1
        print(
            f"=== {name}: {'ok' if code == 0 else 'FAILED'} "
            f"({time.perf_counter() - start:.0f} s) ===\n",
            flush=True,
        )
        if code:
            failures.append(name)
    if failures:
        print(f"failed: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
