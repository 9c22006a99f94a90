"""The moonshine provider: speech-to-text through hal0's own transcription server (hal0.backends.stt_server).

The engine follows the model: Moonshine's on-device runtime for a Moonshine model (encoder_model.ort,
decoder_model_merged.ort, tokenizer.bin), faster-whisper for a CTranslate2 Whisper model (model.bin,
config.json, tokenizer.json). One provider keeps the built-in `stt` slot working whichever ASR model is assigned.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

from hal0.backends.layout import LayoutProblem, model_dir, stt_engine
from hal0.client import HttpClient, Response, form_body
from hal0.providers.base import Answering, Command, LaunchSpec, ProbeResult
from hal0.providers.speech import (
    PROBE_TIMEOUT,
    explain,
    probe_server,
    require_layout,
    require_runtime,
    server_command,
    silent_wav,
)

_ENDPOINTS = frozenset({"/v1/audio/transcriptions", "/v1/audio/translations", "/v1/models"})
_SENTINEL_AUDIO = silent_wav()


class MoonshineProvider:
    name = "moonshine"
    ready_lines: tuple[bytes, ...] = ()  # every log write is news
    slot_types = frozenset({"stt"})

    def endpoints(self, slot_type: str) -> frozenset[str]:
        return _ENDPOINTS

    def engine(self, spec: LaunchSpec) -> str:
        """`moonshine` or `whisper`, from the model's files; ModelFilesMissing otherwise."""
        found = stt_engine(model_dir(spec.model_path))
        if isinstance(found, LayoutProblem):
            raise require_layout(found, self.name, spec.model_path,
                                 "assign a Moonshine or Whisper (CTranslate2) model, e.g. the bundled "
                                 "whisper-base-ct2")
        return found

    def command(self, spec: LaunchSpec) -> Command:
        engine = self.engine(spec)
        require_runtime(engine, self.name)
        return server_command("stt_server", spec, "--engine", engine)

    async def probe(self, client: HttpClient, base_url: str, slot_type: str,
                    answering: Answering | None = None) -> ProbeResult:
        return await probe_server(client, base_url, "/v1/models", _sentinel, answering)

    def explain_failure(self, exit_code: int | None, log_tail: list[str]) -> str:
        return explain("the speech-to-text server", exit_code, log_tail)


def _sentinel(client: HttpClient,
              base_url: str) -> AbstractAsyncContextManager[Response]:
    body, content_type = form_body({"model": "probe", "response_format": "json"},
                                   [("file", "probe.wav", "audio/wav", _SENTINEL_AUDIO)])
    return client.post(f"{base_url}/v1/audio/transcriptions", body=body, headers={"Content-Type": content_type},
                       timeout=PROBE_TIMEOUT)
