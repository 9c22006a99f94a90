"""Thundering herd: 64 concurrent requests at one cold model. Backend starts (must be 1), errors (must be 0)
and the time until every request is answered, for hal0 and llama.cpp's router mode, interleaved.

Backend starts are counted independently: every new llama-server child of the control plane.
Run on demand: `python -m bench.herd`.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Hal0, Router, Watcher, make_models, med, save, session, small_status, spread


async def herd(plane: Hal0 | Router, model: str, n: int) -> dict[str, float]:
    await plane.unload(model)
    async with Watcher(parent=plane.pid) as watch, session(n) as http:
        sent = time.perf_counter()
        answers = await asyncio.gather(*(small_status(http, plane.url, model) for _ in range(n)))
        done = max(t for _, t in answers)
        starts = len(watch.started())
    errors = sum(1 for status, _ in answers if status != 200)
    return {"starts": starts, "errors": errors, "all_answered_ms": (done - sent) * 1000,
            "first_answered_ms": (min(t for _, t in answers) - sent) * 1000}


def after_first(rows: list[dict[str, float]]) -> list[float]:
    """Each herd's last answer after its first, ms."""
    return [r["all_answered_ms"] - r["first_answered_ms"] for r in rows]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hal0-bench-") as tmp:
        root = Path(tmp)
        models = make_models(root / "models", large=not args.tiny_only)
        sizes = {"tiny": models["tiny-a"]} | ({} if args.tiny_only else {"large": models["large"]})
        hal0 = await Hal0(root / "hal0", sizes, {name: name for name in sizes}).start()
        router = await Router(root, sizes).start()
        try:
            for size in sizes:
                rounds = args.rounds if size == "tiny" else args.large_rounds
                runs: dict[str, list[dict[str, float]]] = {"hal0": [], "router": []}
                await hal0.load(size)
                await router.load(size)
                for i in range(rounds):
                    for name in (("hal0", "router") if i % 2 == 0 else ("router", "hal0")):
                        plane: Hal0 | Router = hal0 if name == "hal0" else router
                        runs[name].append(await herd(plane, size, args.concurrency))
                out: dict[str, Any] = {}
                for name, rows in runs.items():
                    rest = after_first(rows)
                    out[name] = {"starts_max": max(r["starts"] for r in rows),
                                 "errors_total": sum(r["errors"] for r in rows),
                                 "all_answered_ms": med([r["all_answered_ms"] for r in rows]),
                                 "first_answered_ms": med([r["first_answered_ms"] for r in rows]),
                                 "rest_after_first_ms": med(rest),
                                 "rounds": rows}
                    # The first answer carries the load; what follows it is the control plane handing the rest
                    # to a ready backend. Apart, a slow load (noise at a few rounds) is not read as a slow hand-off.
                    print(f"{size:<5} {name:<6} {args.concurrency} cold requests: backend starts "
                          f"{[int(r['starts']) for r in rows]}, errors {[int(r['errors']) for r in rows]}, "
                          f"all answered after {spread([r['all_answered_ms'] for r in rows])} ms "
                          f"(first {spread([r['first_answered_ms'] for r in rows])}, the rest "
                          f"{spread(rest)} after it)")
                results[size] = out
        finally:
            router.stop()
            hal0.stop()
    ok = all(results[s]["hal0"]["starts_max"] == 1 and results[s]["hal0"]["errors_total"] == 0 for s in results)
    verdicts = {"herd: 1 backend start and 0 errors in every round": ok}
    if "large" in results:
        large = results["large"]
        verdicts["large herd: all answered no later than router mode"] = (
            large["hal0"]["all_answered_ms"] <= large["router"]["all_answered_ms"])
    for what, met in verdicts.items():
        print(f"  {'met ' if met else 'MISS'}  {what}")
    results["verdicts"] = verdicts
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.herd", description=__doc__)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="herds per control plane with the tiny model")
    p.add_argument("--large-rounds", type=int, default=2, help="herds per control plane with the large model")
    p.add_argument("--tiny-only", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    save("herd", asyncio.run(run(parser().parse_args(argv))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
