"""Swaps: requests alternating between two models that cannot both stay loaded (hal0 with
`max_loaded_slots = 1`, llama.cpp's router with `--models-max 1`); the time per swap, i.e. per request that has to
unload one model and load the other, beside a bare floor (kill one llama-server, start the other, first request).
Interleaved rounds. Run on demand: `python -m bench.swaps`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    Bare,
    Hal0,
    Router,
    Watcher,
    alive,
    children,
    make_models,
    med,
    pct,
    save,
    session,
    spread,
    timed_small,
    zombie,
)

ROOT = Path(__file__).resolve().parent.parent


def hal0_supports_max_loaded() -> bool:
    return "max_loaded_slots" in (ROOT / "src" / "hal0" / "settings.py").read_text()


async def alternate(plane: Hal0 | Router, models: tuple[str, str], swaps: int) -> dict[str, Any]:
    times: list[float] = []
    most_alive = 0
    async with Watcher(parent=plane.pid) as watch, session(1) as http:
        for i in range(swaps):
            times.append(await timed_small(http, plane.url, models[(i + 1) % 2]))
            most_alive = max(most_alive, len([p for p in children(plane.pid) if alive(p) and not zombie(p)]))
        starts = len(watch.started())
    return {"swap_ms": times, "starts": starts, "most_alive_seen": most_alive}


async def bare_swaps(root: Path, paths: tuple[Path, Path], swaps: int) -> dict[str, Any]:
    """The floor: stop one bare llama-server, start the other, send the request the moment /health is 200."""
    times: list[float] = []
    current: Bare | None = None
    try:
        for i in range(swaps):
            async with Watcher(parent=os.getpid()) as watch, session(1) as http:
                started = time.perf_counter()
                if current is not None:
                    current.stop()
                current = Bare(root, paths[(i + 1) % 2], "m")
                current.spawn()
                await watch.first_ready()
                await timed_small(http, current.url, "m")
                times.append((time.perf_counter() - started) * 1000)
    finally:
        if current is not None:
            current.stop()
    return {"swap_ms": times, "starts": swaps, "most_alive_seen": 1}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if not hal0_supports_max_loaded():
        raise SystemExit("hal0 has no max_loaded_slots setting yet (src/hal0/settings.py): swaps not measured")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hal0-bench-") as tmp:
        root = Path(tmp)
        models = make_models(root / "models")
        pair = {"a": models["tiny-a"], "b": models["tiny-b"]}
        hal0 = await Hal0(root / "hal0", pair, {"a": "a", "b": "b"}, HAL0_MAX_LOADED_SLOTS="1").start()
        router = await Router(root, pair, models_max=1).start()
        try:
            await hal0.load("a")
            await router.load("a")
            runs: dict[str, list[dict[str, Any]]] = {"direct": [], "hal0": [], "router": []}
            names = list(runs)
            for i in range(args.rounds):
                for name in names[i % 3:] + names[:i % 3]:
                    if name == "direct":
                        runs[name].append(await bare_swaps(root, (pair["a"], pair["b"]), args.swaps))
                    else:
                        plane: Hal0 | Router = hal0 if name == "hal0" else router
                        runs[name].append(await alternate(plane, ("a", "b"), args.swaps))
            floor = med([t for r in runs["direct"] for t in r["swap_ms"]])
            for name, rows in runs.items():
                times = [t for r in rows for t in r["swap_ms"]]
                results[name] = {"swap_ms_p50": med(times), "swap_ms_p90": pct(times, 90),
                                 "ratio_to_bare": med(times) / floor, "starts": [r["starts"] for r in rows],
                                 "most_alive_seen": max(r["most_alive_seen"] for r in rows),
                                 "round_p50s": [med(r["swap_ms"]) for r in rows]}
                print(f"{name:<7} per swap p50 {med(times):7.1f} ms  p90 {pct(times, 90):7.1f} ms "
                      f"(x{med(times) / floor:.2f} bare; round medians {spread(results[name]['round_p50s'])}) | "
                      f"backend starts per round {results[name]['starts']}")
        finally:
            router.stop()
            hal0.stop()
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.swaps", description=__doc__)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--swaps", type=int, default=6, help="alternating requests per round")
    return p


def main(argv: list[str] | None = None) -> int:
    save("swaps", asyncio.run(run(parser().parse_args(argv))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
