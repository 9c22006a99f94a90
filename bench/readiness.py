"""Readiness lag and cold time-to-first-token: hal0 vs a bare llama-server vs llama.cpp's router mode.

Every round, in a rotating order: a streamed request to hal0's cold slot, the same to the router with its model
unloaded, a bare llama-server started by hand, and llama-server started by hand with the very command line and
environment hal0 gives it (`hal0-cmd`): hal0's figure less that one is what hal0's own path costs, and that one
less the bare start what the backend's arguments cost. An independent watcher polls each new backend's /health
every millisecond, so "really ready" is the first 200, not what the control plane believes.
Run on demand: `python -m bench.readiness`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Bare, Hal0, Router, Watcher, first_token, make_models, med, save, session, spread

#: Issue 18's target: hal0's cold first token of the tiny model at most this much after a bare start.
TARGETS = {"tiny_over_bare_ms": 1.0}


async def hal0_cold(hal0: Hal0, slot: str) -> dict[str, float]:
    await hal0.unload(slot)
    async with Watcher(parent=hal0.pid) as watch, session(1) as http:
        sent = time.perf_counter()
        tok = await first_token(http, hal0.url, slot)
        backend = await watch.first_ready()
    assert backend.ready is not None
    return {"ttft_ms": (tok - sent) * 1000, "lag_ms": (tok - backend.ready) * 1000,
            "load_ms": (backend.ready - sent) * 1000}


async def router_cold(router: Router, model: str) -> dict[str, float]:
    await router.unload(model)
    async with Watcher(parent=router.pid) as watch, session(1) as http:
        sent = time.perf_counter()
        tok = await first_token(http, router.url, model)
        backend = await watch.first_ready()
    assert backend.ready is not None
    return {"ttft_ms": (tok - sent) * 1000, "lag_ms": (tok - backend.ready) * 1000,
            "load_ms": (backend.ready - sent) * 1000}


async def bare_cold(root: Path, model: Path, alias: str,
                    command: tuple[list[str], dict[str, str]] | None = None) -> dict[str, float]:
    """The floor: spawn llama-server (with `command`, another control plane's command line and environment), and
    send the request the moment the watcher sees /health 200."""
    bare = Bare(root, model, alias, command)
    try:
        async with Watcher(parent=os.getpid()) as watch, session(1) as http:
            sent = bare.spawn()
            backend = await watch.first_ready()
            assert backend.ready is not None
            tok = await first_token(http, bare.url, alias)
    finally:
        bare.stop()
    return {"ttft_ms": (tok - sent) * 1000, "lag_ms": (tok - backend.ready) * 1000,
            "load_ms": (backend.ready - sent) * 1000}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hal0-bench-") as tmp:
        root = Path(tmp)
        models = make_models(root / "models", large=not args.tiny_only)
        sizes = {"tiny": models["tiny-a"]}
        if not args.tiny_only:
            sizes["large"] = models["large"]
        hal0 = await Hal0(root / "hal0", sizes, {name: name for name in sizes}).start()
        router = await Router(root, sizes).start()
        try:
            for size, path in sizes.items():
                rounds = args.rounds if size == "tiny" else args.large_rounds
                runs: dict[str, list[dict[str, float]]] = {"direct": [], "hal0": [], "hal0-cmd": [], "router": []}
                await hal0.load(size)  # warm the page cache and both paths once
                command = hal0.backend_command(size)
                await router.load(size)
                for i in range(rounds):
                    order = list(runs)
                    order = order[i % len(order):] + order[:i % len(order)]
                    for name in order:
                        if name == "direct":
                            runs[name].append(await bare_cold(root, path, size))
                        elif name == "hal0-cmd":
                            runs[name].append(await bare_cold(root, path, size, command))
                        elif name == "hal0":
                            runs[name].append(await hal0_cold(hal0, size))
                        else:
                            runs[name].append(await router_cold(router, size))
                out: dict[str, Any] = {}
                bare_load = med([r["load_ms"] for r in runs["direct"]])
                for name, rows in runs.items():
                    figures = {k: [r[k] for r in rows] for k in ("ttft_ms", "lag_ms", "load_ms")}
                    out[name] = {k: med(v) for k, v in figures.items()} | {"rounds": figures}
                    out[name]["ttft_over_bare_load"] = out[name]["ttft_ms"] / bare_load
                    # Paired with the bare start of the same round: steadier than a difference of medians when
                    # the machine's speed drifts during the run.
                    paired = [r["ttft_ms"] - d["ttft_ms"] for r, d in zip(rows, runs["direct"], strict=True)]
                    out[name]["ttft_over_direct_ms"] = med(paired)
                    print(f"{size:<5} {name:<8} cold TTFT {spread(figures['ttft_ms']):<28} ms | ready->first token "
                          f"{spread(figures['lag_ms']):<26} ms | spawn->/health 200 {spread(figures['load_ms'])} ms"
                          + (f" | TTFT over direct, paired by round {med(paired):+.1f} ms" if name != "direct"
                             else ""))
                # hal0's figure split: its own path (the request, admission, spawn, probes) and its backend's command.
                out["hal0_own_path_ms"] = med([h["ttft_ms"] - c["ttft_ms"]
                                               for h, c in zip(runs["hal0"], runs["hal0-cmd"], strict=True)])
                print(f"{size:<5} of hal0's {out['hal0']['ttft_over_direct_ms']:+.1f} ms over direct: its backend's "
                      f"command {out['hal0-cmd']['ttft_over_direct_ms']:+.1f} ms, its own path "
                      f"{out['hal0_own_path_ms']:+.1f} ms (each paired by round)")
                results[size] = out
        finally:
            router.stop()
            hal0.stop()
    tiny = results["tiny"]
    verdicts = {
        "tiny: cold first token <= bare + 1 ms": tiny["hal0"]["ttft_over_direct_ms"] <= TARGETS["tiny_over_bare_ms"],
        "tiny: cold first token no later than router mode's": tiny["hal0"]["ttft_ms"] <= tiny["router"]["ttft_ms"],
    }
    if "large" in results:
        large = results["large"]
        verdicts["large: readiness lag <= router mode's"] = large["hal0"]["lag_ms"] <= large["router"]["lag_ms"]
    for what, ok in verdicts.items():
        print(f"  {'met ' if ok else 'MISS'}  {what}")
    results["verdicts"] = verdicts
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.readiness", description=__doc__)
    p.add_argument("--rounds", type=int, default=30, help="cold starts per path with the tiny model")
    p.add_argument("--large-rounds", type=int, default=3, help="cold starts per path with the large model")
    p.add_argument("--tiny-only", action="store_true", help="skip the large (about 2 s to load) model")
    return p


def main(argv: list[str] | None = None) -> int:
    save("readiness", asyncio.run(run(parser().parse_args(argv))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
