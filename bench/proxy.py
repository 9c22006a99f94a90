"""What the /v1 proxy costs: one llama-server hit directly and through hal0 in the same run, interleaved.

Run on demand: `python -m bench.proxy` (see bench/README.md). Prints added latency (p50/p99) for a small request
at concurrency 1 and 32, streamed tokens/s at concurrency 32 as a ratio to direct, and the API's RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from hal0.providers.llamacpp import find_llama_server
from hal0.registry.generate import TINY, generate_gguf
from hal0.registry.store import ModelStore

SLOT = "primary"
SMALL = {"model": SLOT, "prompt": "hi", "max_tokens": 1, "temperature": 0}
TARGETS = {"p50_added_ms_c1": 1.0, "stream_ratio_c32": 0.97, "rss_mb": 100.0}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size of `pid` in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


@dataclass
class Rig:
    """hal0 serving one tiny-model chat slot, and that slot's backend URL."""

    home: Path
    api: subprocess.Popen[bytes]
    hal0_url: str
    direct_url: str


def spawn_api(home: Path, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with (home / "api.log").open("ab") as log:
        return subprocess.Popen([sys.executable, "-m", "hal0.cli", "serve", "--port", str(port), "--no-demo",
                                 "--log-level", "warning"], env=env, stdout=log, stderr=subprocess.STDOUT)


async def start_rig(home: Path) -> Rig:
    llama = str(find_llama_server())
    model = generate_gguf(home / "tiny.gguf", TINY)
    ModelStore(home / "state" / "models").import_file("tiny", model, slot_type="chat")
    (home / "config" / "slots").mkdir(parents=True, exist_ok=True)
    (home / "config" / "slots" / f"{SLOT}.toml").write_text('type = "chat"\nmodel = "tiny"\n')
    port, backend_port = free_port(), free_port()
    env = {**os.environ, "HAL0_HOME": str(home), "HAL0_LLAMA_SERVER": llama, "HAL0_PORT_MIN": str(backend_port),
           "HAL0_PORT_MAX": str(backend_port), "HAL0_IDLE_TIMEOUT_S": "3600"}
    api = spawn_api(home, port, env)
    hal0_url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 30
        while True:
            try:
                async with http.get(f"{hal0_url}/api/health") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            if api.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"hal0 did not start; see {home / 'api.log'}")
            await asyncio.sleep(0.05)
        async with http.post(f"{hal0_url}/api/slots/{SLOT}/load") as resp:
            view = await resp.json()
            if resp.status != 200 or view["state"] != "ready":
                raise SystemExit(f"slot {SLOT} did not load: {view}")
    return Rig(home, api, hal0_url, f"http://127.0.0.1:{view['port']}")


def stop_rig(rig: Rig) -> None:
    rig.api.send_signal(signal.SIGTERM)
    rig.api.wait(30)
    pidfile = rig.home / "state" / "slots" / SLOT / "backend.pid"
    try:
        os.killpg(json.loads(pidfile.read_text())["pid"], signal.SIGKILL)
    except (OSError, ValueError, KeyError):
        pass


# -- measurements -------------------------------------------------------------------------------------------
#: Requests re-sent because the server had closed the kept-alive connection they were written to.
RESENT: dict[str, int] = {}
_STALE = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> aiohttp.ClientResponse:
    """POST, re-sent once when the pooled connection turns out closed (llama-server closes one after every
    streamed answer without a `Connection: close`); any robust client does the same.
    """
    try:
        return await http.post(url, json=body)
    except _STALE:
        RESENT[url] = RESENT.get(url, 0) + 1
        return await http.post(url, json=body)


async def timed_small(http: aiohttp.ClientSession, base: str) -> float:
    started = time.perf_counter()
    async with await post(http, f"{base}/v1/completions", SMALL) as resp:
        await resp.read()
        if resp.status != 200:
            raise SystemExit(f"{base}: {resp.status} {await resp.text()}")
    return (time.perf_counter() - started) * 1000


