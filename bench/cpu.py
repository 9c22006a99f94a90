"""What one small request costs the API: CPU per request at c=1 (utime + stime of the API process from /proc) and
the added p50, in blocks alternating with direct requests to the same backend; with `--before SRC`, a second API
run from another tree's `src` (`git worktree add`), each with its own llama-server, the blocks interleaved A B B A
so that a noisy machine slows both alike: a paired comparison of two trees. Then, in a separate pass (its profile
function slows the API), the Python function calls per request, counted by `bench/calls/sitecustomize.py`.

Run on demand: `python -m bench.cpu [--before SRC] [--blocks 24] [--per-block 200]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

from bench.common import Hal0, make_models, med, save, session, timed_small

CALLS = Path(__file__).with_name("calls")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_env(src: str | None, **extra: str) -> dict[str, str]:
    path = [p for p in (str(CALLS) if extra else None, src, os.environ.get("PYTHONPATH")) if p]
    return {"PYTHONPATH": os.pathsep.join(path), **extra} if path else dict(extra)


async def started(home: Path, model: Path, env: dict[str, str]) -> tuple[Hal0, str]:
    hal0 = Hal0(home, {"tiny": model}, {"primary": "tiny"}, **env)
    await hal0.start()
    return hal0, f"http://127.0.0.1:{await hal0.load('primary')}"


async def paired(trees: dict[str, str | None], root: Path, model: Path, blocks: int, per: int) -> dict[str, Any]:
    apis: dict[str, tuple[Hal0, str]] = {}
    sessions = {}
    try:
        for name, src in trees.items():
            apis[name] = await started(root / name, model, tree_env(src))
            sessions[name] = session(1)
            for _ in range(100):
                await timed_small(sessions[name], apis[name][0].url, "primary")
        added: dict[str, list[float]] = {name: [] for name in trees}
        cpu = dict.fromkeys(trees, 0.0)
        for block in range(blocks):
            for name in (list(trees) if block % 2 == 0 else list(trees)[::-1]):
                hal0, direct = apis[name]
                http = sessions[name]
                alone = [await timed_small(http, direct, "primary") for _ in range(per // 4)]
                before = cpu_s(hal0.pid)
                through = [await timed_small(http, hal0.url, "primary") for _ in range(per)]
                cpu[name] += cpu_s(hal0.pid) - before
                added[name].append(med(through) - med(alone))
        out: dict[str, Any] = {name: {"added_p50_ms": med(added[name]), "blocks_added_p50_ms": added[name],
                                      "cpu_ms_per_request": cpu[name] * 1000 / (blocks * per)} for name in trees}
        if len(trees) == 2:
            a, b = list(trees)
            out["paired_added_p50_ms"] = med([x - y for x, y in zip(added[a], added[b], strict=True)])  # this − before
        return out
    finally:
        for http in sessions.values():
            await http.close()
        for hal0, _ in apis.values():
            hal0.stop()


async def calls(src: str | None, root: Path, model: Path, requests: int) -> dict[str, Any]:
    out = root / "calls.json"
    hal0, _ = await started(root, model, tree_env(src, HAL0_BENCH_CALLS=str(out)))
    http = session(1)
    try:
        for _ in range(100):
            await timed_small(http, hal0.url, "primary")
        os.kill(hal0.pid, signal.SIGUSR1)
        await asyncio.sleep(0.3)
        for _ in range(requests):
            await timed_small(http, hal0.url, "primary")
        os.kill(hal0.pid, signal.SIGUSR2)
        for _ in range(100):
            if out.exists():
                break
            await asyncio.sleep(0.05)
        counts = dict(json.loads(out.read_text()))
    finally:
        await http.close()
        hal0.stop()
    return {"python_calls_per_request": counts.pop("python", 0) / requests,
            "c_calls_per_request": counts.pop("c", 0) / requests,
            "top": {k: round(v / requests, 1) for k, v in list(counts.items())[:30]}}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    trees: dict[str, str | None] = {"hal0": None}
    if args.before:
        trees["before"] = args.before
    with tempfile.TemporaryDirectory() as tmp:
        model = make_models(Path(tmp) / "models")["tiny-a"]
        print(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; {args.blocks} blocks of {args.per_block}")
        results = await paired(trees, Path(tmp) / "paired", model, args.blocks, args.per_block)
        for name in trees:
            r = results[name]
            print(f"{name:<7} c=1 added p50 {r['added_p50_ms']:+.3f} ms (blocks {min(r['blocks_added_p50_ms']):+.3f}"
                  f"…{max(r['blocks_added_p50_ms']):+.3f}), API CPU {r['cpu_ms_per_request']:.3f} ms/request")
        if "paired_added_p50_ms" in results:
            print(f"this tree − before, paired by block: added p50 {results['paired_added_p50_ms']:+.3f} ms")
        for name, src in trees.items():
            counted = await calls(src, Path(tmp) / f"calls-{name}", model, args.call_requests)
            results[name]["calls"] = counted
            print(f"{name:<7} Python calls/request {counted['python_calls_per_request']:.0f}, "
                  f"C calls/request {counted['c_calls_per_request']:.0f}")
    save("cpu", results)
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--before", metavar="SRC", help="another tree's src, measured paired with this one")
    p.add_argument("--blocks", type=int, default=24, help="blocks per API, interleaved")
    p.add_argument("--per-block", type=int, default=200, help="requests through the API per block")
    p.add_argument("--call-requests", type=int, default=500, help="requests counted for the calls per request")
    return p


def main(argv: list[str] | None = None) -> int:
    asyncio.run(run(parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
