"""Run the whole performance suite, part after part, then write the table and docs/perf.png.

`python -m bench` (everything), `python -m bench --only herd swaps`, `python -m bench.report` (redraw only).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback

PARTS = ("proxy", "readiness", "herd", "swaps", "restart", "footprint")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    args = parser.parse_args(argv)
    failed = []
    for part in args.only:
        print(f"\n=== bench.{part} ===", flush=True)
        started = time.monotonic()
        module = importlib.import_module(f"bench.{part}")
        try:
            module.main([])
        except SystemExit as exc:  # one part failing (or not applicable) does not stop the others
            if exc.code not in (0, None):
                print(f"bench.{part}: {exc.code}", file=sys.stderr)
                failed.append(part)
        except Exception:
            traceback.print_exc()
            failed.append(part)
        print(f"=== bench.{part}: {time.monotonic() - started:.0f} s ===", flush=True)
    from bench import report

    report.main([])
    if failed:
        print(f"failed: {' '.join(failed)} (their previous results, if any, are in the report)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