async def streamed_tokens(http: aiohttp.ClientSession, base: str, max_tokens: int) -> int:
    body = {"model": SLOT, "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True}
    tokens = 0
    async with await post(http, f"{base}/v1/chat/completions", body) as resp:
        if resp.status != 200:
            raise SystemExit(f"{base}: {resp.status} {await resp.text()}")
        async for line in resp.content:
            if line.startswith(b"data: {") and b'"content":"' in line:
                tokens += 1
        resp.close()  # llama-server drops the connection after a stream; do the same on both paths
    return tokens


async def concurrently(n: int, each: Callable[[], Awaitable[Any]]) -> list[Any]:
    return list(await asyncio.gather(*(each() for _ in range(n))))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def session(limit: int) -> aiohttp.ClientSession:
    # Idle connections are dropped before llama-server's own 5 s keep-alive timeout would close them under us.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, keepalive_timeout=2))


async def latency(rig: Rig, concurrency: int, rounds: int, per_worker: int) -> dict[str, list[float]]:
    """Small requests, alternating direct and hal0 round by round (order flipped every round)."""
    out: dict[str, list[float]] = {"direct": [], "hal0": []}
    # The same client on both paths: one connection per concurrent request.
    async with session(concurrency) as direct, session(concurrency) as proxied:
        targets = {"direct": (direct, rig.direct_url), "hal0": (proxied, rig.hal0_url)}

        async def worker(name: str) -> list[float]:
            http, base = targets[name]
            return [await timed_small(http, base) for _ in range(per_worker)]

        for name in targets:  # warm both pools
            await concurrently(concurrency, lambda name=name: worker(name))  # type: ignore[misc]
        for i in range(rounds):
            order = ("direct", "hal0") if i % 2 == 0 else ("hal0", "direct")
            for name in order:
                for chunk in await concurrently(concurrency, lambda name=name: worker(name)):  # type: ignore[misc]
                    out[name].extend(chunk)
    return out


async def throughput(rig: Rig, concurrency: int, rounds: int, max_tokens: int) -> dict[str, float]:
    totals = {"direct": 0.0, "hal0": 0.0}
    tokens = {"direct": 0, "hal0": 0}
    async with session(concurrency) as direct, session(concurrency) as proxied:
        targets = {"direct": (direct, rig.direct_url), "hal0": (proxied, rig.hal0_url)}
        for i in range(rounds):
            order = ("direct", "hal0") if i % 2 == 0 else ("hal0", "direct")
            for name in order:
                http, base = targets[name]
                started = time.perf_counter()
                counts = await concurrently(concurrency, lambda http=http, base=base: streamed_tokens(  # type: ignore[misc]
                    http, base, max_tokens))
                totals[name] += time.perf_counter() - started
                tokens[name] += sum(counts)
    return {name: tokens[name] / totals[name] for name in totals}


def report_latency(label: str, data: dict[str, list[float]]) -> dict[str, float]:
    d50, h50 = statistics.median(data["direct"]), statistics.median(data["hal0"])
    d99, h99 = pct(data["direct"], 99), pct(data["hal0"], 99)
    print(f"{label:<28} direct p50 {d50:7.2f} ms  p99 {d99:7.2f} ms | hal0 p50 {h50:7.2f} ms  p99 {h99:7.2f} ms"
          f" | added p50 {h50 - d50:+6.2f} ms  p99 {h99 - d99:+6.2f} ms | ratio p50 {h50 / d50:.3f}"
          f"  p99 {h99 / d99:.3f}  (n={len(data['hal0'])})")
    return {"p50_added_ms": h50 - d50, "p99_added_ms": h99 - d99, "p50_ratio": h50 / d50,
            "p99_ratio": h99 / d99}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hal0-bench-") as tmp:
        rig = await start_rig(Path(tmp))
        try:
            print(f"hal0 {rig.hal0_url} -> llama-server {rig.direct_url}; {os.cpu_count()} cores")
            results: dict[str, Any] = {}
            results["c1"] = report_latency("small request, c=1", await latency(rig, 1, args.rounds, args.requests))
            results["c32"] = report_latency("small request, c=32",
                                            await latency(rig, 32, args.rounds, max(1, args.requests // 16)))
            tps = await throughput(rig, 32, args.stream_rounds, args.max_tokens)
            ratio = tps["hal0"] / tps["direct"]
            print(f"{'streamed tokens/s, c=32':<28} direct {tps['direct']:8.0f} | hal0 {tps['hal0']:8.0f}"
                  f" | ratio {ratio:.3f}")
            results["stream_c32"] = {**tps, "ratio": ratio}
            for url, count in sorted(RESENT.items()):
                print(f"{'re-sent on a closed conn.':<28} {count} x {url}")
            results["resent"] = dict(RESENT)
            now, peak = rss_mb(rig.api.pid)
            print(f"{'hal0 API RSS':<28} {now:.1f} MB now, {peak:.1f} MB peak")
            results["rss_mb"] = {"now": now, "peak": peak}
        finally:
            stop_rig(rig)
    verdicts = {
        "p50 added at c=1 <= 1 ms": results["c1"]["p50_added_ms"] <= TARGETS["p50_added_ms_c1"],
        "streamed throughput at c=32 >= 97% of direct": results["stream_c32"]["ratio"] >= TARGETS["stream_ratio_c32"],
        "API RSS <= 100 MB": results["rss_mb"]["peak"] <= TARGETS["rss_mb"],
    }
    for what, ok in verdicts.items():
        print(f"  {'met ' if ok else 'MISS'}  {what}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.proxy", description=__doc__)
    parser.add_argument("--rounds", type=int, default=6, help="alternating direct/hal0 rounds per measurement")
    parser.add_argument("--requests", type=int, default=80, help="small requests per round at c=1")
    parser.add_argument("--stream-rounds", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per streamed request")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args))
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
