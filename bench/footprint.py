"""Footprint of the control plane itself (not its backends): RSS and CPU while idle with a model loaded, and
under load (small requests at concurrency 32), for hal0, llama.cpp's router mode and the LiteLLM proxy.
Run on demand: `python -m bench.footprint`.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    Bare,
    Hal0,
    LiteLLM,
    Router,
    children,
    cmdline,
    cpu_s,
    make_models,
    med,
    rss_mb,
    rss_parts_mb,
    save,
    session,
    timed_small,
    wait_http,
)

#: Issue 18's target for the API's idle RSS.
RSS_TARGET_MB = 45.0


def plane_pids(pid: int) -> list[int]:
    """The control plane's own processes: `pid` and its descendants that are not llama-server backends."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if "llama-server" in (cmdline(p) or [""])[0] and p != pid:
            continue
        out.append(p)
        todo += children(p)
    return out


def sample(pid: int) -> tuple[float, float]:
    """(CPU seconds, RSS MB) of the control plane's own processes."""
    pids = plane_pids(pid)
    return sum(cpu_s(p) for p in pids), sum(rss_mb(p)[0] for p in pids)


async def under_load(url: str, model: str, pid: int, seconds: float, concurrency: int) -> dict[str, float]:
    cpu0, _ = sample(pid)
    started = time.perf_counter()
    count = 0
    peak = 0.0
    async with session(concurrency) as http:
        async def worker() -> None:
            nonlocal count
            while time.perf_counter() - started < seconds:
                await timed_small(http, url, model)
                count += 1

        async def watch() -> None:
            nonlocal peak
            while time.perf_counter() - started < seconds:
                peak = max(peak, sample(pid)[1])
                await asyncio.sleep(0.2)

        await asyncio.gather(watch(), *(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    cpu1, rss = sample(pid)
    return {"cpu_pct": (cpu1 - cpu0) / wall * 100, "cpu_ms_per_request": (cpu1 - cpu0) / count * 1000,
            "requests_per_s": count / wall, "rss_mb": max(peak, rss)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hal0-bench-") as tmp:
        root = Path(tmp)
        models = make_models(root / "models")
        hal0 = await Hal0(root / "hal0", {"tiny": models["tiny-a"]}, {"primary": "tiny"}).start()
        router = await Router(root, {"tiny": models["tiny-a"]}).start()
        bare = Bare(root, models["tiny-a"], "tiny")
        litellm: LiteLLM | None = None
        try:
            # First as a client-only deployment uses it: the slot loaded by a cold /v1 request, nothing asked
            # of /api (the management app is imported by the first request for it).
            async with session(1) as http:
                await timed_small(http, hal0.url, "primary")
                await timed_small(http, hal0.url, "primary")
            await asyncio.sleep(min(args.idle_s, 3.0))
            v1_only, parts = sample(hal0.pid)[1], rss_parts_mb(hal0.pid)
            print(f"{'hal0':<8} idle, used only through /v1: RSS {v1_only:6.1f} MB ({_parts(parts)})")
            results["hal0_v1_only"] = {"rss_mb": v1_only, "rss_parts_mb": parts}
            await hal0.load("primary")
            await router.load("tiny")
            planes: dict[str, tuple[str, str, int]] = {"hal0": (hal0.url, "primary", hal0.pid),
                                                       "router": (router.url, "tiny", router.pid)}
            if LiteLLM.available():
                bare.spawn()
                assert bare.proc is not None
                await wait_http(f"{bare.url}/health", bare.proc, 30, bare.log)
                litellm = await LiteLLM(root, {"tiny": bare.url}).start()
                planes["litellm"] = (litellm.url, "tiny", litellm.pid)
            for url, model, _ in planes.values():  # one request each, so every path is warm
                async with session(1) as http:
                    await timed_small(http, url, model)
            # Idle: all at once, in the same window (nothing else is sent to any of them).
            before = {name: sample(pid)[0] for name, (_, _, pid) in planes.items()}
            await asyncio.sleep(args.idle_s)
            idle = {name: {"cpu_pct": (sample(pid)[0] - before[name]) / args.idle_s * 100, "rss_mb": sample(pid)[1],
                           "rss_parts_mb": rss_parts_mb(pid)}
                    for name, (_, _, pid) in planes.items()}
            loads: dict[str, list[dict[str, float]]] = {name: [] for name in planes}
            names = list(planes)
            for i in range(args.rounds):
                for name in names[i % len(names):] + names[:i % len(names)]:
                    url, model, pid = planes[name]
                    loads[name].append(await under_load(url, model, pid, args.load_s, args.concurrency))
            for name in planes:
                rows = loads[name]
                load = {k: med([r[k] for r in rows]) for k in rows[0]}
                results[name] = {"idle": idle[name], "load": load, "rounds": rows}
                print(f"{name:<8} idle: RSS {idle[name]['rss_mb']:6.1f} MB ({_parts(idle[name]['rss_parts_mb'])}), "
                      f"CPU {idle[name]['cpu_pct']:5.2f} % | "
                      f"c={args.concurrency}: RSS {load['rss_mb']:6.1f} MB, CPU {load['cpu_pct']:5.1f} %, "
                      f"{load['cpu_ms_per_request']:.2f} CPU ms/request, {load['requests_per_s']:.0f} requests/s")
        finally:
            if litellm is not None:
                litellm.stop()
            bare.stop()
            router.stop()
            hal0.stop()
    verdicts = {f"API RSS idle, used only through /v1 <= {RSS_TARGET_MB:g} MB":
                results["hal0_v1_only"]["rss_mb"] <= RSS_TARGET_MB,
                f"API RSS idle, management API used too <= {RSS_TARGET_MB:g} MB":
                results["hal0"]["idle"]["rss_mb"] <= RSS_TARGET_MB}
    for what, met in verdicts.items():
        print(f"  {'met ' if met else 'MISS'}  {what}")
    results["verdicts"] = verdicts
    return results


def _parts(parts: dict[str, float]) -> str:
    return ", ".join(f"{name} {mb:.1f}" for name, mb in parts.items())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.footprint", description=__doc__)
    p.add_argument("--idle-s", type=float, default=10.0)
    p.add_argument("--load-s", type=float, default=5.0, help="seconds of load per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=32)
    return p


def main(argv: list[str] | None = None) -> int:
    save("footprint", asyncio.run(run(parser().parse_args(argv))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
