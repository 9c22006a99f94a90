"""What the /v1 proxy costs: one llama-server hit directly and through hal0 in the same run, interleaved, beside
the peers (llama.cpp's router mode, the LiteLLM proxy) on identical backends.

Run on demand: `python -m bench.proxy` (see bench/README.md). Prints added latency (p50/p99) for a small request
at concurrency 1 and 32, streamed tokens/s at concurrency 4 and 32 as a ratio to direct, and the API's RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import (
    RESENT,
    Hal0,
    LiteLLM,
    Router,
    concurrently,
    free_port,
    make_models,
    med,
    pct,
    post,
    rss_mb,
    save,
    session,
    timed_small,
    wait_http,
)

SLOT = "primary"
#: Issue 18's targets: each against direct and router mode in the same run.
TARGETS = {"p50_added_ms_c1": 0.5, "stream_ratio": 0.97}


class Relay:
    """`bench/relay.py` in front of the backend: bytes relayed on uvloop, no HTTP. The floor of what a Python
    proxy adds, measured beside hal0."""

    FILE = Path(__file__).with_name("relay.py")

    def __init__(self, backend: str) -> None:
        self.port = free_port()
        self.argv = [sys.executable, str(self.FILE), str(self.port), backend.rsplit(":", 1)[1]]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> subprocess.Popen[bytes]:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self.proc

    async def start(self) -> Relay:
        await wait_http(f"{self.url}/health", self.spawn(), timeout=30)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@dataclass
class Rig:
    """hal0 serving one tiny-model chat slot, that slot's backend URL, and the peers in front of the same
    model: `paths` maps a name to (base URL, model name to send).
    """

    hal0: Hal0
    paths: dict[str, tuple[str, str]]
    peers: list[Relay | Router | LiteLLM] = field(default_factory=list)


async def start_rig(home: Path, peers: bool = True) -> Rig:
    models = make_models(home / "models")
    hal0 = await Hal0(home / "hal0", {"tiny": models["tiny-a"]}, {SLOT: "tiny"}).start()
    backend = await hal0.load(SLOT)
    rig = Rig(hal0, {"direct": (f"http://127.0.0.1:{backend}", SLOT), "hal0": (hal0.url, SLOT)})
    relay = await Relay(rig.paths["direct"][0]).start()
    rig.peers.append(relay)
    rig.paths["relay"] = (relay.url, SLOT)
    if peers:
        # The router loads its own child llama-server with the same binary and the same model file.
        router = await Router(home, {"tiny": models["tiny-a"]}).start()
        rig.peers.append(router)
        await router.load("tiny")
        rig.paths["router"] = (router.url, "tiny")
        if LiteLLM.available():
            # LiteLLM does not start backends: it proxies to the very llama-server hal0 started.
            litellm = await LiteLLM(home, {"tiny": rig.paths["direct"][0]}).start()
            rig.peers.append(litellm)
            rig.paths["litellm"] = (litellm.url, "tiny")
        else:
            print("LiteLLM not installed (pip install 'litellm[proxy]' into /tmp/litellm-venv): skipped")
    return rig


def stop_rig(rig: Rig) -> None:
    for peer in rig.peers:
        peer.stop()
    rig.hal0.stop()


# -- measurements -------------------------------------------------------------------------------------------
async def streamed_tokens(http: aiohttp.ClientSession, base: str, model: str, max_tokens: int) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True}
    tokens = 0
    async with await post(http, f"{base}/v1/chat/completions", body) as resp:
        if resp.status != 200:
            raise SystemExit(f"{base}: {resp.status} {await resp.text()}")
        async for line in resp.content:
            if line.startswith(b"data: {") and b'"content":"' in line:
                tokens += 1
        resp.close()  # llama-server drops the connection after a stream; do the same on every path
    return tokens


def orders(names: list[str], i: int) -> list[str]:
    """Round `i`'s order: rotated every round so no path always goes first (or right after another)."""
    k = i % len(names)
    rotated = names[k:] + names[:k]
    return rotated if i % 2 == 0 else rotated[::-1]


