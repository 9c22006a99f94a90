"""Placement and memory admission on a GPU machine, through the real hal0 API and a CUDA llama-server.

`python3 bench/gpu_admission.py --llama-server /path/to/cuda/llama-server --out results.json` with hal0's src (and
its dependencies) on PYTHONPATH. Checks, each printed as PASS/FAIL with its figures:
- `device = "gpu:0"` lands on GPU 0: the backend runs with CUDA_VISIBLE_DEVICES=0, NVML shows its memory there, and
  the estimate of its GPU share is compared with that figure;
- `device = "cpu"` on the same CUDA build holds nothing on the GPU (CUDA_VISIBLE_DEVICES is empty);
- `auto` goes to the GPU while it fits and to the CPU once a GPU budget is full;
- a second `gpu:0` slot beyond GPU 0's budget unloads the first (an eviction record that names gpu:0), and never
  the CPU slot; a slot that cannot fit GPU 0 at all is refused with `insufficient_memory` before it starts.
The models are sparse F16 files of zeros from bench/gpu_memory.py's writer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.gpu_memory import _port, write_model

MIB = 1 << 20
RESULTS: list[dict[str, Any]] = []


def check(name: str, ok: bool, **figures: Any) -> None:
    RESULTS.append({"check": name, "ok": ok, **figures})
    print(f"{'PASS' if ok else 'FAIL'} {name} {json.dumps(figures, default=str)}", flush=True)


class Api:
    def __init__(self, home: Path, binary: str, env: dict[str, str]) -> None:
        self.port = _port()
        lo = _port()
        self.env = {**os.environ, "HAL0_HOME": str(home), "HAL0_LLAMA_SERVER": binary,
                    "HAL0_PORT_MIN": str(20000 + lo % 20000), "HAL0_PORT_MAX": str(20000 + lo % 20000 + 8), **env}
        home.mkdir(parents=True, exist_ok=True)
        log = (home / "api.log").open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "hal0.cli", "serve", "--port", str(self.port),
                                      "--no-demo", "--log-level", "warning"], env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=300)
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.http.get("/api/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError((home / "api.log").read_text()[-3000:])
            time.sleep(0.1)

    def slot(self, name: str, model: str, **config: Any) -> None:
        resp = self.http.post("/api/slots", json={"name": name, "type": "chat", "model": model, **config})
        assert resp.status_code == 201, resp.text

    def load(self, name: str) -> httpx.Response:
        return self.http.post(f"/api/slots/{name}/load")

    def get(self, name: str) -> dict[str, Any]:
        data: dict[str, Any] = self.http.get(f"/api/slots/{name}").json()
        return data

    def close(self) -> None:
        for s in self.http.get("/api/slots").json()["data"]:
            if s["state"] not in ("offline", "error"):
                self.http.post(f"/api/slots/{s['name']}/unload")
        self.proc.terminate()
        self.proc.wait(30)


def visible(pid: int) -> str | None:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    found = [e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"CUDA_VISIBLE_DEVICES=")]
    return found[0] if found else None


def run(binary: str, work: Path) -> dict[str, Any]:
    model = write_model(work / "m1.gguf", 1)
    ctx = ["-c", "8192", "-np", "1"]

    # 1. Placement with the default budgets.
    api = Api(work / "home-a", binary, {})
    try:
        assert api.http.post("/api/models/import", json={"ref": "m1", "path": str(model), "link": True}
                             ).status_code == 201
        api.slot("g0", "m1", device="gpu:0", args=ctx)
        api.slot("cpu", "m1", device="cpu", args=ctx)
        api.slot("auto", "m1", args=ctx)
        need = api.http.get("/api/slots/g0/estimate").json()["needed_bytes"]
        for name in ("g0", "cpu", "auto"):
            resp = api.load(name)
            assert resp.status_code == 200, resp.text
        g0, cpu, auto = (api.get(n) for n in ("g0", "cpu", "auto"))
        nvml = g0["memory"]["measured"]["gpu_process_bytes"]
        check("gpu:0 runs on GPU 0", g0["device"] == "gpu:0" and visible(g0["pid"]) == "0"
              and nvml.get("nvml:0", 0) > 0, device=g0["device"], visible=visible(g0["pid"]), nvml=nvml)
        check("estimate of the GPU share vs NVML", nvml.get("nvml:0", 0) > 0,
              estimate_mib=round(need.get("gpu:0", 0) / MIB, 1), nvml_mib=round(nvml.get("nvml:0", 0) / MIB, 1),
              ratio=round(need.get("gpu:0", 0) / nvml["nvml:0"], 4) if nvml.get("nvml:0") else None)
        check("cpu holds nothing on the GPU", cpu["device"] == "cpu" and visible(cpu["pid"]) == ""
              and not cpu["memory"]["measured"]["gpu_process_bytes"],
              visible=visible(cpu["pid"]), nvml=cpu["memory"]["measured"]["gpu_process_bytes"],
              rss_mib=round(cpu["memory"]["measured"]["rss_bytes"] / MIB, 1))
        check("auto goes to the GPU while it fits", auto["device"] == "gpu:0", device=auto["device"])
        hw = api.http.get("/api/hardware").json()
        check("NVML inventory and a GPU budget", bool(hw["gpus"]) and "gpu:0" in hw["budgets"],
              gpus=[(g["name"], g["memory_total_bytes"]) for g in hw["gpus"]], budget=hw["budgets"].get("gpu:0"))
    finally:
        api.close()

    # 2. A GPU budget that holds one such slot and a half.
    budget_mib = int(need["gpu:0"] * 1.5 / MIB)
    api = Api(work / "home-b", binary, {"HAL0_GPU_MEMORY_BUDGET_MB": f"0={budget_mib}"})
    try:
        assert api.http.post("/api/models/import", json={"ref": "m1", "path": str(model), "link": True}
                             ).status_code == 201
        api.slot("g0", "m1", device="gpu:0", args=ctx)
        api.slot("g0b", "m1", device="gpu:0", args=ctx)
        api.slot("cpu", "m1", device="cpu", args=ctx)
        api.slot("auto", "m1", args=ctx)
        api.slot("huge", "m1", device="gpu:0", args=["-c", "262144", "-np", "1"])
        for name in ("cpu", "g0", "auto"):
            assert api.load(name).status_code == 200, name
        check("auto goes to the CPU once the GPU budget is full", api.get("auto")["device"] == "cpu",
              device=api.get("auto")["device"], budget_mib=budget_mib)
        assert api.load("g0b").status_code == 200
        evicted = api.http.get("/api/decisions", params={"outcome": "evicted"}).json()["data"]
        states = {n: api.get(n)["state"] for n in ("g0", "g0b", "cpu", "auto")}
        check("a second gpu:0 slot unloads the first, never a CPU slot",
              [e["slot"] for e in evicted] == ["g0"] and states["g0"] == "offline"
              and states["cpu"] in ("ready", "idle") and states["auto"] in ("ready", "idle")
              and "gpu:0" in evicted[0]["detail"]["frees_bytes"],
              states=states, evictions=[(e["slot"], e["reason"], e["detail"]) for e in evicted])
        resp = api.load("huge")
        err = resp.json().get("error", {})
        check("a slot that cannot fit GPU 0 is refused before it starts",
              resp.status_code == 409 and err.get("code") == "insufficient_memory"
              and "gpu:0" in err.get("detail", {}).get("short_bytes", {}) and api.get("huge")["state"] == "offline",
              status=resp.status_code, message=err.get("message"))
    finally:
        api.close()
    hw_gpus = len(hw["gpus"])
    if hw_gpus >= 2:
        two_gpus(binary, work, model, ctx, need)
    else:
        print(f"SKIP two-GPU checks: this machine has {hw_gpus} GPU(s)", flush=True)
    model.unlink()
    return {"checks": RESULTS}


def two_gpus(binary: str, work: Path, model: Path, ctx: list[str], need: dict[str, int]) -> None:
    """Issue 16's checks: `auto` spreads over GPUs, `gpu:1` stays on GPU 1, `gpu:0,1` splits, admission per GPU."""
    budget_mib = int(need["gpu:0"] * 1.5 / MIB)
    api = Api(work / "home-c", binary, {"HAL0_GPU_MEMORY_BUDGET_MB": f"0={budget_mib},1={budget_mib}"})
    try:
        assert api.http.post("/api/models/import", json={"ref": "m1", "path": str(model), "link": True}
                             ).status_code == 201
        for name in ("auto1", "auto2"):
            api.slot(name, "m1", args=ctx)
        api.slot("one", "m1", device="gpu:1", args=ctx)
        api.slot("zero", "m1", device="gpu:0", args=ctx)
        api.slot("split", "m1", device="gpu:0,1", args=[*ctx, "-lv", "4"])
        for name in ("auto1", "auto2"):
            assert api.load(name).status_code == 200, name
        devices = sorted(api.get(n)["device"] for n in ("auto1", "auto2"))
        check("two auto slots that each fit one GPU land on different GPUs", devices == ["gpu:0", "gpu:1"],
              devices=devices)
        on1 = next(n for n in ("auto1", "auto2") if api.get(n)["device"] == "gpu:1")
        assert api.load("one").status_code == 200  # GPU 1 is full: its auto slot goes, GPU 0's stays
        one = api.get("one")
        nvml = one["memory"]["measured"]["gpu_process_bytes"]
        evicted = [e["slot"] for e in api.http.get("/api/decisions", params={"outcome": "evicted"}).json()["data"]]
        check("gpu:1 runs only on GPU 1, and filling GPU 1 evicts only GPU 1's slot",
              visible(one["pid"]) == "1" and set(nvml) == {"nvml:1"} and evicted == [on1],
              visible=visible(one["pid"]), nvml=nvml, evicted=evicted)
        for name in ("auto1", "auto2", "one"):
            api.http.post(f"/api/slots/{name}/unload")
        fit = api.http.get("/api/slots/split/estimate").json()
        assert api.load("split").status_code == 200
        split = api.get("split")
        measured = split["memory"]["measured"]
        check("gpu:0,1 splits one model over both GPUs as the estimate does",
              set(measured["gpu_process_bytes"]) == {"nvml:0", "nvml:1"}
              and {"CUDA0", "CUDA1"} <= set(measured["buffers"]),
              estimate_mib={d: round(n / MIB) for d, n in fit["needed_bytes"].items()},
              nvml_mib={d: round(n / MIB) for d, n in measured["gpu_process_bytes"].items()},
              buffers_mib={d: round(sum(k.values()) / MIB) for d, k in measured["buffers"].items()})
    finally:
        api.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--llama-server", required=True, help="a CUDA build of llama-server")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hal0-gpu-admission-", dir=args.workdir) as tmp:
        try:
            result = run(args.llama_server, Path(tmp))
        except BaseException as exc:
            result = {"checks": RESULTS, "error": f"{type(exc).__name__}: {exc}"}
            print(result["error"], flush=True)
            for log in Path(tmp).glob("home-*/logs/slots/*.log"):
                print(f"== {log}\n{log.read_text()[-2000:]}", flush=True)
            for log in Path(tmp).glob("home-*/api.log"):
                print(f"== {log}\n{log.read_text()[-3000:]}", flush=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0 if all(r["ok"] for r in RESULTS) and "error" not in result else 1


if __name__ == "__main__":
    raise SystemExit(main())
