"""Benchmark: ``spine-node demo`` twice in one folder, as a newcomer runs ``make demo`` (issue 8,
acceptance 2: each run under 5 minutes on the 2-core machine, environment creation excluded).

The demo's behaviour (the printed summary against the phantom's ground truth, every result at the
receiver, the emptying of a finished run's folder that a second run starts with) is tested in
``tests/e2e/test_demo.py`` with one run; the second full run into the same folder, and the duration
of both, are checked here, on a machine that runs nothing else (the suite runs two workers).

Run: ``.venv/bin/python -m tests.bench.bench_demo [--out DIR]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: acceptance 2 of issue 8: under 5 minutes per run
DEMO_LIMIT_S = 300.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="demo folder (default: temporary)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="spine-bench-demo-")) / "demo-output"
    failed = False
    for n in (1, 2):
        start = time.perf_counter()
        run = subprocess.run(
            [sys.executable, "-m", "node.cli", "demo", "--out", str(out)],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        seconds = time.perf_counter() - start
        ok = run.returncode == 0 and seconds < DEMO_LIMIT_S
        print(
            f"demo run {n}: {seconds:.0f} s (limit {DEMO_LIMIT_S:.0f} s, "
            f"{seconds / DEMO_LIMIT_S:.2f}x), exit {run.returncode}: {'ok' if ok else 'FAILED'}"
        )
        if run.returncode != 0:
            print(run.stderr[-3000:])
        failed = failed or not ok
    print(f"demo folder: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
