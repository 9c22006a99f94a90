"""What reaching past one machine costs: the extra hop through a peer, and a token through an RPC split.

Needs root (network namespaces, as in tests/test_peers_netns.py): `python -m bench.scaleout`. Each node is a real
`hal0 serve` in its own namespace, joined by veth pairs over a bridge; the client runs inside the first node's
namespace. Prints, per round, the p50 of a small request direct to the serving node and through a peer, and the
backend's own per-token decode time (llama-server's `timings`) of the same model split over two nodes and whole
on one.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from tests.netns import Lab, Node, netns_unavailable

from bench.common import SMALL, llama_server, make_models, save, spread
from hal0.registry.generate import LARGE, generate_gguf


def hop(a: Node, b: Node, rounds: int, per_round: int) -> dict[str, Any]:
    """p50 per round of a 1-token completion sent straight to b, and to a, which forwards it to b."""
    def run() -> dict[str, list[float]]:
        p50: dict[str, list[float]] = {"direct": [], "peer": []}
        headers = {"direct": {"Authorization": f"Bearer {b.key}"}, "peer": {"Authorization": f"Bearer {a.key}"}}
        urls = {"direct": b.url, "peer": a.url}
        with httpx.Client(timeout=60) as client:
            for name in urls:  # warm: the model loaded, connections open
                client.post(f"{urls[name]}/v1/completions", json={"model": "tiny", **SMALL}, headers=headers[name])
            for r in range(rounds):
                times: dict[str, list[float]] = {"direct": [], "peer": []}
                order = ["direct", "peer"] if r % 2 == 0 else ["peer", "direct"]
                for _ in range(per_round):
                    for name in order:
                        started = time.perf_counter()
                        resp = client.post(f"{urls[name]}/v1/completions", json={"model": "tiny", **SMALL},
                                           headers=headers[name])
                        elapsed = (time.perf_counter() - started) * 1000
                        if resp.status_code != 200:
                            raise SystemExit(f"{name}: {resp.status_code} {resp.text}")
                        times[name].append(elapsed)
                for name in times:
                    p50[name].append(statistics.median(times[name]))
        return p50

    p50 = a.ns.call(run)
    added = [peer - direct for peer, direct in zip(p50["peer"], p50["direct"], strict=True)]
    return {"p50_direct_ms": p50["direct"], "p50_peer_ms": p50["peer"], "added_ms": added,
            "summary": {"direct": spread(p50["direct"]), "peer": spread(p50["peer"]), "added": spread(added)}}


def per_token(main: Node, slots: list[str], rounds: int, tokens: int) -> dict[str, Any]:
    """llama-server's own decode ms per token for each slot, `tokens` tokens per request, interleaved rounds."""
    def run() -> dict[str, list[float]]:
        out: dict[str, list[float]] = {s: [] for s in slots}
        with httpx.Client(timeout=600, headers={"Authorization": f"Bearer {main.key}"}) as client:
            body = {"prompt": "hello", "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
            for slot in slots:
                client.post(f"{main.url}/v1/completions", json={**body, "model": slot, "max_tokens": 1})
            for r in range(rounds):
                for slot in slots if r % 2 == 0 else reversed(slots):
                    resp = client.post(f"{main.url}/v1/completions", json={**body, "model": slot})
                    if resp.status_code != 200:
                        raise SystemExit(f"{slot}: {resp.status_code} {resp.text}")
                    out[slot].append(resp.json()["timings"]["predicted_per_token_ms"])
        return out

    ms = main.ns.call(run)
    return {"ms_per_token": ms, "summary": {s: spread(v) for s, v in ms.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaleout", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=100, help="small requests per path and round")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per request in the RPC part")
    parser.add_argument("--large", action="store_true", help="also split the large generated model")
    args = parser.parse_args(argv)
    why = netns_unavailable()
    if why is not None:
        raise SystemExit(f"bench.scaleout needs network namespaces: {why}")
    lab = Lab()
    nodes: list[Node] = []
    results: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="hal0-scaleout-") as tmp:
            root = Path(tmp)
            models = make_models(root / "models")
            binary = llama_server()

            def node(key: str) -> Node:
                made = Node(lab.add(), root / f"node{len(nodes)}", binary, key)
                nodes.append(made)
                return made

            a, b, worker = node("key-a"), node("key-b"), node("key-w")
            endpoint = f"{worker.ns.address}:50052"
            b.add_model("tiny", models["tiny-a"])
            b.write_slot("primary", 'model = "tiny"\n')
            b.write_slot("split", f'model = "tiny"\nargs = ["-ngl", "2"]\nrpc = ["{endpoint}"]\n')
            worker.write_slot("worker", f'type = "rpc"\nhost = "{worker.ns.address}"\nport = 50052\n')
            if args.large:
                b.add_model("large", generate_gguf(root / "models" / "large.gguf", LARGE))
                b.write_slot("large", 'model = "large"\n')
                b.write_slot("large-split", f'model = "large"\nargs = ["-ngl", "3"]\nrpc = ["{endpoint}"]\n')
            worker.start()
            b.start()
            a.start(peers=[b])
            loaded = worker.post("/api/slots/worker/load")
            if loaded.status_code != 200:
                raise SystemExit(f"worker: {loaded.text}")
            deadline = time.monotonic() + 30
            while a.peers()[b.url]["status"] != "up":
                if time.monotonic() > deadline:
                    raise SystemExit("node a never saw b up")
                time.sleep(0.05)
            results["hop"] = hop(a, b, args.rounds, args.requests)
            print("small request p50 ms (median of rounds, min-max):", results["hop"]["summary"])
            results["rpc"] = per_token(b, ["primary", "split"], args.rounds, args.tokens)
            print("decode ms per token:", results["rpc"]["summary"])
            if args.large:
                # A worker serves one llama-server at a time: the tiny split lets go of it first.
                b.post("/api/slots/split/unload")
                results["rpc_large"] = per_token(b, ["large", "large-split"], args.rounds, args.tokens)
                print("decode ms per token (large):", results["rpc_large"]["summary"])
    finally:
        for n in nodes:
            n.close()
        lab.close()
    save("scaleout", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
