"""The memory estimate against llama-server's own buffer report, case by case, beside the file-size x 1.2 rule.

`python -m bench.memory [--quick]`: generated models over ctx 512..32768, --parallel 1..8, KV cache f16/q8_0;
prints a Markdown table (the one in docs/performance.md) and writes bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from hal0.hardware.estimate import LoadSettings, estimate, file_size_rule
from hal0.hardware.probe import probe_llama_server
from hal0.providers.llamacpp import find_llama_server
from hal0.registry.generate import TINY, ModelSpec, generate_gguf
from hal0.registry.gguf import read_gguf_layout

RESULTS = Path(__file__).resolve().parent / "results" / "memory.json"
MIB = 1 << 20
MODELS: dict[str, ModelSpec] = {
    # The compute-buffer formula was fitted on two shapes like the first two; the third was never looked at.
    "mha-4L-256": replace(TINY, n_layers=4, dim=256, n_heads=8, n_kv_heads=8, ffn_dim=512, context=32768),
    "gqa-6L-512": replace(TINY, n_layers=6, dim=512, n_heads=8, n_kv_heads=4, ffn_dim=1408, context=32768,
                          filler_vocab=20000),
    "gqa-8L-768": replace(TINY, n_layers=8, dim=768, n_heads=12, n_kv_heads=4, ffn_dim=2048, context=32768,
                          filler_vocab=30000),
}
CTX = (512, 4096, 32768)
PARALLEL = (1, 4, 8)
CACHE = ("f16", "q8_0")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_case(binary: str, model: Path, ctx: int, parallel: int, cache: str, work: Path) -> dict[str, Any]:
    args = ["-c", str(ctx), "-np", str(parallel), "-ctk", cache, "-ctv", cache]
    rep = probe_llama_server(binary, model, args, _port(), work / "server.log")
    got = rep.buffers.get("CPU", {})
    est = estimate(read_gguf_layout(model), LoadSettings.from_args(None, args))
    reported = sum(got.values())
    return {
        "ctx": ctx, "parallel": parallel, "cache": cache,
        "reported": {**got, "total": reported},
        "estimate": {"weights": est.part("weights"), "kv": est.part("kv"), "compute": est.part("compute"),
                     "output": est.part("output"), "total": est.buffers_bytes, "with_baseline": est.total_bytes},
        "rule_1_2": file_size_rule(model.stat().st_size),
        "rss": rep.process.rss_bytes if rep.process else None,
    }


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "-"


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| model | ctx | np | cache | reported MiB | estimate / reported: weights | KV | compute | **total** "
           "| file x 1.2 / reported |",
           "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        e, g = r["estimate"], r["reported"]
        out.append(f"| {r['model']} | {r['ctx']} | {r['parallel']} | {r['cache']} | {g['total'] / MIB:.1f} "
                   f"| {_ratio(e['weights'], g.get('weights', 0))} | {_ratio(e['kv'], g.get('kv', 0))} "
                   f"| {_ratio(e['compute'], g.get('compute', 0))} | **{_ratio(e['total'], g['total'])}** "
                   f"| {_ratio(r['rule_1_2'], g['total'])} |")
    worst = max(abs(r["estimate"]["total"] / r["reported"]["total"] - 1) for r in rows)
    rule = [r["rule_1_2"] / r["reported"]["total"] for r in rows]
    out.append("")
    out.append(f"{len(rows)} cases: the estimate's total is at most {worst * 100:.1f}% off; file size x 1.2 ranges "
               f"from {min(rule):.2f} to {max(rule):.2f} of what llama-server allocates.")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one model, f16 only")
    parser.add_argument("--llama-server", default=None)
    args = parser.parse_args(argv)
    binary = args.llama_server or str(find_llama_server(None))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hal0-bench-memory-") as tmp:
        work = Path(tmp)
        for name, spec in list(MODELS.items())[: 1 if args.quick else None]:
            model = generate_gguf(work / f"{name}.gguf", spec)
            for ctx in CTX:
                for parallel in PARALLEL:
                    for cache in CACHE[: 1 if args.quick else None]:
                        row = {"model": name, **run_case(binary, model, ctx, parallel, cache, work)}
                        rows.append(row)
                        print(f"{name} ctx={ctx} np={parallel} {cache}: estimate/reported "
                              f"{row['estimate']['total'] / row['reported']['total']:.3f}", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"binary": binary, "cases": rows}, indent=1) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
