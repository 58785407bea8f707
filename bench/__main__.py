"""Every benchmark, then the table and the plots: `python -m bench` (what `make bench` runs).

    python -m bench                         # all: rollout, weight_sync, step, learning, e2e, evaluate (e2e runs
                                            # TRL too: `make bench-setup`; about 2 h on 2 cores, plus evaluate)
    python -m bench --only step learning    # some of them
    python -m bench --report-only           # re-render bench/results/summary.md, the PNGs and BENCHMARKS.md

Each benchmark runs in its own process (`python -m bench.NAME`), one after the other, so none measures
while another runs; each writes bench/results/NAME.json. Then `bench.report` renders the markdown table
(bench/results/summary.md and the generated block of BENCHMARKS.md) and the PNG plots.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ("rollout", "weight_sync", "step", "learning", "e2e", "evaluate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    failed = []
    for name in [] if args.report_only else args.only:
        print(f"== bench.{name}", flush=True)
        if subprocess.run([sys.executable, "-m", f"bench.{name}"], cwd=ROOT).returncode != 0:
            failed.append(name)
    from bench.report import main as report

    report()
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
