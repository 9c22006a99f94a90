"""The kokoro provider: text-to-speech through hal0's own speech server (hal0.backends.tts_server) around
Kokoro-82M in ONNX (kokoro-onnx). The model's folder holds the .onnx file and its voice pack.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

from hal0.backends.layout import LayoutProblem, kokoro_files
from hal0.client import HttpClient, Response
from hal0.providers.base import Answering, Command, LaunchSpec, ProbeResult
from hal0.providers.speech import (
    PROBE_TIMEOUT,
    explain,
    probe_server,
    require_layout,
    require_runtime,
    server_command,
)

_ENDPOINTS = frozenset({"/v1/audio/speech", "/v1/audio/voices", "/v1/models"})


class KokoroProvider:
    name = "kokoro"
    ready_lines: tuple[bytes, ...] = ()  # every log write is news
    slot_types = frozenset({"tts"})

    def endpoints(self, slot_type: str) -> frozenset[str]:
        return _ENDPOINTS

    def command(self, spec: LaunchSpec) -> Command:
        files = kokoro_files(spec.model_path)
        if isinstance(files, LayoutProblem):
            raise require_layout(files, self.name, spec.model_path,
                                 "assign a Kokoro model with its voices, e.g. the bundled kokoro-82m-int8-ja")
        require_runtime("kokoro", self.name)
        return server_command("tts_server", spec)

    async def probe(self, client: HttpClient, base_url: str, slot_type: str,
                    answering: Answering | None = None) -> ProbeResult:
        return await probe_server(client, base_url, "/v1/audio/voices", _sentinel, answering)

    def explain_failure(self, exit_code: int | None, log_tail: list[str]) -> str:
        return explain("the text-to-speech server", exit_code, log_tail)


def _sentinel(client: HttpClient,
              base_url: str) -> AbstractAsyncContextManager[Response]:
    return client.post(f"{base_url}/v1/audio/speech", json={"input": "ok", "response_format": "pcm"},
                        timeout=PROBE_TIMEOUT)
