"""The flm provider: FastFlowLM's `flm serve`, an OpenAI-shaped server that runs LLMs on AMD Ryzen AI NPUs.

What it needs, checked before anything starts: an XDNA 2 NPU visible as /dev/accel/accel* (the amdxdna driver),
the `flm` binary (https://github.com/FastFlowLM/FastFlowLM), and a model tag that `flm pull` has fetched into
FLM's own model folder. In hal0's registry an flm model is a ref whose primary file is `flm.json`:
`{"tag": "llama3.2:1b"}`; FLM keeps the weights itself (it does not load GGUF files).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from hal0.client import HttpClient, HttpError, Timeout
from hal0.errors import BackendError, BinaryNotFound
from hal0.providers.base import Answering, Command, LaunchSpec, ProbeResult, sentinel_or_held
from hal0.providers.speech import explain

_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models"})
_PROBE_TIMEOUT = Timeout(total=60, connect=1)
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
INSTALL_HINT = "install FastFlowLM from https://github.com/FastFlowLM/FastFlowLM/releases (Linux: see its " \
               "docs/linux-getting-started.md), then `flm validate`"


class NpuNotFound(BackendError):
    """No AMD NPU on this machine: flm cannot run here at all."""

    code = "npu_not_found"


class FlmModelInvalid(BackendError):
    code = "flm_model_invalid"
    status = 409


def find_npu(accel_dir: Path) -> list[Path]:
    return sorted(accel_dir.glob("accel*")) if accel_dir.is_dir() else []


def read_tag(model_path: Path) -> str:
    """The FLM model tag of a registry entry (`flm.json` with a `tag`)."""
    path = model_path / "flm.json" if model_path.is_dir() else model_path
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FlmModelInvalid(
            f"flm slots take a model ref whose file is flm.json naming an FLM model tag, e.g. "
            f'{{"tag": "llama3.2:1b"}}; {path.name} is not one ({type(exc).__name__})',
            detail={"model_path": str(path)}) from None
    tag = data.get("tag") if isinstance(data, dict) else None
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):
        raise FlmModelInvalid(f"{path.name} has no valid FLM model tag under \"tag\"",
                              detail={"model_path": str(path)})
    return tag


class FlmProvider:
    name = "flm"
    ready_lines: tuple[bytes, ...] = ()  # every log write is news
    slot_types = frozenset({"chat"})

    def __init__(self, binary: str = "", accel_dir: Path = Path("/dev/accel")) -> None:
        self._configured = binary
        self._accel_dir = accel_dir

    def endpoints(self, slot_type: str) -> frozenset[str]:
        return _ENDPOINTS

    def binary(self) -> Path:
        if self._configured:
            path = Path(self._configured).expanduser()
            if path.is_file():
                return path
            raise BinaryNotFound(f"flm (FastFlowLM) not found at the configured path {self._configured!r}",
                                 detail={"configured": self._configured, "hint": INSTALL_HINT})
        found = shutil.which("flm")
        if found:
            return Path(found)
        raise BinaryNotFound(f"flm (FastFlowLM) is not installed: {INSTALL_HINT}",
                             detail={"searched": ["PATH"], "hint": INSTALL_HINT})

    def command(self, spec: LaunchSpec) -> Command:
        if not find_npu(self._accel_dir):
            raise NpuNotFound(
                f"flm needs an AMD Ryzen AI NPU (XDNA 2) and this machine has none: no {self._accel_dir}/accel* "
                "device (the amdxdna driver exposes it). Serve this model with llama.cpp instead.",
                detail={"looked_for": f"{self._accel_dir}/accel*",
                        "needs": "AMD Ryzen AI 300 / Strix, Strix Halo, Kraken or Gorgon Point NPU, "
                                 "amdxdna driver, FastFlowLM"})
        binary = self.binary()
        argv = [str(binary), "serve", read_tag(spec.model_path), "--host", spec.host, "--port", str(spec.port)]
        if spec.ctx_size:
            argv += ["--ctx-len", str(spec.ctx_size)]
        argv += list(spec.extra_args)
        return Command(tuple(argv), dict(spec.env))

    async def probe(self, client: HttpClient, base_url: str, slot_type: str,
                    answering: Answering | None = None) -> ProbeResult:
        """A non-empty /v1/models, then a 1-token chat completion with the model it lists."""
        try:
            async with client.get(f"{base_url}/v1/models", timeout=_PROBE_TIMEOUT) as resp:
                data = await resp.json() if resp.status == 200 else None
                models = data.get("data") if isinstance(data, dict) else None
                if not models:
                    return ProbeResult(False, "models", resp.status, "no model listed by /v1/models")
            held = answering() if answering is not None else None
            return await sentinel_or_held(held, lambda: _sentinel_call(client, base_url, models[0].get("id", "")))
        except (HttpError, OSError, ValueError) as exc:
            return ProbeResult(False, "connect", None, f"{type(exc).__name__}: {exc}")

    def explain_failure(self, exit_code: int | None, log_tail: list[str]) -> str:
        return explain("flm", exit_code, log_tail)


async def _sentinel_call(client: HttpClient, base_url: str, model: str) -> ProbeResult:
    payload = {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "ok"}]}
    async with client.post(f"{base_url}/v1/chat/completions", json=payload, timeout=_PROBE_TIMEOUT) as resp:
        if resp.status != 200:
            return ProbeResult(False, "sentinel", resp.status, (await resp.text())[:300],
                               loading=resp.status == 503)
        await resp.read()
    return ProbeResult(True, "sentinel", 200, "ok")
