"""hal0's speech-to-text server: OpenAI's /v1/audio/transcriptions around an on-device ASR engine.

The engine follows the model's files: Moonshine's runtime for a Moonshine model, faster-whisper (CTranslate2)
for a Whisper conversion. Run as `python -m hal0.backends.stt_server --host H --port N --model PATH`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from hal0.backends.audio import AudioError, Samples, decode, resample
from hal0.backends.layout import RUNTIME_EXTRAS, LayoutProblem, missing_modules, model_dir, stt_engine
from hal0.datatypes import datatype
from hal0.errors import openai_error_body
from hal0.server import Server, listen

SAMPLE_RATE = 16000
RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
EXIT_LOAD_FAILED = 3


@datatype(frozen=True, slots=True)
class Segment:
    id: int
    start: float
    end: float
    text: str
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    words: tuple[tuple[float, float, str], ...] = ()


@datatype(frozen=True, slots=True)
class Transcript:
    text: str
    language: str
    duration: float
    segments: tuple[Segment, ...] = ()


@datatype(frozen=True, slots=True)
class Options:
    language: str | None = None
    prompt: str | None = None
    temperature: float = 0.0
    word_timestamps: bool = False
    #: Whisper's tasks: "transcribe", or "translate" (into English).
    task: str = "transcribe"


class Engine(Protocol):
    name: str
    #: Whether the model can translate speech into English (Whisper's translate task).
    translates: bool

    def transcribe(self, samples: Samples, options: Options) -> Transcript: ...


class WhisperEngine:
    """faster-whisper on a CTranslate2 Whisper model (CPU, int8 by default)."""

    name = "whisper"
    translates = True

    def __init__(self, directory: Path, compute_type: str, threads: int) -> None:
        from faster_whisper import WhisperModel

        self._model = WhisperModel(str(directory), device="cpu", compute_type=compute_type, cpu_threads=threads,
                                   local_files_only=True)

    def transcribe(self, samples: Samples, options: Options) -> Transcript:
        segments, info = self._model.transcribe(
            samples, language=options.language, initial_prompt=options.prompt, temperature=options.temperature,
            beam_size=1, word_timestamps=options.word_timestamps, condition_on_previous_text=False,
            task=options.task,
        )
        duration = len(samples) / SAMPLE_RATE
        # Whisper's last timestamp can run past the audio; subtitles must not.
        out = tuple(
            Segment(i, min(float(s.start), duration), min(float(s.end), duration), s.text.strip(),
                    float(s.avg_logprob), float(s.no_speech_prob),
                    tuple((float(w.start), min(float(w.end), duration), w.word.strip()) for w in (s.words or ())))
            for i, s in enumerate(segments)
        )
        return Transcript(" ".join(s.text for s in out if s.text), info.language, duration, out)


class MoonshineEngine:
    """Moonshine's on-device runtime (libmoonshine through the moonshine-voice package)."""

    name = "moonshine"
    translates = False

    def __init__(self, directory: Path, arch: str) -> None:
        from moonshine_voice import ModelArch, Transcriber

        chosen = arch if arch != "auto" else ("tiny" if "tiny" in directory.name else "base")
        self._transcriber = Transcriber(model_path=str(directory), model_arch=ModelArch[chosen.upper()])
        self._language = "en"

    def transcribe(self, samples: Samples, options: Options) -> Transcript:
        result = self._transcriber.transcribe_without_streaming(samples.tolist(), SAMPLE_RATE)
        segments = tuple(
            Segment(i, float(line.start_time), float(line.start_time + line.duration), str(line.text).strip())
            for i, line in enumerate(result.lines)
        )
        return Transcript(" ".join(s.text for s in segments if s.text), options.language or self._language,
                          len(samples) / SAMPLE_RATE, segments)


def load_engine(model_path: Path, *, engine: str, compute_type: str, threads: int, arch: str) -> Engine:
    """The engine for this model; RuntimeError with a plain reason when it cannot be loaded."""
    directory = model_dir(model_path)
    found = stt_engine(directory)
    if isinstance(found, LayoutProblem):
        raise RuntimeError(found.message)
    if engine != "auto" and engine != found:
        raise RuntimeError(f"--engine {engine} was asked for, but {directory.name}/ holds a {found} model")
    missing = missing_modules(found)
    if missing:
        raise RuntimeError(f"the {found} runtime is not installed (missing {', '.join(missing)}); "
                           f"install it with `pip install '{RUNTIME_EXTRAS[found]}'`")
    if found == "moonshine":
        return MoonshineEngine(directory, arch)
    return WhisperEngine(directory, compute_type, threads)