async def latency(rig: Rig, concurrency: int, rounds: int, per_worker: int,
                  per_round: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Small requests, every path once per round, in an order that changes every round."""
    names = list(rig.paths)
    out: dict[str, list[float]] = {name: [] for name in names}
    # The same client on every path: one connection per concurrent request.
    sessions = {name: session(concurrency) for name in names}
    try:
        async def worker(name: str) -> list[float]:
            base, model = rig.paths[name]
            return [await timed_small(sessions[name], base, model) for _ in range(per_worker)]

        for name in names:  # warm every pool
            await concurrently(concurrency, lambda name=name: worker(name))  # type: ignore[misc]
        for i in range(rounds):
            for name in orders(names, i):
                chunk: list[float] = []
                for part in await concurrently(concurrency, lambda name=name: worker(name)):  # type: ignore[misc]
                    chunk.extend(part)
                out[name].extend(chunk)
                if per_round is not None:
                    per_round.setdefault(name, []).append(med(chunk))
    finally:
        for http in sessions.values():
            await http.close()
    return out


async def throughput(rig: Rig, concurrency: int, rounds: int, max_tokens: int) -> dict[str, float]:
    names = list(rig.paths)
    totals = dict.fromkeys(names, 0.0)
    tokens = dict.fromkeys(names, 0)
    sessions = {name: session(concurrency) for name in names}
    try:
        for i in range(rounds):
            for name in orders(names, i):
                base, model = rig.paths[name]
                http = sessions[name]
                started = time.perf_counter()
                counts = await concurrently(concurrency, lambda http=http, base=base, model=model: streamed_tokens(  # type: ignore[misc]
                    http, base, model, max_tokens))
                totals[name] += time.perf_counter() - started
                tokens[name] += sum(counts)
    finally:
        for http in sessions.values():
            await http.close()
    return {name: tokens[name] / totals[name] for name in totals}


def report_latency(label: str, data: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    d50, d99 = med(data["direct"]), pct(data["direct"], 99)
    print(f"{label:<22} direct      p50 {d50:7.2f} ms  p99 {d99:7.2f} ms  (n={len(data['direct'])})")
    out: dict[str, dict[str, float]] = {"direct": {"p50_ms": d50, "p99_ms": d99}}
    for name, values in data.items():
        if name == "direct":
            continue
        h50, h99 = med(values), pct(values, 99)
        print(f"{'':<22} {name:<11} p50 {h50:7.2f} ms  p99 {h99:7.2f} ms | added p50 {h50 - d50:+7.2f} ms"
              f"  p99 {h99 - d99:+7.2f} ms | ratio p50 {h50 / d50:6.3f}  p99 {h99 / d99:6.3f}")
        out[name] = {"p50_ms": h50, "p99_ms": h99, "p50_added_ms": h50 - d50, "p99_added_ms": h99 - d99,
                     "p50_ratio": h50 / d50, "p99_ratio": h99 / d99}
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hal0-bench-") as tmp:
        rig = await start_rig(Path(tmp), peers=not args.no_peers)
        try:
            peers = [f"{n} {url}" for n, (url, _) in rig.paths.items() if n not in ("direct", "hal0", "relay")]
            print(f"hal0 {rig.hal0.url} -> llama-server {rig.paths['direct'][0]}; peers: "
                  f"{', '.join(peers) or 'none'}; {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
            results: dict[str, Any] = {}
            per_round: dict[str, list[float]] = {}
            results["c1"] = report_latency("small request, c=1",
                                           await latency(rig, 1, args.rounds, args.requests, per_round))
            results["c1_round_p50s"] = per_round
            over = results["c1"]["hal0"]["p50_ms"] - results["c1"]["relay"]["p50_ms"]
            print(f"{'':<22} hal0 over the relay (hal0's own work): p50 {over:+.2f} ms")
            results["c1"]["hal0"]["p50_over_relay_ms"] = over
            results["c32"] = report_latency("small request, c=32",
                                            await latency(rig, 32, args.rounds, max(1, args.requests // 16)))
            # c=4 is llama-server's default --parallel: every stream decodes at once on every path, so this one
            # shows the proxy's own cost; at c=32 requests queue, and how a path queues them matters too.
            for concurrency in (4, 32):
                tps = await throughput(rig, concurrency, args.stream_rounds, args.max_tokens)
                print(f"{f'streamed tokens/s c={concurrency}':<22} " + " | ".join(
                    f"{name} {value:6.0f} ({value / tps['direct']:.3f})" for name, value in tps.items()))
                key = f"stream_c{concurrency}"
                results[key] = {**tps, **{f"{n}_ratio": v / tps["direct"] for n, v in tps.items()}}
                results[key]["ratio"] = tps["hal0"] / tps["direct"]
            for url, count in sorted(RESENT.items()):
                print(f"{'re-sent on a closed conn.':<22} {count} x {url}")
            results["resent"] = dict(RESENT)
            now, peak = rss_mb(rig.hal0.pid)
            print(f"{'hal0 API RSS':<22} {now:.1f} MB now, {peak:.1f} MB peak")
            results["rss_mb"] = {"now": now, "peak": peak}
        finally:
            stop_rig(rig)
    c1, c32 = results["c1"], results["c32"]
    router = "router" in c1
    verdicts = {
        "c=1: p50 added <= 0.5 ms": c1["hal0"]["p50_added_ms"] <= TARGETS["p50_added_ms_c1"],
        "streamed throughput at c=4 >= 97% of direct": results["stream_c4"]["ratio"] >= TARGETS["stream_ratio"],
        "streamed throughput at c=32 >= 97% of direct": results["stream_c32"]["ratio"] >= TARGETS["stream_ratio"],
    }
    if router:
        verdicts |= {
            "c=1: p50 added below router mode's": c1["hal0"]["p50_added_ms"] < c1["router"]["p50_added_ms"],
            "c=32: p50 added below router mode's": c32["hal0"]["p50_added_ms"] < c32["router"]["p50_added_ms"],
            "c=32: p99 added below router mode's": c32["hal0"]["p99_added_ms"] < c32["router"]["p99_added_ms"],
        }
    for what, ok in verdicts.items():
        print(f"  {'met ' if ok else 'MISS'}  {what}")
    results["verdicts"] = verdicts
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.proxy", description=__doc__)
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds per measurement")
    p.add_argument("--requests", type=int, default=80, help="small requests per round at c=1")
    p.add_argument("--stream-rounds", type=int, default=10, help="interleaved streaming rounds per concurrency")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per streamed request")
    p.add_argument("--no-peers", action="store_true", help="hal0 and direct only")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    results = asyncio.run(run(args))
    save("proxy", results)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
