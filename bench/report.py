"""Turn bench/results/*.json into one markdown table (bench/results/summary.md) and the plot docs/perf.png.

Run on demand: `python -m bench.report` (needs the `bench` extra: matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR

DOCS = Path(__file__).resolve().parent.parent / "docs"
PLANES = ("direct", "hal0", "router", "litellm")
COLORS = {"direct": "#888888", "hal0": "#1f77b4", "router": "#ff7f0e", "litellm": "#2ca02c"}


def load(folder: Path = RESULTS_DIR) -> dict[str, Any]:
    """The latest run of each part: the `<part>.json` its bench writes. A round's copies kept beside it under
    other names (`restart_r13_1.json`, `proxy_batch0_r6.json`) record that round for docs/performance.md; they
    are not the latest run, though their `bench` is the same. The memory and GPU checks have no `bench`."""
    out = {}
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("bench") == path.stem:
            out[path.stem] = data
    return out


def get(data: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def fmt(value: Any, unit: str = "", digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def rows(res: dict[str, Any]) -> list[tuple[str, dict[str, str], str]]:
    """(figure, value per plane, target) rows of the summary table."""
    p = get(res, "proxy", "results") or {}
    r = get(res, "readiness", "results") or {}
    h = get(res, "herd", "results") or {}
    s = get(res, "swaps", "results") or {}
    t = get(res, "restart", "results") or {}
    f = get(res, "footprint", "results") or {}
    out: list[tuple[str, dict[str, str], str]] = []

    def each(fn: Any) -> dict[str, str]:
        return {plane: fn(plane) for plane in PLANES}

    out.append(("small request c=1: p50 (added) ms", each(lambda n: fmt(get(p, "c1", n, "p50_ms"), "", 2) + (
        f" ({get(p, 'c1', n, 'p50_added_ms'):+.2f})" if get(p, "c1", n, "p50_added_ms") is not None else "")),
        "hal0 added ≤ 0.5 ms, below router"))
    out.append(("small request c=1: p99 (added) ms", each(lambda n: fmt(get(p, "c1", n, "p99_ms"), "", 2) + (
        f" ({get(p, 'c1', n, 'p99_added_ms'):+.2f})" if get(p, "c1", n, "p99_added_ms") is not None else "")), ""))
    out.append(("small request c=32: p50 (added) ms", each(lambda n: fmt(get(p, "c32", n, "p50_ms"), "", 1) + (
        f" ({get(p, 'c32', n, 'p50_added_ms'):+.1f})" if get(p, "c32", n, "p50_added_ms") is not None else "")),
        "hal0 added below router"))
    out.append(("small request c=32: p99 (added) ms", each(lambda n: fmt(get(p, "c32", n, "p99_ms"), "", 1) + (
        f" ({get(p, 'c32', n, 'p99_added_ms'):+.1f})" if get(p, "c32", n, "p99_added_ms") is not None else "")),
        "hal0 added below router"))
    for c in (4, 32):
        key = f"stream_c{c}"
        out.append((f"streamed tokens/s c={c} (ratio to direct)", each(lambda n, key=key: fmt(get(p, key, n), "", 0) + (
            f" ({get(p, key, n + '_ratio'):.2f})" if get(p, key, n + "_ratio") is not None else "")), "hal0 ≥ 0.97"))
    for size in ("tiny", "large"):
        if size not in r:
            continue
        out.append((f"{size}: ready → first token ms (readiness lag)",
                    each(lambda n, size=size: fmt(get(r, size, n, "lag_ms"))),
                    "" if size == "tiny" else "hal0 ≤ router"))
        out.append((f"{size}: cold TTFT ms (bare load time)", each(lambda n, size=size: fmt(
            get(r, size, n, "ttft_ms")) + (f" ({get(r, size, n, 'load_ms'):.1f})"
                                           if get(r, size, n, "load_ms") is not None else "")),
            "hal0 ≤ bare + 1 ms and ≤ router" if size == "tiny" else ""))
    for size in ("tiny", "large"):
        if size not in h:
            continue
        out.append((f"herd of 64, {size}: starts / errors / all answered ms", each(
            lambda n, size=size: "n/a" if get(h, size, n) is None else
            f"{get(h, size, n, 'starts_max')} / {get(h, size, n, 'errors_total')} / "
            f"{get(h, size, n, 'all_answered_ms'):.0f}"), "hal0: 1 / 0" + (", ≤ router" if size == "large" else "")))
    if s:
        out.append(("swap (alternating 2 tiny models, 1 loaded) p50 ms", each(
            lambda n: fmt(get(s, n, "swap_ms_p50")) + (f" (x{get(s, n, 'ratio_to_bare'):.2f})"
                                                      if get(s, n, "ratio_to_bare") is not None else "")), ""))
    for size in ("tiny", "large"):
        if size not in t:
            continue
        out.append((f"API restart, {size}: serving again ms / model reloaded", each(
            lambda n, size=size: "n/a" if get(t, size, n) is None else
            f"{get(t, size, n, 'serves_again_ms'):.0f} / {'yes' if any(get(t, size, n, 'reloaded')) else 'no'}"
            + (f" (socket held, as under systemd: {get(t, size, 'hal0-socket', 'serves_again_ms'):.0f})"
               if n == "hal0" and get(t, size, "hal0-socket") else "")),
            "hal0: ≤ 150 ms, no reload"))
    out.append(("control plane RSS MB idle / under load", each(
        lambda n: "n/a" if get(f, n) is None else
        f"{get(f, n, 'idle', 'rss_mb'):.0f} / {get(f, n, 'load', 'rss_mb'):.0f}"
        + (f" (/v1 only: {get(f, 'hal0_v1_only', 'rss_mb'):.0f})" if n == "hal0" and get(f, "hal0_v1_only") else "")),
        "hal0 idle ≤ 45"))
    out.append(("control plane CPU % idle / under load (CPU ms per request)", each(
        lambda n: "n/a" if get(f, n) is None else
        f"{get(f, n, 'idle', 'cpu_pct'):.2f} / {get(f, n, 'load', 'cpu_pct'):.0f} "
        f"({get(f, n, 'load', 'cpu_ms_per_request'):.2f})"), ""))
    return out


def table(res: dict[str, Any]) -> str:
    lines = ["| figure | direct | hal0 | router mode | LiteLLM | target |", "|---|---|---|---|---|---|"]
    for figure, values, target in rows(res):
        lines.append(f"| {figure} | " + " | ".join(values[n] for n in PLANES) + f" | {target} |")
    return "\n".join(lines)


def bars(ax: Any, title: str, values: dict[str, float | None], unit: str, log: bool = False,
         target: float | None = None, notes: dict[str, str] | None = None) -> None:
    names = [n for n in PLANES if values.get(n) is not None]
    heights = [float(values[n] or 0) for n in names]
    ax.bar(names, heights, color=[COLORS[n] for n in names])
    for i, (name, height) in enumerate(zip(names, heights, strict=True)):
        label = f"{height:.3g}" + (f"\n{notes[name]}" if notes and name in notes else "")
        ax.text(i, height, label, ha="center", va="bottom", fontsize=7)
    if target is not None:
        ax.axhline(target, color="red", linestyle="--", linewidth=1)
    if log:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(unit, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.margins(y=0.25)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = get(res, "proxy", "results") or {}
    r = get(res, "readiness", "results") or {}
    h = get(res, "herd", "results") or {}
    s = get(res, "swaps", "results") or {}
    t = get(res, "restart", "results") or {}
    f = get(res, "footprint", "results") or {}
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5))
    ax = axes.flat
    bars(ax[0], "small request, c=1: p50 latency", {n: get(p, "c1", n, "p50_ms") for n in PLANES}, "ms", log=True)
    bars(ax[1], "small request, c=32: p50 latency", {n: get(p, "c32", n, "p50_ms") for n in PLANES}, "ms",
         log=True)
    bars(ax[2], "streamed tokens/s at c=4 (c=32 in notes), ratio to direct",
         {n: get(p, "stream_c4", f"{n}_ratio") for n in PLANES}, "ratio", target=0.97,
         notes={n: f"c=32: {get(p, 'stream_c32', f'{n}_ratio'):.2f}" for n in PLANES
                if get(p, "stream_c32", f"{n}_ratio") is not None})
    bars(ax[3], "tiny model, cold: time to first token", {n: get(r, "tiny", n, "ttft_ms") for n in PLANES}, "ms",
         target=30, notes={n: f"ready→tok {get(r, 'tiny', n, 'lag_ms'):.1f}" for n in PLANES
                           if get(r, "tiny", n, "lag_ms") is not None})
    bars(ax[4], "herd of 64 at a cold model: all answered", {
        f"{n}": get(h, "large", n, "all_answered_ms") or get(h, "tiny", n, "all_answered_ms") for n in PLANES},
        "ms", notes={n: f"starts {get(h, 'large', n, 'starts_max') or get(h, 'tiny', n, 'starts_max')}"
                               for n in PLANES if get(h, "tiny", n) is not None})
    ax[4].set_title("herd of 64 at a cold model (large if measured): all answered", fontsize=9)
    bars(ax[5], "swap between two tiny models (1 loaded)", {n: get(s, n, "swap_ms_p50") for n in PLANES}, "ms")
    size = "large" if "large" in t else "tiny"
    bars(ax[6], f"API SIGKILL + restart ({size} model): serving again",
         {n: get(t, size, n, "serves_again_ms") for n in PLANES}, "ms",
         log=True, notes={n: "reloaded" if any(get(t, size, n, "reloaded")) else "no reload" for n in PLANES
                          if get(t, size, n) is not None})
    bars(ax[7], "control plane RSS under load", {n: get(f, n, "load", "rss_mb") for n in PLANES}, "MB", log=True,
         notes={n: f"{get(f, n, 'load', 'cpu_ms_per_request'):.2f} CPU ms/req" for n in PLANES
                if get(f, n) is not None})
    machine = get(res, "proxy", "machine") or {}
    fig.suptitle(f"hal0 vs direct llama-server vs llama.cpp router mode vs LiteLLM — {machine.get('cores')} cores, "
                 f"{machine.get('cpu', '')}; red dashed lines: targets", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot -> {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("--png", type=Path, default=DOCS / "perf.png")
    args = parser.parse_args(argv)
    res = load()
    text = table(res)
    (RESULTS_DIR / "summary.md").write_text(text + "\n")
    print(text)
    plot(res, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