# -- rendering -------------------------------------------------------------------------------------------
def _timestamp(seconds: float, sep: str) -> str:
    ms = round(max(seconds, 0.0) * 1000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{sep}{ms:03d}"


def to_srt(transcript: Transcript) -> str:
    blocks = [f"{n}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text}\n"
              for n, s in enumerate(transcript.segments, start=1)]
    return "\n".join(blocks)


def to_vtt(transcript: Transcript) -> str:
    blocks = [f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text}\n" for s in transcript.segments]
    return "WEBVTT\n\n" + "\n".join(blocks)


def to_verbose(transcript: Transcript, words: bool, task: str = "transcribe") -> dict[str, Any]:
    out: dict[str, Any] = {
        "task": task, "language": transcript.language, "duration": round(transcript.duration, 3),
        "text": transcript.text,
        "segments": [{"id": s.id, "seek": 0, "start": round(s.start, 3), "end": round(s.end, 3), "text": s.text,
                      "tokens": [], "temperature": 0.0, "avg_logprob": s.avg_logprob,
                      "compression_ratio": 0.0, "no_speech_prob": s.no_speech_prob}
                     for s in transcript.segments],
    }
    if words:
        out["words"] = [{"word": w, "start": round(a, 3), "end": round(b, 3)}
                        for s in transcript.segments for a, b, w in s.words]
    return out


def to_events(transcript: Transcript) -> list[bytes]:
    """OpenAI's streamed transcription: one `transcript.text.delta` event per segment, then
    `transcript.text.done` with the whole text (what `transcriptions.create(..., stream=True)` yields)."""
    def event(data: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(data).encode() + b"\n\n"

    texts = [s.text for s in transcript.segments if s.text]
    deltas = [event({"type": "transcript.text.delta", "delta": (" " if i else "") + t})
              for i, t in enumerate(texts)]
    usage = {"type": "duration", "seconds": round(transcript.duration, 3)}
    return [*deltas, event({"type": "transcript.text.done", "text": transcript.text, "usage": usage})]


def render(transcript: Transcript, fmt: str, words: bool, task: str = "transcribe") -> Response:
    if fmt == "text":
        return PlainTextResponse(transcript.text + "\n")
    if fmt == "srt":
        return PlainTextResponse(to_srt(transcript), media_type="application/x-subrip")
    if fmt == "vtt":
        return PlainTextResponse(to_vtt(transcript), media_type="text/vtt")
    if fmt == "verbose_json":
        return JSONResponse(to_verbose(transcript, words, task))
    return JSONResponse({"text": transcript.text,
                         "usage": {"type": "duration", "seconds": round(transcript.duration, 3)}})


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(openai_error_body(status, code, message), status)


# -- the server ----------------------------------------------------------------------------------------------
@datatype
class ServerState:
    model_path: Path
    alias: str
    engine: Engine | None = None
    load_error: str | None = None
    loaded_in_s: float | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def build_app(state: ServerState) -> Starlette:
    async def health(request: Request) -> Response:
        if state.load_error:
            return JSONResponse({"status": "error", "message": state.load_error}, 500)
        if state.engine is None:
            return JSONResponse({"status": "loading"}, 503)
        return JSONResponse({"status": "ok", "engine": state.engine.name, "loaded_in_s": state.loaded_in_s})

    async def models(request: Request) -> Response:
        data = [{"id": state.alias, "object": "model", "owned_by": "hal0",
                 "engine": state.engine.name if state.engine else None, "path": str(state.model_path)}]
        return JSONResponse({"object": "list", "data": data})

    async def transcriptions(request: Request) -> Response:
        return await answer(request, "transcribe")

    async def translations(request: Request) -> Response:
        return await answer(request, "translate")

    async def answer(request: Request, task: str) -> Response:
        engine = state.engine
        if engine is None:
            return error(503, "loading", state.load_error or "the speech-to-text model is still loading")
        if task == "translate" and not engine.translates:
            return error(400, "translation_unsupported",
                         f"this model ({engine.name}) only transcribes; translations need a Whisper model")
        try:
            form = await request.form(max_files=1, max_fields=32)
        except Exception as exc:  # starlette raises several types for a malformed body
            return error(400, "invalid_multipart", f"expected a multipart/form-data body: {exc}")
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(form.close)
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                return error(400, "missing_file", "the `file` form field (the audio to transcribe) is required")
            fmt = str(form.get("response_format") or "json")
            if fmt not in RESPONSE_FORMATS:
                return error(400, "unsupported_response_format",
                             f"response_format must be one of {', '.join(RESPONSE_FORMATS)}; got {fmt[:40]!r}")
            try:
                temperature = float(str(form.get("temperature") or 0.0))
            except ValueError:
                return error(400, "invalid_temperature", "temperature must be a number")
            granularities = {str(g) for g in form.getlist("timestamp_granularities[]")}
            language = str(form.get("language") or "").strip().lower() or None
            prompt = str(form.get("prompt") or "") or None
            stream = str(form.get("stream") or "").lower() in ("true", "1")
            if stream and fmt not in ("json", "text"):
                return error(400, "unsupported_response_format", "a streamed transcription is text: "
                             f"response_format json or text, not {fmt[:40]!r}")
            data = await upload.read()
        try:
            samples = await asyncio.to_thread(_prepare, data)
        except AudioError as exc:
            return error(400, exc.code, str(exc))
        # Translation ignores `language`: Whisper detects the spoken one and answers in English.
        options = Options(None if task == "translate" else language, prompt, temperature,
                          "word" in granularities, task)
        async with state.lock:
            try:
                transcript = await asyncio.to_thread(engine.transcribe, samples, options)
            except ValueError as exc:
                return error(400, "invalid_request", str(exc))
        if stream:
            events = to_events(transcript)

            async def chunks() -> Any:
                for chunk in events:
                    yield chunk

            return StreamingResponse(chunks(), media_type="text/event-stream")
        return render(transcript, fmt, options.word_timestamps, task)

    return Starlette(routes=[
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
        Route("/v1/audio/translations", translations, methods=["POST"]),
    ])


def _prepare(data: bytes) -> Samples:
    decoded = decode(data)
    samples = resample(decoded.samples, decoded.sample_rate, SAMPLE_RATE)
    return np.ascontiguousarray(samples, dtype=np.float32)


async def _load(state: ServerState, server: Server, args: argparse.Namespace) -> None:
    started = time.monotonic()
    try:
        state.engine = await asyncio.to_thread(
            load_engine, state.model_path, engine=args.engine, compute_type=args.compute_type,
            threads=args.threads, arch=args.arch)
    except Exception as exc:  # any failure of a third-party runtime ends the process with its reason
        state.load_error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, RuntimeError) else str(exc)
        print(f"error: cannot load the speech-to-text model: {state.load_error}", file=sys.stderr, flush=True)
        server.exit()
        return
    state.loaded_in_s = round(time.monotonic() - started, 3)
    print(json.dumps({"event": "loaded", "engine": state.engine.name, "seconds": state.loaded_in_s}), flush=True)


async def _serve(args: argparse.Namespace) -> int:
    try:
        sock = listen(args.host, args.port)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    state = ServerState(Path(args.model), args.alias or Path(args.model).parent.name)
    server = Server(build_app(state), lifespan=False)
    load = asyncio.create_task(_load(state, server, args), name="load-model")
    try:
        await server.serve_with_signals([sock])
    finally:
        load.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await load
    return EXIT_LOAD_FAILED if state.load_error else 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hal0.backends.stt_server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True, help="the model's primary file (or its folder)")
    parser.add_argument("--alias", default="", help="the model id /v1/models reports (the slot name)")
    parser.add_argument("--engine", choices=("auto", "moonshine", "whisper"), default="auto")
    parser.add_argument("--compute-type", default="int8", help="CTranslate2 compute type for Whisper models")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: the runtime decides)")
    parser.add_argument("--arch", choices=("auto", "tiny", "base"), default="auto", help="Moonshine model size")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(_serve(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
